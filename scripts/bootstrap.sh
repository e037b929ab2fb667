#!/usr/bin/env bash
# Create .venv beside the checkout and install attune-sse into it (editable,
# with the test and style extras). Safe to run again: pip skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv with $(python3 --version)"
    python3 -m venv .venv
fi
stamp=.venv/.attune-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    echo "bootstrap: installing attune-sse and its dependencies into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test,style,bench]'
    touch "$stamp"
fi
