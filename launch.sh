#!/usr/bin/env bash
# One command for everything:
#   ./launch.sh            start the app (creates .venv and installs the pinned requirements on first run)
#   ./launch.sh test       run the whole test suite (extra pytest arguments are passed on; installs Debian's
#                          chromium for the browser test when missing, as root);
#                          ./launch.sh test -m "not slow" is the fast tier developers run after each change
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

# (Re)install when the requirement files change. With an NVIDIA GPU, also what only a GPU uses (8-bit AdamW).
REQS=(requirements.txt requirements-dev.txt)
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && REQS+=(requirements-gpu.txt)
want=$(cat "${REQS[@]}" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install "${REQS[@]/#/-r}"
  echo "$want" > "$STAMP"
fi

# The real-browser test drives Debian's chromium through Playwright (never `playwright install`: that downloads a
# browser). Installed here when missing and we are root with apt-get; otherwise the rest of the suite runs and that
# one test fails with the line to run.
ensure_chromium() {
  [ -x "${CHROMIUM:-/usr/bin/chromium}" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing Debian's chromium for the browser test (once)..."
    if DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
      return 0
    fi
  fi
  echo "Note: chromium is not installed, so the browser test will fail. Install it: sudo apt-get install -y chromium" >&2
}

if [ "${1:-}" = "test" ]; then
  shift
  ensure_chromium
  # Two workers (each test on one thread, so two cores are used), a file's tests together in one worker (their
  # module fixtures: apps, trained runs). TEST_WORKERS=0 runs everything in this process.
  exec "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
fi
if [ "${1:-}" = "bench" ]; then
  shift
  exec "$VENV/bin/python" -m bench.train_step "$@"
fi
exec "$VENV/bin/python" app.py "$@"
