#!/usr/bin/env bash
# The whole GPU run in one go, on any machine with an NVIDIA GPU and the project's Python packages (a GPU image
# has torch, torchvision, timm, h5py, scikit-learn...; nothing is downloaded, test images are generated):
#   1. install dinoprobe itself (no dependencies: the machine's own torch stays),
#   2. the `gpu` tests (make test-gpu),
#   3. the benchmark (python -m bench.benchmark) at GPU scale (256 px, batch 256, thousands of generated JPEGs),
# writing bench/results-gpu.json (the schema of bench/results.json), bench/results-gpu.md and bench/gpu.log.
# Usage: bash bench/gpu.sh            (PYTHON=python3.12 bash bench/gpu.sh to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=bench/gpu.log
export PYTHONUNBUFFERED=1
{
  echo "== $(date -u '+%Y-%m-%d %H:%M UTC') $(uname -n)"
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))" || exit 1
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
    || { echo "pip install -e . failed; using PYTHONPATH=$PWD"; export PYTHONPATH=$PWD; }
  echo "== gpu tests"
  "$PY" -m pytest -q -m gpu tests -p no:cacheprovider; tests=$?
  echo "== bench (GPU scale)"
  "$PY" -m bench.benchmark --scale small --device cuda --out bench/gpu-run; bench=$?
  if [ -f bench/gpu-run/results.json ]; then
    cp bench/gpu-run/results.json bench/results-gpu.json
    cp bench/gpu-run/results.md bench/results-gpu.md
  fi
  echo "== gpu tests exit $tests, bench exit $bench"
  exit $(( tests || bench ))
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
