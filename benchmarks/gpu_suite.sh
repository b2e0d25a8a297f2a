#!/usr/bin/env bash
# One GPU machine's measurements for BENCHMARKS.md "GPU", in one go (a lent GPU has minutes, not hours), most
# important first, so a run cut short still answers the main questions:
#   1. the CUDA tests (codes vs CPU, launch/collect overlap, no host sync inside an encode);
#   2. the codec's options at a wide batch (speed, agreement with IEEE fp32), throughput by batch size up to
#      128 rows, and a kernel profile of one batch;
#   3. end to end on FLAC songs at wide batches: codec limit vs pipeline vs the host's ceiling (the pipeline with
#      an instant codec), then at 32 rows (the previous setting), then with the bf16 encoder; 4. torch.compile.
# The naive loop is not rerun (259x on an H200, 2026-11-26: the pipeline beats it ~10x); add it to --stages.
# Results (JSON, logs) go to $OUT (default out/gpu). Runs from the repo root:
#   bash benchmarks/gpu_suite.sh                       # on the GPU machine (about 7 minutes on an H200)
#   STEPS="tests e2e e2e_compile" bash benchmarks/gpu_suite.sh    # some steps only (about 4 minutes)
#   SETTINGS=tf32,tf32+cuda_graph SWEEP= STEPS="tests options" bash benchmarks/gpu_suite.sh   # CUDA graphs (~2 min)
#   STEPS="e2e e2e_graph" bash benchmarks/gpu_suite.sh  # eager vs codec.cuda_graph end to end (~4 min)
# Steps: tests options e2e narrow bf16 compile (the default set), and decode (after an e2e step: it decodes its
# corpus) e2e_compile e2e_graph e2e_graph_compile e2e_2ranks e2e_compile_long.
#   SMALL=1 DEVICE=cpu bash benchmarks/gpu_suite.sh    # a rehearsal on CPU with the tiny codec
set -u
OUT=${OUT:-out/gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
LOG="$OUT/suite.log"
if [ -n "${SMALL:-}" ]; then
  CODEC=tiny; MIN=0.5; MINS=10; MAXS=20; COPIES=2; ROWS=2; SWEEP=1,2; SETTINGS=fp32,tf32; COMPILE=fp32,tf32; TO=300
  WIDE=60; NARROW=30
else
  CODEC=full; MIN=${MINUTES:-20}; MINS=60; MAXS=240; COPIES=${COPIES:-48}; ROWS=64; SWEEP=${SWEEP-16,32,64,128}
  SETTINGS=${SETTINGS-fp32,tf32,bf16,tf32+cuda_graph}; COMPILE=tf32,tf32+compile,bf16+compile; TO=240
  WIDE=${WIDE:-auto}; NARROW=960
fi
STEPS=${STEPS:-tests options e2e narrow bf16 compile}
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo "=== $(date +%T) $*" | tee -a "$LOG"; }
quiet() { grep -v "Loading weights\|^\[bench\]"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1; nproc; free -g | head -2
  lscpu 2>&1 | grep -E "^(Model name|Socket|Core|Thread|CPU\(s\)|NUMA node\(s\)|CPU max MHz)"
  $PY -c "import torch, transformers, pyarrow, soundfile, soxr, av; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'soxr', soxr.__version__,
'libsndfile', soundfile.__libsndfile_version__, 'av', av.__version__)"; } 2>&1 | tee -a "$LOG"

if want tests && [ "$DEVICE" = cuda ]; then
  step "CUDA tests"
  timeout 150 $PY -m pytest -q -s -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
  tail -3 "$OUT/test_cuda.txt" | tee -a "$LOG"
fi

step "fixture codec ($CODEC)"
$PY -c "from benchmarks.run import resolve_codec; print(resolve_codec('$CODEC'))" 2>&1 | tail -1 | tee -a "$LOG"

if want options; then
step "codec options at $ROWS rows, batch size, profile"
timeout 200 $PY -m benchmarks.gpu_options --codec $CODEC --device "$DEVICE" --rows $ROWS --iters 5 \
  --settings "$SETTINGS" --sweep-rows "$SWEEP" --budget-s 150 --profile --out "$OUT/gpu_options.json" 2>&1 | quiet \
  | tee -a "$LOG"
fi

common=(--device "$DEVICE" --codec $CODEC --format flac --minutes $MIN --min-s $MINS --max-s $MAXS --copies $COPIES
        --unit-size 8 --max-rows 256 --work /tmp/gpu-bench --timeout $TO)
e2e() {  # name, batch.max_audio_s (auto: the config's), stages, extra args
  step "end to end ($1), batch.max_audio_s=$2: $3"
  local cap=(); [ "$2" = auto ] || cap=(--max-audio-s "$2")
  $PY -m benchmarks.run "${common[@]}" "${cap[@]}" --stages $3 --out "$OUT/e2e_$1.json" "${@:4}" 2>&1 | quiet \
    | tee -a "$LOG"
}
want e2e && e2e wide $WIDE codec,pipeline,host
# The decode workers' ceiling by process count, on the corpus the e2e steps generated (do they scale per core?).
if want decode; then
  step "decode scaling"
  timeout 120 $PY -m benchmarks.decode_scaling --files /tmp/gpu-bench/audio --limit ${DECODE_FILES:-96} \
    --procs ${DECODE_PROCS:-4,8,12,14,16} --seconds ${DECODE_SECONDS:-6} --out "$OUT/decode_scaling.json" 2>&1 \
    | tee -a "$LOG"
  step "decode worker's parts (read, downmix, resample) on one core"
  timeout 60 $PY -m benchmarks.decode_parts --files /tmp/gpu-bench/audio --limit 8 --repeat 2 \
    --out "$OUT/decode_parts.json" 2>&1 | tee -a "$LOG"
fi
want e2e_compile && e2e wide_compile $WIDE pipeline --no-storage --set codec.compile=true
# codec.cuda_graph: the codec limit and the pipeline with the encode replayed as a CUDA graph (same codes as eager).
want e2e_graph && e2e wide_graph $WIDE codec,pipeline --no-storage --set codec.cuda_graph=true
want e2e_graph_compile && e2e wide_graph_compile $WIDE pipeline --no-storage --set codec.cuda_graph=true \
  --set codec.compile=true
# Two ranks on the one GPU: two parents (two GILs) share the host work, the GPU interleaves their batches.
want e2e_2ranks && e2e wide_2ranks $WIDE pipeline,host --no-storage --nproc 2
# compile on a job long enough to pay its ~10 s (4x the audio).
want e2e_compile_long && COPIES_LONG=$((COPIES * 4)) && e2e wide_compile_long $WIDE pipeline --no-storage \
  --set codec.compile=true --copies $COPIES_LONG
want narrow && e2e narrow $NARROW codec,pipeline --no-storage
want bf16 && e2e wide_bf16 $WIDE codec,pipeline --no-storage --set codec.dtype=bfloat16

if want compile; then
step "codec options with torch.compile"
timeout 150 $PY -m benchmarks.gpu_options --codec $CODEC --device "$DEVICE" --rows $ROWS --iters 5 \
  --settings "$COMPILE" --sweep-rows "" --budget-s 120 --out "$OUT/gpu_options_compile.json" 2>&1 | quiet \
  | tee -a "$LOG"
fi
cp /tmp/gpu-bench/*.log "$OUT/" 2>/dev/null  # each stage's own log: the run summaries, warnings
step "done"
