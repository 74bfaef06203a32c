#!/usr/bin/env bash
# GPU measurements in one run (meant to take under 10 minutes on one H200), on a machine with an
# NVIDIA GPU and no network:
#   1. installs what the image lacks from the wheels carried in .whl/ (bench/gpu-requirements.txt
#      says how to build that folder), never from an index;
#   2. the GPU tests (tests/test_gpu.py: the kernel on cuda equals CPU for every family, fp32, 1e-4;
#      device_map over two GPUs when there are two);
#   3. bench/bench_sweep.py --library sweep on a random-weight Pythia-160M (bench/random_pythia.py),
#      all 144 heads, 1M tokens, fp32 then bf16: tokens*heads/s, TFLOP/s and fraction of the chip's
#      peak, peak GPU memory, bf16-vs-fp32 agreement of every quantity and the dtype rule's verdict;
#   4. chapter 1 alone (--no-build: no introduction or scorecard) under the paper profile, the random
#      Pythia-160M directory standing in for the hub model and the embedded corpus for the Pile.
# Everything lands in $GPU_OUT (default bench/.gpu); summary.txt holds the figures for RESULTS.md.
#
#   bash bench/gpu.sh            # the measurement (GPU)
#   bash bench/gpu.sh --small    # the same steps at toy sizes on the CPU (tests/test_bench.py runs it)
# Sizes can be changed with TOKENS, SEQ_LEN, BATCH, MAX_ROWS, BOOK_TOKENS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_OUT:-bench/.gpu}
SMALL=0
[[ "${1:-}" == "--small" ]] && SMALL=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
say() { echo "$*" | tee -a "$SUMMARY"; }
: > "$SUMMARY"

if ! "$PY" -c "import nnsight, datasets, papermill, altair, ipykernel" 2>/dev/null; then
  if [[ ! -d .whl ]]; then
    echo "gpu.sh: nnsight/datasets/papermill/altair missing and no .whl/ folder beside the working tree;" \
         "build it as bench/gpu-requirements.txt says" >&2
    exit 1
  fi
  "$PY" -m pip install --quiet --no-index --find-links .whl -r bench/gpu-requirements.txt
fi

if [[ $SMALL == 1 ]]; then
  DEVICE=cpu; TOKENS=${TOKENS:-256}; SEQ_LEN=${SEQ_LEN:-32}; BATCH=${BATCH:-4}; MAX_ROWS=${MAX_ROWS:-64}
  BOOK=(--device cpu --tokens "${BOOK_TOKENS:-512}" --seq-len 32 --batch-size 4 --top-percent 10)
  PYTHIA=(--small); TOP=10
else
  DEVICE=cuda; TOKENS=${TOKENS:-1000000}; SEQ_LEN=${SEQ_LEN:-128}; BATCH=${BATCH:-64}; MAX_ROWS=${MAX_ROWS:-768}
  BOOK=(--tokens "${BOOK_TOKENS:-1000000}" --seq-len "$SEQ_LEN" --batch-size "$BATCH")
  PYTHIA=(); TOP=2
fi
{ read -r TORCH; read -r CHIP; } < <("$PY" -c "import torch; print(torch.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (CPU run)')")
say "date: $(date -u +%Y-%m-%dT%H:%MZ)  chip: $CHIP  torch: $TORCH"
say "command: bash bench/gpu.sh $*  (TOKENS=$TOKENS SEQ_LEN=$SEQ_LEN BATCH=$BATCH MAX_ROWS=$MAX_ROWS)"

say "== GPU tests"
set +e
"$PY" -m pytest -p no:cacheprovider -q tests/test_gpu.py 2>&1 | tail -n 5 | tee -a "$SUMMARY"
rc_tests=${PIPESTATUS[0]}
set -e

say "== random-weight Pythia-160M"
"$PY" bench/random_pythia.py "$OUT/pythia-160m-random" "${PYTHIA[@]}" | tee -a "$SUMMARY"

say "== bench_sweep.py: all heads, $TOKENS tokens, fp32 and bf16"
BENCH=(bench/bench_sweep.py --model "$OUT/pythia-160m-random" --device "$DEVICE" --library sweep
       --dtypes float32,bfloat16 --tokens "$TOKENS" --seq-len "$SEQ_LEN" --batch-size "$BATCH"
       --max-rows "$MAX_ROWS" --top-percent "$TOP" --random-tokens --scratch "$OUT/scratch"
       --json "$OUT/bench.json")
say "command: python ${BENCH[*]}"
"$PY" "${BENCH[@]}" 2>"$OUT/bench.log" | tee -a "$SUMMARY"

say "== chapter 1 under the paper profile"
BOOKCMD=(-m selfrepair.cli book --profile paper --chapters 01 --model "$OUT/pythia-160m-random"
         --dataset embedded -p featured_heads=null --no-build --out "$OUT/book" --cache-dir "$OUT/results"
         "${BOOK[@]}")
say "command: python ${BOOKCMD[*]}"
start=$(date +%s)
if "$PY" "${BOOKCMD[@]}" > "$OUT/book.log" 2>&1; then
  say "chapter 1: ok ($(( $(date +%s) - start )) s)"
  rc_book=0
else
  say "chapter 1: FAILED ($(( $(date +%s) - start )) s); see $OUT/book.log"
  tail -n 20 "$OUT/book.log" >&2
  rc_book=1
fi
say "GPU tests exit code: $rc_tests"
[[ $rc_tests == 0 || $rc_tests == 5 ]] && [[ $rc_book == 0 ]]
