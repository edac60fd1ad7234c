#!/usr/bin/env bash
# The GPU path, proven on a machine with a CUDA device (issue 27), in under 8 minutes on one H100:
#   1. install batchgap as the README says (scripts/bootstrap.sh --dev, which reuses the machine's torch),
#      or reuse a .venv that already imports this tree's batchgap, torch and pytest;
#   2. the tests marked gpu (tests/test_gpu.py: every measure on CUDA against the CPU, training on CUDA,
#      --device cuda, torchrun with NCCL on min(2, GPUs) ranks);
#   3. batchgap run keskar-c1 --quick --device cuda (on fake CIFAR-10 files when the real ones are not
#      here and cannot be downloaded: said so in the output);
#   4. the default study on the GPU;
#   5. a table of times with the GPU's name (benchmarks/gpu_times.py: C1 training images/s at SB and LB,
#      one HVP, one eps-sharpness solve).
# Each step runs under `timeout` with its own budget (install 90 s, tests 120 s, keskar-c1 60 s, the default
# study what is left of 400 s, the table 45 s: at most about 460 s in all); a step that fails or runs out is
# reported and the next one runs; the exit code is 1 when any step failed. Without CUDA: the table on the CPU
# at tiny sizes (a smoke test of the same code), the GPU steps listed as they would run, a clear line, exit 0.
#
#   bash scripts/gpu-check.sh
# Environment: PYTHON (default python3) and VENV (default .venv) as for bootstrap.sh; GPU_CHECK_PYTHON: use
# this interpreter as it is (no install; with PYTHONPATH=src for a checkout); GPU_CHECK_OUT: where the
# studies write (default: a temporary directory, removed at the end). A machine without network: pip's own
# PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR (a folder of wheels: the dependencies, the dev extra, setuptools) make the
# install read DIR; without them the install fails fast and the check goes on with $PYTHON and src/ on
# PYTHONPATH when that Python has the dependencies already.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
export PIP_DEFAULT_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-15} PIP_RETRIES=${PIP_RETRIES:-1}  # an offline machine fails fast
failed=()
summary=()

say() { echo "gpu-check: $*"; }
step() {  # step NAME SECONDS COMMAND...: run COMMAND under timeout, record how it went and how long it took
  local name=$1 budget=$2 t0=$SECONDS rc
  shift 2
  say "== $name (budget ${budget} s): $*"
  timeout --kill-after=10 "$budget" "$@"
  rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then
    summary+=("| $name | ok | ${took} s |")
  else
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && rc="timed out after ${budget} s" || rc="exit code $rc"
    summary+=("| $name | FAILED: $rc | ${took} s |")
    failed+=("$name")
  fi
}

# 1. the interpreter
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY=$GPU_CHECK_PYTHON
  say "using $PY as it is (GPU_CHECK_PYTHON; no install)"
else
  VENV=${VENV:-.venv}
  ready() { "$1" -c "import batchgap, torch, pytest, os, sys; sys.exit(not batchgap.__file__.startswith(os.getcwd()))" \
              2>/dev/null; }
  if [ -x "$VENV/bin/python" ] && ready "$VENV/bin/python"; then
    say "reusing $VENV (it imports this tree's batchgap, torch and pytest)"
    PY=$VENV/bin/python
  else
    step "install (bash scripts/bootstrap.sh --dev)" 90 bash scripts/bootstrap.sh --dev
    PY=$VENV/bin/python
    if ! { [ -x "$PY" ] && ready "$PY"; }; then
      # No network, say: this tree on the path of a Python that has the dependencies already.
      PY=${PYTHON:-python3}
      export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
      if ! "$PY" -c "import batchgap, torch, numpy, scipy, matplotlib, tqdm, mnist1d, pytest" 2>/dev/null; then
        say "error: the install failed and $PY lacks batchgap's dependencies:"
        "$PY" -c "import batchgap, torch, numpy, scipy, matplotlib, tqdm, mnist1d, pytest" 2>&1 | tail -1
        exit 1
      fi
      say "the install failed; going on with $PY and PYTHONPATH=$PWD/src"
    fi
  fi
fi

OUT=${GPU_CHECK_OUT:-}
if [ -z "$OUT" ]; then
  OUT=$(mktemp -d)
  trap 'rm -rf "$OUT"' EXIT
fi
gpu_steps=(
  "$PY -m pytest -q -p no:xdist -o addopts= -m gpu tests/test_gpu.py"
  "$PY -m batchgap run keskar-c1 --quick --device cuda --out $OUT/keskar-c1-quick"
  "$PY -m batchgap run default --device cuda --out $OUT/default"
  "$PY benchmarks/gpu_times.py --device cuda"
)

cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()), f'torch {torch.__version__}, CUDA ' \
f'{torch.version.cuda}, {torch.cuda.device_count()} CUDA device(s)')") \
  || { say "error: $PY cannot import torch"; exit 1; }
say "${cuda#* }"
cuda=${cuda%% *}
if [ "$cuda" != 1 ]; then
  say "no CUDA device here (torch.cuda.is_available() is False): the CPU smoke path only"
  step "times at tiny sizes on the CPU (benchmarks/gpu_times.py --device cpu --tiny)" 90 \
    "$PY" benchmarks/gpu_times.py --device cpu --tiny
  for s in "${gpu_steps[@]}"; do say "would run: $s"; done
  say "no CUDA device: ran the CPU smoke path only; the gpu tests, the studies and the table on a GPU need one"
  [ ${#failed[@]} -eq 0 ] || { say "FAILED: ${failed[*]}"; exit 1; }
  exit 0
fi

"$PY" -c "import torch; [print(f'gpu-check: cuda:{i} {torch.cuda.get_device_name(i)}') \
for i in range(torch.cuda.device_count())]" || true

# 2. the tests marked gpu
step "tests marked gpu" 120 ${gpu_steps[0]}

# 3. keskar-c1 --quick on the GPU: the real CIFAR-10 files, a download, else fake files in the official format
if "$PY" - <<'PYEOF' 2>/dev/null; then
import sys
from batchgap.data import files
sys.exit(not (files.resolve_data_dir(None) / "cifar10" / "cifar-10-python.tar.gz").exists())
PYEOF
  step "batchgap run keskar-c1 --quick --device cuda" 60 ${gpu_steps[1]}
elif timeout 45 "$PY" -m batchgap data download cifar10 >/dev/null 2>&1; then
  step "batchgap run keskar-c1 --quick --device cuda (CIFAR-10 downloaded)" 60 ${gpu_steps[1]}
else
  say "no CIFAR-10 files here and no download: keskar-c1 --quick runs on fake files in the official format"
  step "batchgap run keskar-c1 --quick --device cuda (FAKE CIFAR-10 files: tests/data_fixtures.py)" 60 \
    "$PY" - "$OUT" <<'PYEOF'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from data_fixtures import write_fake_cifar10  # noqa: E402

from batchgap.cli import main  # noqa: E402
from batchgap.data import files  # noqa: E402

out = Path(sys.argv[1])
for path in write_fake_cifar10(out / "fake-data", n_train=256, n_test=128):  # --jobs 1: trusted here only
    files.CHECKSUMS[path.name] = files.md5sum(path)
sys.exit(main(["run", "keskar-c1", "--quick", "--device", "cuda", "--jobs", "1",
               "--data-dir", str(out / "fake-data"), "--out", str(out / "keskar-c1-quick")]))
PYEOF
fi

# 4. the default study on the GPU: what is left of 400 s (45 s stay for the table), at least 60 s
left=$((400 - (SECONDS - START)))
[ $left -ge 60 ] || left=60
step "batchgap run default --device cuda" $left ${gpu_steps[2]}

# 5. the table of times
step "times (benchmarks/gpu_times.py --device cuda)" 45 ${gpu_steps[3]}

echo
echo "| step | result | wall |"
echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
say "$((SECONDS - START)) s in all"
[ ${#failed[@]} -eq 0 ] || { say "FAILED: ${failed[*]}"; exit 1; }
