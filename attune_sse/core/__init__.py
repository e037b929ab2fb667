"""The pipeline without Flask, a database or a socket: events, their SSE frames, grants, the hub, a stream's session."""
