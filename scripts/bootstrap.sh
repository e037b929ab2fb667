#!/usr/bin/env bash
# Create .venv beside the checkout and install attune-sse into it (editable,
# with the test, style and bench extras); with --browser, also Debian's Chromium
# and redis-server for the tests (scripts/test asks for it). Safe to run again: what is
# there is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv with $(python3 --version)"
    python3 -m venv .venv
fi
stamp=.venv/.attune-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    echo "bootstrap: installing attune-sse and its dependencies into .venv"
    # pip's and setuptools' notices go to a log, shown only if the install fails.
    if ! { .venv/bin/python -m pip install --quiet --upgrade pip \
           && .venv/bin/python -m pip install --quiet -e '.[test,style,bench]'; } > .venv/install.log 2>&1; then
        cat .venv/install.log >&2
        echo "bootstrap: installing failed (the lines above; also in .venv/install.log)" >&2
        exit 1
    fi
    touch "$stamp"
fi
# The browser tests drive Debian's Chromium (never a browser downloaded by Playwright); the
# broker tests start their own redis-server (events.fanout: redis).
if [ "${1:-}" = --browser ]; then
    missing=()
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "bootstrap: installing Debian's ${missing[*]} for the tests"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "bootstrap: the tests need ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
        fi
    fi
fi
