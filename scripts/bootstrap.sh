#!/usr/bin/env bash
# Create .venv beside the checkout and install attune-sse into it (editable,
# with the test, style and bench extras); with --browser, also Debian's Chromium
# for the browser tests (scripts/test asks for it). Safe to run again: what is
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
# The browser tests drive Debian's Chromium (never a browser downloaded by Playwright).
if [ "${1:-}" = --browser ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "bootstrap: installing Debian's chromium for the browser tests"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "bootstrap: /usr/bin/chromium is missing; the browser tests need it: sudo apt-get install chromium" >&2
    fi
fi
