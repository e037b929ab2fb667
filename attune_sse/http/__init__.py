"""The HTTP side: the views (REST, auth, the stream, OpenAPI), input checks, request bodies,
the client's socket and the app's state."""
