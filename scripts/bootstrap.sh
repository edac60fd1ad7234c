#!/usr/bin/env bash
# Set up .venv for batchgap: torch first (kept if your Python already has one), then the project.
#   bash scripts/bootstrap.sh          # the tool
#   bash scripts/bootstrap.sh --dev    # the tool, its test dependencies and the benchmarks' peer libraries
#   bash scripts/bootstrap.sh --bench  # the tool and the peer libraries of benchmarks/peers.py
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
extra=""
peers=""
[ "${1:-}" = "--dev" ] && extra="[dev]" && peers=1
[ "${1:-}" = "--bench" ] && peers=1

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    # Your Python already has torch (a CUDA build, say): reuse it rather than install another.
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  # torch 2.13.0 is the CPU build on the reference machine (it lies on disk there); pip picks the
  # build for your platform elsewhere.
  "$PY" -m pip install --quiet "$TORCH_SPEC"
fi
"$PY" -m pip install --quiet -e ".$extra"
if [ -n "$peers" ]; then
  # The peers (loss-landscapes, PyHessian, curvlinops and what they import), pinned, with --no-deps:
  # backpack-for-pytorch requires torchvision, which pip would resolve by replacing a CPU torch with
  # another build; backpack imports fine without it.
  "$PY" -m pip install --quiet --no-deps -r benchmarks/requirements-peers.txt
fi
"$PY" -c "import batchgap, torch; print(f'batchgap {batchgap.__version__} ready (torch {torch.__version__}) in $VENV')"
