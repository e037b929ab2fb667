"""Starting gunicorn: its command line, the child process, readiness and stop, in one place.

``attune-sse serve`` execs ``gunicorn_argv()``; the demo, the tests'
``ServerProcess`` and the benchmarks start a ``Gunicorn`` child and wait for
it. Readiness is read with the standard library (requests is for the tests
and scripts, not a dependency of the service).
"""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from attune_sse.errors import AttuneError

# gunicorn's settings, as a module of this package: an installed wheel serves without a checkout.
GUNICORN_CONF = "python:attune_sse.serve.gunicorn_conf"


def gunicorn_argv(conf: str = GUNICORN_CONF, *extra: str) -> list[str]:
    """The command line of a gunicorn master with these settings (``extra``: more options, an app)."""
    return [sys.executable, "-m", "gunicorn", "-c", conf, *extra]


def answers(url: str, timeout: float = 2.0, *, cafile: str | None = None) -> bool:
    """Whether ``url`` answers 200 (anything else, or no answer, is False); ``cafile``: the
    certificate an https URL is checked against, if not the system's."""
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return response.status == 200
    except OSError:  # refused, reset, or an HTTPError (a 503 while the workers start)
        return False


class Gunicorn:
    """A gunicorn master started as a child process."""

    def __init__(self, env: Mapping[str, str], *, conf: str = GUNICORN_CONF, extra: tuple[str, ...] = (),
                 cwd: str | Path | None = None, output: IO[Any] | None = None) -> None:
        self.process = subprocess.Popen(gunicorn_argv(conf, *extra), env=dict(env), cwd=cwd, stdout=output,
                                        stderr=subprocess.STDOUT if output is not None else None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, url: str, timeout: float = 60.0, *, ready: Callable[[], bool] | None = None,
                   why: Callable[[], str] = lambda: "see the lines above", cafile: str | None = None) -> None:
        """Until ``url`` answers 200 and ``ready()`` (if given) holds; AttuneError if the master exits
        first or ``timeout`` passes (``why()`` adds what to look at)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AttuneError(f"gunicorn exited with {self.process.returncode}: {why()}")
            if answers(url, cafile=cafile) and (ready is None or ready()):
                return
            if time.monotonic() > deadline:
                raise AttuneError(f"gunicorn was not ready within {timeout:.0f} s: {why()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a graceful stop: streams end with a retry:), SIGKILL after ``timeout``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

