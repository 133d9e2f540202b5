#!/usr/bin/env bash
# One command for everything:
#   ./launch.sh            start the app (creates .venv and installs the pinned requirements on first run)
#   ./launch.sh test       run the whole test suite (extra pytest arguments are passed on)
#   ./launch.sh bench      the speed / memory benchmark (python -m bench.train_step; arguments passed on)
#   ./launch.sh ARGS...    any app.py command, e.g. ./launch.sh train --config my.yaml
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PYTHON=${PYTHON:-python3}
STAMP=$VENV/.installed

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "Python 3.10 or newer is needed (found: $("$PYTHON" --version 2>&1)). Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "First run: creating $VENV (a few minutes; torch is large)..."
  "$PYTHON" -m venv "$VENV"
fi

# (Re)install when the requirement files change.
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -r requirements.txt -r requirements-dev.txt
  echo "$want" > "$STAMP"
fi

if [ "${1:-}" = "test" ]; then
  shift
  exec "$VENV/bin/python" -m pytest "$@"
fi
if [ "${1:-}" = "bench" ]; then
  shift
  exec "$VENV/bin/python" -m bench.train_step "$@"
fi
exec "$VENV/bin/python" app.py "$@"
