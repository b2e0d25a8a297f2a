#!/usr/bin/env bash
# One GPU machine's measurements for BENCHMARKS.md "GPU", in one go (a lent GPU has minutes, not hours):
#   1. the codec's GPU options: speed and token agreement against IEEE fp32, and throughput by batch size;
#   2. end to end on FLAC songs: naive loop vs codec limit vs pipeline, then the pipeline at other settings.
# Results (JSON + one log) go to $OUT (default out/gpu). Runs from the repo root:
#   bash benchmarks/gpu_suite.sh                 # on the GPU machine
#   SMALL=1 DEVICE=cpu bash benchmarks/gpu_suite.sh   # a minute-long rehearsal on CPU with the tiny codec
set -u
OUT=${OUT:-out/gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
LOG="$OUT/suite.log"
if [ -n "${SMALL:-}" ]; then
  CODEC=tiny; MIN=0.5; MINS=10; MAXS=20; COPIES=2; ROWS=2; SWEEP=1,2; SETTINGS=fp32,tf32; COMPILE=fp32,tf32
  BIG=60; TO=300
else
  CODEC=full; MIN=${MINUTES:-20}; MINS=60; MAXS=240; COPIES=${COPIES:-12}; ROWS=16; SWEEP=${SWEEP:-8,16,32,64}
  SETTINGS=fp32,tf32,bf16; COMPILE=fp32,tf32+compile,bf16+compile; BIG=960; TO=240
fi
step() { echo "=== $(date +%T) $*" | tee -a "$LOG"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1; nproc; free -g | head -2
  $PY -c "import torch, transformers, pyarrow, soundfile, soxr, av; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'soxr', soxr.__version__,
'libsndfile', soundfile.__libsndfile_version__, 'av', av.__version__)"; } 2>&1 | tee -a "$LOG"

step "fixture codec ($CODEC)"
$PY -c "from benchmarks.run import resolve_codec; print(resolve_codec('$CODEC'))" 2>&1 | tail -1 | tee -a "$LOG"

common=(--device "$DEVICE" --codec $CODEC --format flac --minutes $MIN --min-s $MINS --max-s $MAXS --copies $COPIES
        --unit-size 8 --work /tmp/gpu-bench --timeout $TO)
step "CUDA tests"
[ "$DEVICE" = cuda ] && timeout 240 $PY -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 \
  | grep -v "Loading weights" | tail -25 | tee -a "$LOG"

step "end to end: naive, codec, pipeline (defaults: decode.workers=auto, batch.max_audio_s=240)"
$PY -m benchmarks.run "${common[@]}" --out "$OUT/e2e_default.json" 2>&1 | grep -v "Loading weights" | tee -a "$LOG"
grep -h "decode worker\|rank loop\|this rank" /tmp/gpu-bench/pipeline.log 2>/dev/null | tee -a "$LOG"

step "codec options without compile, and batch size"
timeout 240 $PY -m benchmarks.gpu_options --codec $CODEC --device "$DEVICE" --rows $ROWS --iters 5 \
  --settings "$SETTINGS" --sweep-rows "$SWEEP" --budget-s 150 --out "$OUT/gpu_options.json" 2>&1 \
  | grep -v "Loading weights" | tee -a "$LOG"

step "end to end: codec + pipeline at batch.max_audio_s=$BIG"
$PY -m benchmarks.run "${common[@]}" --stages codec,pipeline --max-audio-s $BIG --out "$OUT/e2e_big.json" 2>&1 \
  | grep -v "Loading weights" | tee -a "$LOG"
grep -h "decode worker\|rank loop\|this rank" /tmp/gpu-bench/pipeline.log 2>/dev/null | tee -a "$LOG"

step "end to end: codec + pipeline at batch.max_audio_s=$BIG, bf16 encoder"
$PY -m benchmarks.run "${common[@]}" --stages codec,pipeline --max-audio-s $BIG --set codec.dtype=bfloat16 \
  --out "$OUT/e2e_big_bf16.json" 2>&1 | grep -v "Loading weights" | tee -a "$LOG"
grep -h "decode worker\|rank loop\|this rank" /tmp/gpu-bench/pipeline.log 2>/dev/null | tee -a "$LOG"
step "codec options with torch.compile"
timeout 200 $PY -m benchmarks.gpu_options --codec $CODEC --device "$DEVICE" --rows $ROWS --iters 5 \
  --settings "$COMPILE" --sweep-rows "" --budget-s 150 --out "$OUT/gpu_options_compile.json" 2>&1 \
  | grep -v "Loading weights" | tee -a "$LOG"

step "done"
