"""Baseline (a): the naive design. Each SSE request opens its own PostgreSQL
connection and LISTENs on it, so PostgreSQL does the fan-out, one backend per
browser. Run by bench/scale.py under gunicorn with gevent workers, like
attune-sse:

    BENCH_DATABASE_URL=postgresql://... gunicorn -k gevent 'bench.baselines.naive_listen:create_app()'

No auth, no resume, no keep-alive: only the part being compared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import psycopg2
from flask import Flask, Response
from gevent.socket import wait_read
from psycogreen.gevent import patch_psycopg

CHANNEL = "attune_notifications"


def create_app() -> Flask:
    patch_psycopg()  # psycopg2 waits through gevent (the worker has monkey-patched the rest)
    url = os.environ["BENCH_DATABASE_URL"]
    app = Flask(__name__)

    @app.get("/stream")
    def stream() -> Response:
        conn = psycopg2.connect(url, application_name="bench-naive-listen")
        conn.autocommit = True
        conn.cursor().execute(f"LISTEN {CHANNEL}")

        def events() -> Iterator[bytes]:
            try:
                yield b": connected\n\n"
                while True:
                    wait_read(conn.fileno())  # not select(): descriptors pass 1024 here
                    conn.poll()
                    frames = []
                    while conn.notifies:
                        payload = conn.notifies.pop(0).payload
                        frames.append(f"id: {json.loads(payload)['event_id']}\ndata: {payload}\n\n")
                    if frames:
                        yield "".join(frames).encode()
            finally:
                conn.close()

        return Response(events(), mimetype="text/event-stream")

    return app
