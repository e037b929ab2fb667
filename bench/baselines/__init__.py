"""The designs bench/scale.py runs beside attune-sse, as a user might otherwise build the stream."""
