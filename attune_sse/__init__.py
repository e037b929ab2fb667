"""attune-sse: the real-time execution stream of Attune.

The pipeline, one module a step:
database (``db``, ``migrate``, ``sql/``) -> ``listener`` (LISTEN greenlet)
-> ``hub`` (fan-out to bounded queues) -> ``stream`` (the SSE view, framed by
``sse``) -> the client (a browser's EventSource, or ``sseclient``).
"""

__version__ = "0.1.0"
