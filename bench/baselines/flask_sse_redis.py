"""Baseline (b): Flask-SSE over Redis, the Flask ecosystem's usual SSE design.

Every SSE request subscribes to a Redis channel (Flask-SSE opens a pub/sub
connection per client); a bridge process LISTENs on PostgreSQL once and
publishes each notification with ``sse.publish``, as an application would after
its commit. Run by bench/scale.py:

    BENCH_REDIS_URL=redis://127.0.0.1:6390 gunicorn -k gevent 'bench.baselines.flask_sse_redis:create_app()'
    python -m bench.baselines.flask_sse_redis bridge DATABASE_URL REDIS_URL
"""

from __future__ import annotations

import json
import os
import select
import sys

from flask import Flask
from flask_sse import sse

CHANNEL = "attune_notifications"


def create_app(redis_url: str | None = None) -> Flask:
    app = Flask(__name__)
    app.config["REDIS_URL"] = redis_url or os.environ["BENCH_REDIS_URL"]
    app.register_blueprint(sse, url_prefix="/stream")
    return app


def bridge(database_url: str, redis_url: str) -> None:
    """PostgreSQL NOTIFY -> sse.publish, one message per notification."""
    import psycopg2

    app = create_app(redis_url)
    conn = psycopg2.connect(database_url, application_name="bench-flask-sse-bridge")
    conn.autocommit = True
    conn.cursor().execute(f"LISTEN {CHANNEL}")
    print("bridge listening", flush=True)
    with app.app_context():
        while True:
            select.select([conn], [], [])
            conn.poll()
            while conn.notifies:
                payload = conn.notifies.pop(0).payload
                sse.publish(payload, id=json.loads(payload)["event_id"])


if __name__ == "__main__" and sys.argv[1:2] == ["bridge"]:
    bridge(sys.argv[2], sys.argv[3])
