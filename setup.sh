#!/usr/bin/env bash
# Create ./.venv and install the project with its pinned dependencies (idempotent).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do command -v "$c" >/dev/null && { PY="$c"; break; }; done
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' 
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# requirements.lock pins the whole dependency tree; pyproject pins the direct dependencies.
.venv/bin/python -m pip install -q -c requirements.lock -e ".[dev]"
echo "ready: $(.venv/bin/motioncharacter --version 2>/dev/null || echo motioncharacter) in ./.venv"
