"""gunicorn settings for attune-sse: ``gunicorn -c python:attune_sse.serve.gunicorn_conf``
(the checkout's ``gunicorn.conf.py`` imports this module).

The attune-sse config file comes from ATTUNE_CONFIG (``attune-sse serve -c``
sets it); ATTUNE__SECTION__KEY variables override its keys.

Worker life cycle: the master starts the embedded PostgreSQL if asked and
applies migrations; each worker is forked, patched for gevent (monkey patching
by the gevent worker, psycopg2 by ``post_fork``), then builds the app, which
joins the instance's relay: one worker leads and LISTENs for all (``preload_app = False``). When a worker is told
to stop, its streams end at once, so a restart waits for nothing.
"""

import os
import sys

from attune_sse.config import load_config, log_level_name
from attune_sse.errors import AttuneError
from attune_sse.serve import hooks

try:
    _config = load_config()
except AttuneError as exc:
    print(f"attune-sse: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

wsgi_app = "attune_sse.app:create_app()"
bind = [f"{_config['server.host']}:{_config['server.port']}"]
if _config["server.certfile"]:
    # HTTPS: streams then go through gunicorn's TLS socket only (no direct writes, stream.py).
    certfile = _config["server.certfile"]
    keyfile = _config["server.keyfile"] or None
workers = _config["server.workers"]
worker_class = "gevent"
# Streams are long-lived connections: 10,000 per worker by default (on_starting lifts
# the open-file limit to match). A worker past it stops accepting, the others take over.
worker_connections = _config["server.worker_connections"]
# Room for a burst of reconnects (clients of a restarted instance); the kernel caps it at somaxconn.
backlog = 4096
# The app, and with it the relay (and the LISTEN of the worker that leads), is made in each worker after fork.
preload_app = False
# For gevent workers this is not a request timeout (streams last for hours): it is
# the heartbeat. The worker's main greenlet notifies the master every second; a
# worker whose event loop is blocked this long (an unpatched blocking call, a
# runaway loop) is killed and replaced.
timeout = 30
# Streams end at once when a worker stops (post_worker_init), each with a retry:
# spread over server.sse_reconnect_spread_ms; this only bounds a stuck request.
graceful_timeout = _config["server.graceful_timeout"]
keepalive = 5
proc_name = "attune-sse"
loglevel = log_level_name(_config).lower()
errorlog = "-"
accesslog = os.environ.get("ATTUNE_ACCESS_LOG", "-")
# %(U)s is the path without the query string: the stream's ?token= never reaches a log.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%(a)s"'
# Escapes control characters and quotes in what the client sent (a path may hold a line break).
logger_class = hooks.AccessLogger
logconfig_dict = hooks.logging_config(_config)

on_starting = hooks.on_starting
when_ready = hooks.when_ready
on_exit = hooks.on_exit
child_exit = hooks.child_exit
post_fork = hooks.post_fork
post_worker_init = hooks.post_worker_init

# gunicorn's control socket lives at one fixed path per user: several instances
# on one machine (tests, side-by-side deployments) would fight over it.
control_socket_disable = True
