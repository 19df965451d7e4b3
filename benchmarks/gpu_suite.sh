#!/usr/bin/env bash
# Every GPU check of the project, in one prepared script that fits a short GPU lease (~9 minutes
# on one H100/H200), each part writing its results as it finishes:
#
#   1. the CUDA tests (tests that need a GPU skip themselves on a CPU);
#   2. the search benchmark on the device          -> search_cuda_quick.{json,md}
#   3. the search against its bare-FFT bound       -> fft_bound.{json,md}
#   4. the training-throughput benchmark           -> train_throughput_cuda.{json,md}
#   5. the budgeted reproduction (stn.reproduce_budget) -> reproduction.{json,md}, canonical_pose.png
#   6. torchvision resnet50 layer3, 1,000 images, 360 angles x all shifts -> resnet50.{json,md}
#      (when torchvision imports; recorded as skipped otherwise)
#
# Usage:
#   benchmarks/gpu_suite.sh                 # on the GPU machine: results in benchmarks/results/gpu
#   benchmarks/gpu_suite.sh --tiny          # the same parts at a tiny size on the CPU (CI runs this)
#   benchmarks/gpu_suite.sh --out DIR       # write elsewhere
#
# A part that fails is recorded in suite.md and the later parts still run; the exit status is
# non-zero when any part failed. --tiny writes to a temporary folder unless --out is given.
set -uo pipefail
cd "$(dirname "$0")/.."

tiny=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) tiny=1 ;;
    --out) [ $# -ge 2 ] || { echo "gpu_suite.sh: error: --out needs a folder" >&2; exit 2; }; out="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: error: unknown argument '$1'; valid: --tiny, --out DIR, --help" >&2; exit 2 ;;
  esac
  shift
done

py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
if [ "$tiny" = 1 ]; then
  out="${out:-${TMPDIR:-/tmp}/gpu_suite_tiny}"
  device=cpu
  search_args=(--tiny --device cpu)
  fft_args=(--tiny --device cpu)
  train_args=(--tiny --device cpu)
  resnet_args=(--tiny --device cpu)
  budget=tiny
else
  out="${out:-benchmarks/results/gpu}"
  device=cuda
  search_args=(--quick --device cuda)
  fft_args=(--device cuda)
  train_args=(--device cuda)
  resnet_args=(--device cuda --images 1000 --layers layer3 --angles 360)
  budget=gpu
  "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "gpu_suite.sh: error: no CUDA device (use --tiny for the CPU smoke run)" >&2; exit 2; }
fi
mkdir -p "$out"
summary="$out/suite.md"
{
  echo "# GPU suite ($([ "$tiny" = 1 ] && echo 'tiny, CPU' || echo 'GPU'))"
  echo
  echo "Started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname); $("$py" -c 'import torch; print("torch", torch.__version__, "/", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')."
  echo
  echo "| part | result | seconds |"
  echo "|---|---|---|"
} > "$summary"

status=0
part() {  # part NAME COMMAND...: run, log to NAME.log, record the result
  local name="$1"; shift
  local t0=$SECONDS
  echo "== $name: $*"
  if "$@" > "$out/$name.log" 2>&1; then r=ok; else r="FAILED (see $name.log)"; status=1; fi
  echo "| $name | $r | $((SECONDS - t0)) |" >> "$summary"
  echo "   $name: $r ($((SECONDS - t0)) s)"
}

export HYPOTHESIS_PROFILE=ci
# every numeric test that takes the `device` fixture (tests/conftest.py), on CUDA, and the CUDA tests
part cuda-tests "$py" -m pytest -q -p no:cacheprovider tests/test_warp.py tests/test_search.py tests/test_geometry.py \
  tests/test_metric.py tests/test_region.py tests/test_cuda.py -k "cuda or device"
part search-bench "$py" benchmarks/bench_search.py "${search_args[@]}" --out "$out"
part fft-bound "$py" benchmarks/bench_fft_bound.py "${fft_args[@]}" --out "$out"
part train-bench "$py" benchmarks/bench_train.py "${train_args[@]}" --out "$out"
part reproduction "$py" -m stn reproduce --budget "$budget" --device "$device" --results "$out" \
  --out "$out/runs"
if "$py" -c 'import torchvision' > /dev/null 2>&1; then
  part resnet50 "$py" benchmarks/bench_resnet50.py "${resnet_args[@]}" --out "$out"
else
  echo "| resnet50 | skipped: torchvision does not import (make test-models builds .venv-models) | 0 |" >> "$summary"
  echo "   resnet50: skipped (torchvision does not import)"
fi
echo "wrote $summary"
exit $status
