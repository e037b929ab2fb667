"""gunicorn settings of the baselines: the same server shape as attune-sse's (2 gevent workers)."""

worker_class = "gevent"
workers = 2
worker_connections = 12000
graceful_timeout = 3
loglevel = "warning"
backlog = 4096
control_socket_disable = True
