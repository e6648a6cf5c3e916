#!/usr/bin/env bash
# Everything a first GPU must show, in one command (about 8 minutes at most):
#
#   bash scripts/gpu_check.sh
#
# On a machine with one CUDA GPU and torch, triton, pybind11, ninja already installed (nothing
# is downloaded: pip runs with --no-index). In order, each part bounded in time, each going on
# when an earlier one failed:
#   1. build ppfast in place (with its CUDA parts; if that fails, without them, and says so)
#   2. pytest -m cuda                          the CUDA tests (executor streams, Pipe on a GPU)
#   3. the Triton kernels, natively            their tests on cuda, every dtype
#   4. the kernel benchmarks                   against torch and a bare GEMM
#   5. ppfast bench p2p --mode local           overlap of a transfer with compute
#   6. ppfast demo --device cuda               pipelined training on the GPU
# Results go to bench/results/gpu_*.json (each names the device), and to $OUT when it is set.
# A table of what passed and where the figures are is printed at the end.
#   PYTHON      the interpreter (default python3)
#   GPU_CHECK_PARTS  which parts to run, e.g. "2 3" (default: all)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
PARTS=${GPU_CHECK_PARTS:-"1 2 3 4 5 6"}
RESULTS=bench/results
LOGS=$(mktemp -d)
mkdir -p "$RESULTS"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

declare -a SUMMARY=()
want() { [[ " $PARTS " == *" $1 "* ]]; }
# run NAME SECONDS CMD...: bounded, logged, never stops the script
run() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  printf '\n==> %s (limit %ss)\n' "$name" "$limit"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict="timed out"
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="failed ($rc)"
  SUMMARY+=("$(printf '%-22s %-12s %4ss' "$name" "$verdict" $((SECONDS - t0)))")
  return "$rc"
}

device=$("$PY" - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: this script checks a GPU")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory // 2**30} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
) || { echo "gpu_check: no CUDA device (or no torch); nothing to check" >&2; exit 2; }
echo "device: $device"
tag=$(echo "$device" | cut -d, -f1 | tr -c 'A-Za-z0-9\n' '_' | tr 'A-Z' 'a-z' | sed 's/_*$//')

if want 1; then
  # one build serves CPU and CUDA (device-generic C++), so no CUDA toolkit is involved
  run build 300 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi

if want 2; then
  run pytest-cuda 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests \
    --junitxml="$LOGS/cuda.xml"
fi

if want 3; then
  run triton-kernels 120 "$PY" -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_kernel_weight_grad.py tests/test_kernel_input_grad.py
fi

if want 4; then
  run bench-weight-grad 90 "$PY" bench/bench_kernel_weight_grad.py --rounds 5 \
    --out "$RESULTS/gpu_${tag}_kernel_weight_grad.json"
  run bench-input-grad 60 "$PY" bench/bench_kernel_input_grad.py --rounds 5 \
    --out "$RESULTS/gpu_${tag}_kernel_input_grad.json"
fi

if want 5; then
  run p2p-local 60 "$PY" -m ppfast bench p2p --mode local \
    --json "$RESULTS/gpu_${tag}_p2p_local.json"
fi

if want 6; then
  run demo-cuda 120 "$PY" -m ppfast demo --device cuda --out "$LOGS/demo" &&
    for f in "$LOGS"/demo/*.json; do
      [[ -e "$f" ]] && cp "$f" "$RESULTS/gpu_${tag}_demo_$(basename "$f")"
    done
fi

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT/results" "$OUT/logs"
  cp "$RESULTS"/gpu_"${tag}"_* "$OUT/results/" 2>/dev/null
  cp -r "$LOGS"/. "$OUT/logs/"
fi

printf '\n==> gpu_check on %s\n' "$device"
printf '%s\n' "${SUMMARY[@]}"
ls "$RESULTS"/gpu_"${tag}"_* 2>/dev/null | sed 's/^/  /'
for line in "${SUMMARY[@]}"; do
  [[ "$line" == *" ok "* ]] || exit 1
done
