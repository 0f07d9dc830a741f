#!/usr/bin/env bash
# The GPU check of issue 21: one command, one Markdown report (docs/performance.md, "GPU check").
#
#   benchmarks/gpu_check.sh                  # one CUDA GPU: full-size configs, random weights (< 8 min on an H200-class GPU)
#   benchmarks/gpu_check.sh --dry-run        # CPU, tiny configs: every code path (no GPU needed)
#   benchmarks/gpu_check.sh --out report.md
#
# It runs benchmarks/gpu_check.py (text2img ours vs diffusers in fp16 / bf16 at 512 and 768 px, the UNet
# step's TFLOP/s, peak CUDA memory per offload mode, torch.compile on / off, the preset fast against
# reference), then the tests that only run on CUDA, and appends their summary to the report.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=""
OUT="gpu_report.md"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY="--dry-run"; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: benchmarks/gpu_check.sh [--dry-run] [--out REPORT.md]" >&2; exit 2 ;;
  esac
done
python benchmarks/gpu_check.py $DRY --out "$OUT"
{
  echo "## CUDA-only tests"
  echo
  if [ -n "$DRY" ]; then
    echo "(dry run: collected, not run)"
    echo '```'
    python -m pytest -q -n 0 --collect-only -k cuda tests/test_offload.py tests/test_samplers.py tests/test_schedule.py tests/test_cli.py 2>&1 | tail -3
    echo '```'
  else
    echo '```'
    python -m pytest -q -n 0 -rs -k cuda tests/test_offload.py tests/test_samplers.py tests/test_schedule.py tests/test_cli.py 2>&1 | tail -15 || true
    echo '```'
  fi
} >> "$OUT"
echo "wrote $OUT" >&2
