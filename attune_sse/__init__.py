"""attune-sse: the real-time execution stream of Attune.

The pipeline, a module a step: the database (``storage.db``, ``storage.migrate``,
``storage/sql/``, the record in ``storage.record``) -> ``runtime.listener`` (the
LISTEN greenlet) -> ``core.hub`` (fan-out, grouped by ``core.grants``) ->
``http.stream`` (the view) and ``core.session`` (one stream, framed by
``core.sse``), through ``http.sink`` (the client's socket) -> the client (a
browser's EventSource, or ``sseclient``).
"""

__version__ = "0.1.0"
