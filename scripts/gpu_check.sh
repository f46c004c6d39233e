#!/usr/bin/env bash
# GPU check, under 8 minutes on one GPU: the oracle test subset on CUDA, then the efficiency benchmark
# (LLaVA-1.5-7B shape, peer columns, LLaVA-NeXT batch) with CUDA-event timings.
#
#   scripts/gpu_check.sh             # needs a CUDA device; results under $OUT (default ./gpu_check_out)
#   scripts/gpu_check.sh --dry-run   # prints the plan (commands, time limits) and runs nothing
#
# Time limits (seconds) add up to 450 < 480: oracle subset 180, benchmark 270.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-gpu_check_out}
ORACLE_S=180
BENCH_S=270
ORACLES=(tests/test_attention_tap.py tests/test_decoder_signals.py tests/methods/test_fastv_golden.py
         tests/methods/test_hiprune_policy.py tests/methods/test_transprune_golden.py tests/eval/test_peers.py)

run() {
  echo "+ $*"
  if [[ $DRY == 0 ]]; then "$@"; fi
}

if [[ $DRY == 0 ]]; then
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device (use --dry-run to see the plan)')"
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" || true
fi
echo "# budget: oracles ${ORACLE_S} s + benchmark ${BENCH_S} s = $((ORACLE_S + BENCH_S)) s"
run env VTPRUNE_TEST_DEVICE=cuda OMP_NUM_THREADS=4 timeout "$ORACLE_S" \
  python -m pytest -q -x -p no:cacheprovider "${ORACLES[@]}"
run timeout "$BENCH_S" python scripts/efficiency_benchmark.py --device cuda --shape llava-1.5-7b --quick \
  --json "$OUT/efficiency_gpu.json"
