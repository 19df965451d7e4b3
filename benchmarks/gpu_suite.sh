#!/usr/bin/env bash
# Every GPU check of the project, in one prepared script that fits a short GPU lease by construction:
# each part runs under a time cap (benchmarks/suite_plan.py: the caps of a GPU run add up to under 10 minutes),
# and writes its results as it goes, so a part that runs out of time leaves what it has.
#
#   0. plan: the calibration step, on the device: its prices and each part's op counts, hence each
#      part's estimated time, and the size of the resnet50 part  -> plan.{json,md}
#   1. the CUDA tests (tests that need a GPU skip themselves on a CPU) -> cuda-tests.xml
#   2. the search benchmark on the device          -> search_cuda_quick.{json,md}
#   3. the search against its bare-FFT bound       -> fft_bound.{json,md}
#   4. the training-throughput benchmark           -> train_throughput_cuda.{json,md}
#   5. the budgeted reproduction (stn.reproduce_budget) -> reproduction.{json,md}, canonical_pose.png
#   6. torchvision resnet50 layer2, 360 angles x all shifts, as many of 1,000 images as the plan
#      fits in 70% of the part's cap -> resnet50.{json,md} (skipped when torchvision does not import)
#
# Usage:
#   benchmarks/gpu_suite.sh                 # on the GPU machine: results in benchmarks/results/gpu
#   benchmarks/gpu_suite.sh --plan          # only the plan: each part's estimated time, and the total
#   benchmarks/gpu_suite.sh --tiny          # the same parts at a tiny size on the CPU (make test runs it)
#   benchmarks/gpu_suite.sh --out DIR       # write elsewhere
#   benchmarks/gpu_suite.sh --parts a,b     # only these parts (the plan always runs, counting only these)
#   benchmarks/gpu_suite.sh --cap PART=S    # another cap for a part, in seconds (repeatable)
#
# suite.md has, per part, its result (ok, FAILED, or "capped" when its cap stopped it), its time and
# the plan's estimate. A part that fails is recorded and the later parts still run; the exit status
# is non-zero when any part failed (a capped part is not a failure: it wrote what it had).
# --tiny writes to a temporary folder unless --out is given.
set -uo pipefail
cd "$(dirname "$0")/.."

tiny=0
plan_only=0
out=""
only=""
cap_args=()
all_parts="cuda-tests,search-bench,fft-bound,train-bench,reproduction,resnet50"
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) tiny=1 ;;
    --plan) plan_only=1 ;;
    --out) [ $# -ge 2 ] || { echo "gpu_suite.sh: error: --out needs a folder" >&2; exit 2; }; out="$2"; shift ;;
    --parts) [ $# -ge 2 ] || { echo "gpu_suite.sh: error: --parts needs a list; valid parts: $all_parts" >&2; exit 2; }
             only="$2"; shift
             for p in ${only//,/ }; do
               case ",$all_parts," in *",$p,"*) ;; *) echo "gpu_suite.sh: error: --parts: unknown part '$p'; valid parts: $all_parts" >&2; exit 2 ;; esac
             done ;;
    --cap) [ $# -ge 2 ] || { echo "gpu_suite.sh: error: --cap needs PART=SECONDS" >&2; exit 2; }; cap_args+=(--cap "$2"); shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_suite.sh: error: unknown argument '$1'; valid: --tiny, --plan, --out DIR, --parts LIST, --cap PART=SECONDS, --help" >&2; exit 2 ;;
  esac
  shift
done

py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
tiny_flag=()
if [ "$tiny" = 1 ]; then
  out="${out:-${TMPDIR:-/tmp}/gpu_suite_tiny}"
  device=cpu
  tiny_flag=(--tiny)
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
  resnet_args=(--device cuda --layers layer2 --angles 360)
  budget=gpu
  "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "gpu_suite.sh: error: no CUDA device (use --tiny for the CPU smoke run)" >&2; exit 2; }
fi

declare -A cap
caps_text="$("$py" benchmarks/suite_plan.py --caps "${tiny_flag[@]}" "${cap_args[@]}")" || exit 2
while read -r name seconds; do cap[$name]=$seconds; done <<< "$caps_text"

mkdir -p "$out"
if [ "$plan_only" = 1 ]; then
  exec timeout -k 10 "${cap[plan]}" "$py" benchmarks/suite_plan.py "${tiny_flag[@]}" "${cap_args[@]}" \
    ${only:+--parts "$only"} --device "$device" --json "$out/plan.json"
fi

summary="$out/suite.md"
{
  echo "# GPU suite ($([ "$tiny" = 1 ] && echo 'tiny, CPU' || echo 'GPU'))"
  echo
  echo "Started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname); $("$py" -c 'import torch; print("torch", torch.__version__, "/", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')."
  echo "Estimates: plan.md (each part's op counts at this device's measured prices)."
  echo
  echo "| part | result | seconds | estimate | cap |"
  echo "|---|---|---|---|---|"
} > "$summary"

estimate() {  # estimate PART: the plan's estimate of a part, in seconds ("-" when it has none)
  "$py" -c 'import json, sys
p = json.load(open(sys.argv[1]))["parts"].get(sys.argv[2], {})
e = p.get("estimate")
print("-" if e is None else f"{e:.0f}")' "$out/plan.json" "$1" 2>/dev/null || echo "-"
}

status=0
part() {  # part NAME COMMAND...: run under its cap, log to NAME.log, record the result
  local name="$1"; shift
  local t0=$SECONDS rc
  echo "== $name (cap ${cap[$name]} s): $*"
  timeout -s INT -k 15 "${cap[$name]}" "$@" > "$out/$name.log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then r=ok
  elif [ $rc = 124 ] || [ $rc = 137 ]; then r="capped at ${cap[$name]} s (wrote what it had; see $name.log)"
  else r="FAILED (see $name.log)"; status=1; fi
  echo "| $name | $r | $((SECONDS - t0)) | $(estimate "$name") | ${cap[$name]} |" >> "$summary"
  echo "   $name: $r ($((SECONDS - t0)) s)"
}
wanted() { [ -z "$only" ] || case ",$only," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

export HYPOTHESIS_PROFILE=ci
part plan "$py" benchmarks/suite_plan.py "${tiny_flag[@]}" "${cap_args[@]}" ${only:+--parts "$only"} \
  --device "$device" --json "$out/plan.json"
# every numeric test that takes the `device` fixture (tests/conftest.py), on CUDA, and the CUDA tests
wanted cuda-tests && part cuda-tests "$py" -m pytest -q -p no:cacheprovider --junitxml "$out/cuda-tests.xml" \
  tests/test_warp.py tests/test_search.py tests/test_geometry.py tests/test_metric.py tests/test_region.py \
  tests/test_cuda.py -k "cuda or device"
wanted search-bench && part search-bench "$py" benchmarks/bench_search.py "${search_args[@]}" --out "$out"
wanted fft-bound && part fft-bound "$py" benchmarks/bench_fft_bound.py "${fft_args[@]}" --out "$out"
wanted train-bench && part train-bench "$py" benchmarks/bench_train.py "${train_args[@]}" --out "$out"
wanted reproduction && part reproduction "$py" -m stn reproduce --budget "$budget" --device "$device" \
  --results "$out" --out "$out/runs"
if wanted resnet50; then
  if "$py" -c 'import torchvision' > /dev/null 2>&1; then
    images="$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["parts"]["resnet50"].get("images") or 0)' \
      "$out/plan.json" 2>/dev/null || echo 0)"
    [ "$images" -ge 1 ] 2>/dev/null || images=$([ "$tiny" = 1 ] && echo 2 || echo 100)
    part resnet50 "$py" benchmarks/bench_resnet50.py "${resnet_args[@]}" --images "$images" --out "$out"
  else
    echo "| resnet50 | skipped: torchvision does not import (make test-models builds .venv-models) | 0 | - | ${cap[resnet50]} |" >> "$summary"
    echo "   resnet50: skipped (torchvision does not import)"
  fi
fi
echo "wrote $summary"
exit $status
