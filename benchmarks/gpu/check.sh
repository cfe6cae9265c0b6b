#!/usr/bin/env bash
# Every GPU check in one call on a lent H100/H200 (see README "GPU checks"). Run from the repository root with the
# pure-Python wheels that the GPU machine lacks carried in wheels/ (`make gpu-wheels` fetches them here):
#   run(command="bash benchmarks/gpu/check.sh", carry=["wheels"], timeout_s=560)
# (Each op's binding is <op>_binding.cpp: a .cpp and a .cu of one name would build to one object file.)
# Stages (STAGES, default all, in this order, most needed first): build (csrc/ -> herd_kernels, in place), tests
# (pytest tests/gpu), mfu (benchmarks/mfu.py: herd bf16 with and without kernels, native FP8, HF transformers
# baseline; each variant also profiles one step: where its GPU time goes, benchmarks/step_profile.py), accum (herd
# bf16, FP8 and HF with 8 micro-batches per optimizer step: AdamW amortized as in training), fused (the same with
# issue 20's options, docs/throughput.md: fused projections with fused gradient accumulation, and with torch.compile
# per block in bf16 and FP8), with FP8 option rows after mfu and fused (mfu-fp8, fused-fp8: issue 20 item 3's
# switches, docs/throughput.md "FP8 overheads": fp8.weight_recipe=delayed against herd-fp8, the casts fused into
# RMSNorm/SwiGLU against herd-fp8-delayed, at 1 (profiled) and 8 micro-batches per step), peers
# (benchmarks/peers.py at the accum stage's settings: HF + torch.compile, HF + Liger-Kernel, torchtitan FSDP2 +
# compile in bf16 and float8, Megatron-core's local spec; herd's accum rows beside them), kernels
# (benchmarks/kernels/run.py: each csrc/ kernel against copy bandwidth, eager and torch.compile), liger
# (benchmarks/kernels/liger.py: the same kernels against Liger-Kernel's Triton ones), mfu8 (herd bf16 and FP8 at 8
# layers: the difference from 4 layers is the cost of 4 transformer blocks, which the 32-layer model is made of),
# dryrun (`herd train --dry-run --device cuda`: rank 0 of the 8,192-GPU 405B job of Llama 3's Table 4, one pipeline
# stage under tp=8 and FSDP at seq 8192 with full activation checkpointing, real tensors, fake process group:
# measured peak memory and step time against the CPU dry run's estimate, which docs/scale.md compares).
# The whole script keeps to DEADLINE seconds (default 480): each stage's limit is its own cap or what is left, and a
# stage with under MIN_STAGE_S (20) seconds left is skipped and says so, so a hang cannot eat the call and the
# results are always packed. Planned caps (s; benchmarks/README.md has the budget): build 150, tests 90, mfu 110,
# accum 75, fused 130, peers 170, kernels 75, liger 35, mfu8 45, dryrun 2 x 60, attnmem 60; the FP8 option rows
# mfu-fp8 45 and fused-fp8 45 (small: they run only with time left over) (attention under
# document masks, benchmarks/attention_memory.py). Their sum is over DEADLINE on purpose: a stage
# that ends early leaves its time to the next, the last ones get what is left.
# The peers' wheels (wheels/peers, `make gpu-wheels`) go into a folder of their own (PEER_SITE) that only the peers
# and liger stages see, so nothing they bring changes the other stages' imports.
# Full logs go to $OUT/logs.tgz (the device tool returns at most 8 files), with the results files and their PNG
# charts (benchmarks/plots.py); the short summary is printed last. DRY=1 prints the plan (stages, caps, commands)
# and runs nothing.
set -uo pipefail
OUT=${OUT:-gpu-out}
W=$(mktemp -d)  # every log here, packed into $OUT at the end
STAGES=${STAGES:-build tests mfu accum fused peers kernels liger mfu8 dryrun attnmem}
MFU_VARIANTS=${MFU_VARIANTS:-herd-bf16,herd-fp8,hf-bf16,herd-bf16-nokernels,herd-fp8-delayed}
FP8_OPTION_VARIANTS=${FP8_OPTION_VARIANTS:-herd-fp8-wdelayed,herd-fp8-delayed-fcast}
PEERS=${PEERS:-hf-liger,hf-compile,titan-compile,megatron-local,titan-fp8}
DEADLINE=${DEADLINE:-480}
MIN_STAGE_S=${MIN_STAGE_S:-20}
PEER_SITE=${PEER_SITE:-/tmp/herd-peer-site}
DRY=${DRY:-0}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
START=$SECONDS
stage() { echo "== [$((SECONDS - START)) s] $*"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
limit() { local left=$((DEADLINE - (SECONDS - START) - 15)); ((left < $1)) && echo $((left > 5 ? left : 5)) || echo "$1"; }
# run STAGE CAP CMD...: the stage under `timeout` of its cap or what is left; skipped with under MIN_STAGE_S left.
# With DRY=1 only says what it would run.
run() {
  local name=$1 cap=$2; shift 2
  if [ "$DRY" = 1 ]; then echo "stage $name: cap ${cap} s: $*" >&3; return 0; fi
  local left=$((DEADLINE - (SECONDS - START) - 15))
  if ((left < MIN_STAGE_S)); then echo "== $name: skipped, ${left} s left of DEADLINE=$DEADLINE"; return 0; fi
  stage "$name (limit $(limit "$cap") s)"
  timeout -s "${STAGE_SIGNAL:-TERM}" -k 15 "$(limit "$cap")" "$@"
}
exec 3>&1  # the terminal, for what a stage's own redirection would swallow
report() { [ "$DRY" = 1 ] || echo "$@"; }
if [ "$DRY" = 1 ]; then
  echo "DRY=1: DEADLINE=$DEADLINE s, stages: $STAGES"
else
  mkdir -p "$OUT"
fi

if [ "$DRY" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$W/gpu.txt"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$W/gpu.txt"
  { python -m pip install -q --no-index --find-links wheels omegaconf tiktoken ninja \
    && python -m pip install -q --no-index --no-deps --find-links wheels llama-models; } >"$W/pip.log" 2>&1 \
    || { echo "wheel install failed (see pip.log)"; tail -5 "$W/pip.log"; }
  if has peers || has liger; then  # their own folder: the other stages never import these
    python -m pip install -q --no-index --no-deps --no-compile --target "$PEER_SITE" wheels/peers/*.whl \
      >"$W/pip_peers.log" 2>&1 || { echo "peer wheel install failed (see pip_peers.log)"; tail -3 "$W/pip_peers.log"; }
    rm -rf "$PEER_SITE/test"  # torchao's wheel ships a top-level `test` package: it would shadow the stdlib's
  fi
fi

build_rc=skipped
if has build; then
  MAX_JOBS=16 run build 150 python setup.py build_ext --inplace >"$W/build.log" 2>&1
  build_rc=$?
  grep -E "error|Used [0-9]+ registers|spill" "$W/build.log" | sort | uniq -c | sort -rn | head -40 >"$W/ptxas.txt"
  [ "$build_rc" = 0 ] || [ "$DRY" = 1 ] || { echo "build failed ($build_rc):"; grep -m 15 -E "error" "$W/build.log"; }
fi
[ "$DRY" = 1 ] || python -c "import engine.ops as o; [print(f'{k}: {v}') for k, v in o.kernel_status().items()]" \
  2>&1 | tee "$W/kernel_status.txt"

tests_rc=skipped
if has tests; then
  # the csrc kernels' tests first (quick, and what every later stage relies on), then the training runs on CUDA;
  # SIGINT at the cap, so a cut pytest still prints its summary of what ran and what failed
  STAGE_SIGNAL=INT run tests 90 python -m pytest -q -p no:cacheprovider tests/gpu/test_kernel_*.py \
    $(ls tests/gpu/test_*.py | grep -v /test_kernel_) -m "gpu or not gpu" -rf --maxfail=30 >"$W/pytest_gpu.log" 2>&1
  tests_rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$W/pytest_gpu.log" | tail -25
fi

if has mfu; then
  run mfu 110 python -m benchmarks.mfu --steps 10 --warmup 3 --timeout 75 --variants "$MFU_VARIANTS" \
    --profile 1 --log-dir "$W/mfu" --save >"$W/mfu.log" 2>&1
  report "mfu exit $?"
  # the FP8 switches beside this call's herd-fp8 and herd-fp8-delayed rows (one profiled step each: herd kernels ms)
  run mfu-fp8 45 python -m benchmarks.mfu --steps 10 --warmup 3 --timeout 30 --variants "$FP8_OPTION_VARIANTS" \
    --profile 1 --log-dir "$W/mfu-fp8" --results-suffix _fp8_options --save >"$W/mfu_fp8.log" 2>&1
  report "mfu-fp8 exit $?"
fi

if has accum; then
  run accum 75 python -m benchmarks.mfu --accum 8 --steps 4 --warmup 2 --timeout 70 \
    --variants herd-bf16,herd-fp8,hf-bf16 --log-dir "$W/accum" --results-suffix _accum8 --save \
    >"$W/accum.log" 2>&1
  report "accum exit $?"
fi

if has fused; then  # issue 20's options (docs/throughput.md), 8 micro-batches per step like accum
  run fused 130 python -m benchmarks.mfu --accum 8 --steps 4 --warmup 2 --timeout 100 \
    --variants herd-bf16-fused-gaf,herd-bf16-fused-compile,herd-fp8-fused-compile --log-dir "$W/fused" \
    --results-suffix _accum8_options --save >"$W/fused.log" 2>&1
  report "fused exit $?"
  # the fused casts at 8 micro-batches per step, against their unfused base in the same run
  run fused-fp8 45 python -m benchmarks.mfu --accum 8 --steps 2 --warmup 1 --timeout 20 \
    --variants herd-fp8-delayed,herd-fp8-delayed-fcast --log-dir "$W/fused-fp8" \
    --results-suffix _accum8_fp8_options --save >"$W/fused_fp8.log" 2>&1
  report "fused-fp8 exit $?"
fi

if has peers; then
  # herd's rows from this call's accum stage only (a results file older than this script's start is not used)
  herd=$(find benchmarks/results -name 'mfu_*_accum8.json' -newer "$W/gpu.txt" 2>/dev/null | head -1)
  cap=170; budget=$(($(limit $cap) - 10))
  PYTHONPATH=$PEER_SITE:$PWD run peers $cap python -m benchmarks.peers --peers "$PEERS" --accum 8 --steps 2 \
    --warmup 1 --timeout 75 --budget "$budget" ${herd:+--herd-results "$herd"} --results-suffix _accum8 \
    --log-dir "$W/peers" --save >"$W/peers.log" 2>&1
  report "peers exit $?"
fi

if has kernels; then
  run kernels 75 python -m benchmarks.kernels.run --save >"$W/kernels.log" 2>&1
  report "kernels exit $?"
fi

if has liger; then
  PYTHONPATH=$PEER_SITE:$PWD run liger 35 python -m benchmarks.kernels.liger --save >"$W/liger.log" 2>&1
  report "liger exit $?"
fi

if has mfu8; then
  run mfu8 45 python -m benchmarks.mfu --layers 8 --steps 10 --warmup 3 --timeout 35 \
    --variants herd-bf16,herd-fp8 --profile 1 --log-dir "$W/mfu8" --results-suffix _8layers --save \
    >"$W/mfu8.log" 2>&1
  report "mfu8 exit $?"
fi

if has dryrun; then
  for device in cuda cpu; do
    run "dryrun-$device" 60 python -m launch train configs/pretrain_llama3_405b.yaml --dry-run --world-size 8192 \
      --rank 0 --device $device parallel.activation_checkpointing=full >>"$W/dryrun.log" 2>&1
    report "dryrun $device exit $?"
  done
fi

if has attnmem; then  # attention under document masks at 8K/32K/128K: blockwise kernel vs the dense mask (to 32K)
  run attnmem 60 python -m benchmarks.attention_memory --device cuda --dense-up-to 32768 \
    --save attention_memory_cuda >"$W/attnmem.log" 2>&1
  report "attnmem exit $?"
fi

if [ "$DRY" = 1 ]; then
  echo "then: summary, benchmarks/plots.py on this call's results, logs and results packed into \$OUT/logs.tgz"
  rm -rf "$W"
  exit 0
fi
stage "summary"
{
  echo "gpu: $(head -1 "$W/gpu.txt")"
  echo "build: exit $build_rc; tests/gpu: $(tail -1 "$W/pytest_gpu.log" 2>/dev/null) (exit $tests_rc)"
  cat "$W/kernel_status.txt"
  [ -f "$W/kernels.log" ] && grep -E "^\| |FAILED|Error" "$W/kernels.log"
  [ -f "$W/liger.log" ] && echo "against Liger-Kernel:" && grep -E "^\| |FAILED|Error" "$W/liger.log"
  [ -f "$W/mfu.log" ] && grep -E "^\| (herd|hf)|^\*\*|FAILED|failed" "$W/mfu.log"
  [ -f "$W/mfu_fp8.log" ] && echo "FP8 options:" && grep -E "^\| herd|^\*\*|FAILED|failed" "$W/mfu_fp8.log"
  [ -f "$W/mfu8.log" ] && echo "8 layers:" && grep -E "^\| (herd|hf)|^\*\*|FAILED|failed" "$W/mfu8.log"
  [ -f "$W/accum.log" ] && echo "8 micro-batches per step:" && grep -E "^\| (herd|hf)|FAILED|failed" "$W/accum.log"
  [ -f "$W/fused_fp8.log" ] && echo "FP8 fused casts, 8 micro-batches:" \
    && grep -E "^\| herd|FAILED|failed" "$W/fused_fp8.log"
  [ -f "$W/peers.log" ] && echo "peers (8 micro-batches per step):" && grep -E "^\| |^- " "$W/peers.log"
  [ -f "$W/dryrun.log" ] && grep -E "^dry run|^  |Error" "$W/dryrun.log"
  [ -f "$W/attnmem.log" ] && echo "attention memory:" && grep -E "^\| [0-9]|Error" "$W/attnmem.log"
} | tee "$W/summary.txt"
# this call's results files (newer than its start) and their charts, packed with the logs
find benchmarks/results -newer "$W/gpu.txt" -type f \( -name '*.json' -o -name '*.md' \) -exec cp -t "$W/" {} +
mapfile -t fresh < <(find benchmarks/results -newer "$W/gpu.txt" -type f -name '*.json')
((${#fresh[@]})) && timeout 60 python -m benchmarks.plots "${fresh[@]}" >"$W/plots.txt" 2>"$W/plots.err" \
  ; xargs -r cp -t "$W/" <"$W/plots.txt" 2>/dev/null
tar -czf "$OUT/logs.tgz" -C "$W" . && cp "$W/summary.txt" "$OUT/"
find benchmarks/results -newer "$W/gpu.txt" -type f -name '*.md' | head -6 | xargs -r cp -t "$OUT/"
exit 0
