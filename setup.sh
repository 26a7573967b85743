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
# without their declared opencv-python (the GUI build, which would overwrite the headless cv2)
.venv/bin/python -m pip install -q --no-deps -c requirements.lock -r requirements-nodeps.txt
if .venv/bin/python -m pip show -q opencv-python 2>/dev/null; then  # a venv made before this rule
  .venv/bin/python -m pip uninstall -q -y opencv-python
  .venv/bin/python -m pip install -q --force-reinstall --no-deps -c requirements.lock opencv-python-headless
fi
# DeepSpeed compiles its CPU Adam op with g++ on first use (35-65 s): once here, into the cache every
# later training run (and test) finds, instead of inside whichever test trains first.
# SKIP_DS_OP_BUILD=1 skips it (the first training then builds it).
if [ -z "${SKIP_DS_OP_BUILD:-}" ]; then
  DS_ACCELERATOR=cpu .venv/bin/python -c 'from deepspeed.ops.op_builder.cpu import CPUAdamBuilder; CPUAdamBuilder().load(verbose=False)' \
    >/dev/null || echo "setup: DeepSpeed's CPU Adam op did not build here; the first training will try again" >&2
fi
echo "ready: $(.venv/bin/motioncharacter --version 2>/dev/null || echo motioncharacter) in ./.venv"
