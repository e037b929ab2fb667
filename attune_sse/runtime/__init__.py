"""What runs beside the requests in each worker: the listener, retention, metrics, the cache of who may do what."""
