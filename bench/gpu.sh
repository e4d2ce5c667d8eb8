#!/usr/bin/env bash
# The whole GPU run in one go, on any machine with an NVIDIA GPU and the project's Python packages (a GPU image
# has torch, torchvision, timm, h5py, scikit-learn...; nothing is downloaded, test images are generated):
#   1. install dinoprobe itself (no dependencies: the machine's own torch stays),
#   2. the `gpu` tests (make test-gpu),
#   3. the benchmark (python -m bench.benchmark) at GPU scale (256 px, batch 256, thousands of generated JPEGs),
#   4. a torch.profiler summary of one `features` pass (bench/profile_features.py), PIL and nvJPEG decoding.
# Everything lands in one folder, OUT (default bench/gpu-run): gpu.log, tests.log, results.json, results.md,
# profile-pil/, profile-torchvision/.
# Usage: bash bench/gpu.sh [OUT]            (PYTHON=python3.12 bash bench/gpu.sh OUT to pick the interpreter;
#        TESTS_TIMEOUT, BENCH_TIMEOUT, PROFILE_TIMEOUT seconds bound each step, so a short lease gets every step;
#        BENCH_ARGS=--no-compile skips the bench's minute or more of compiling; the tests print each result as
#        it comes (-v), so a run cut short by its timeout still says which passed)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-bench/gpu-run}
mkdir -p "$OUT"
LOG=$OUT/gpu.log
export PYTHONUNBUFFERED=1
{
  echo "== $(date -u '+%Y-%m-%d %H:%M UTC') $(uname -n)"
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())" || exit 1
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
    || { echo "pip install -e . failed; using PYTHONPATH=$PWD"; export PYTHONPATH=$PWD; }
  echo "== gpu tests"
  timeout "${TESTS_TIMEOUT:-1800}" "$PY" -m pytest -v --tb=short -rs -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
  tests=${PIPESTATUS[0]}
  echo "== bench (GPU scale)"
  timeout "${BENCH_TIMEOUT:-1800}" "$PY" -m bench.benchmark --scale small --device cuda --out "$OUT" \
    ${BENCH_ARGS:-}; bench=$?
  echo "== profile of one features pass"
  timeout "${PROFILE_TIMEOUT:-600}" "$PY" -m bench.profile_features "$OUT/profile-pil" --device cuda --decoder pil \
    | tail -40; profile=${PIPESTATUS[0]}
  timeout "${PROFILE_TIMEOUT:-600}" "$PY" -m bench.profile_features "$OUT/profile-torchvision" --device cuda \
    --decoder torchvision | tail -40
  echo "== gpu tests exit $tests, bench exit $bench, profile exit $profile"
  exit $(( tests || bench || profile ))
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
