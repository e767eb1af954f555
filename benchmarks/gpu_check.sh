#!/usr/bin/env bash
# The GPU check on a fresh GPU machine, with that machine's own Python (torch, timm, ...):
#
#   benchmarks/gpu_check.sh [OUT_DIR] [--tiny] [--deadline S] [--scale F] [--phases a,b]
#
# chexops is not installed there: it runs from src/ (PYTHONPATH). Wheels for Python modules the
# machine lacks go in $CHEXOPS_WHEELS (default shared/wheels); they are installed first, into a
# scratch folder (no index, no dependencies), never into the machine's own site-packages.
# $PYTHON picks the interpreter (default: python3, else python). See benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-$(command -v python3 || command -v python)}"
WHEELS="${CHEXOPS_WHEELS:-shared/wheels}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/chexops-gpu-check-site"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$PY" benchmarks/gpu_check.py "$@"
