#!/usr/bin/env bash
# Every GPU check in one call on a lent H100/H200 (see README "GPU checks"). Run from the repository root with the
# pure-Python wheels that the GPU machine lacks carried in wheels/ (`make gpu-wheels` fetches them here):
#   run(command="bash benchmarks/gpu/check.sh", carry=["wheels"], timeout_s=560)
# (Each op's binding is <op>_binding.cpp: a .cpp and a .cu of one name would build to one object file.)
# Stages (STAGES, default all, in this order): build (csrc/ -> herd_kernels, in place), tests (pytest tests/gpu),
# mfu (benchmarks/mfu.py: herd bf16 with and without kernels, native FP8, HF transformers baseline; each variant
# also profiles one step: where its GPU time goes, benchmarks/step_profile.py), mfu8 (herd bf16 and FP8 at 8
# layers: the difference from 4 layers is the cost of 4 transformer blocks, which the 32-layer model is made of),
# accum (herd bf16, FP8 and HF with 8 micro-batches per optimizer step: AdamW amortized as in training), kernels
# (benchmarks/kernels/run.py), dryrun (`herd train --dry-run --device cuda`: rank 0 of the 8,192-GPU 405B job of
# Llama 3's Table 4, one pipeline stage under tp=8 and FSDP at seq 8192 with full activation checkpointing, real
# tensors, fake process group: measured peak memory and step time against the CPU dry run's estimate, which
# docs/scale.md compares). The whole script keeps to DEADLINE seconds (default 500): each stage's limit is its
# own cap or what is left, so a hang cannot eat the call and the results are always packed. Full logs go to
# $OUT/logs.tgz (the device tool returns at most 8 files), the results files beside it; a short table is printed last.
set -uo pipefail
OUT=${OUT:-gpu-out}
W=$(mktemp -d)  # every log here, packed into $OUT at the end
STAGES=${STAGES:-build tests mfu mfu8 accum kernels dryrun}
MFU_VARIANTS=${MFU_VARIANTS:-herd-bf16,herd-fp8,hf-bf16,herd-bf16-nokernels,herd-fp8-delayed}
DEADLINE=${DEADLINE:-500}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
START=$SECONDS
stage() { echo "== [$((SECONDS - START)) s] $*"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
limit() { local left=$((DEADLINE - (SECONDS - START) - 15)); ((left < $1)) && echo $((left > 5 ? left : 5)) || echo "$1"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$W/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$W/gpu.txt"
{ python -m pip install -q --no-index --find-links wheels omegaconf tiktoken ninja \
  && python -m pip install -q --no-index --no-deps --find-links wheels llama-models; } >"$W/pip.log" 2>&1 \
  || { echo "wheel install failed (see pip.log)"; tail -5 "$W/pip.log"; }

build_rc=skipped
if has build; then
  stage "build csrc/"
  MAX_JOBS=16 timeout "$(limit 180)" python setup.py build_ext --inplace >"$W/build.log" 2>&1
  build_rc=$?
  grep -E "error|Used [0-9]+ registers|spill" "$W/build.log" | sort | uniq -c | sort -rn | head -40 >"$W/ptxas.txt"
  [ "$build_rc" = 0 ] || { echo "build failed ($build_rc):"; grep -m 15 -E "error" "$W/build.log"; }
fi
python -c "import engine.ops as o; [print(f'{k}: {v}') for k, v in o.kernel_status().items()]" 2>&1 \
  | tee "$W/kernel_status.txt"

tests_rc=skipped
if has tests; then
  stage "pytest tests/gpu"
  timeout "$(limit 150)" python -m pytest -q -p no:cacheprovider tests/gpu -m "gpu or not gpu" -rf --maxfail=30 \
    >"$W/pytest_gpu.log" 2>&1
  tests_rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$W/pytest_gpu.log" | tail -25
fi

if has mfu; then
  stage "benchmarks/mfu.py"
  timeout "$(limit 260)" python -m benchmarks.mfu --steps 10 --warmup 3 --timeout 75 --variants "$MFU_VARIANTS" \
    --profile 1 --log-dir "$W/mfu" --save >"$W/mfu.log" 2>&1
  echo "mfu exit $?"
fi

if has mfu8; then
  stage "benchmarks/mfu.py --layers 8"
  timeout "$(limit 150)" python -m benchmarks.mfu --layers 8 --steps 10 --warmup 3 --timeout 70 \
    --variants herd-bf16,herd-fp8 --profile 1 --log-dir "$W/mfu8" --results-suffix _8layers --save \
    >"$W/mfu8.log" 2>&1
  echo "mfu8 exit $?"
fi

if has accum; then
  stage "benchmarks/mfu.py --accum 8"
  timeout "$(limit 150)" python -m benchmarks.mfu --accum 8 --steps 4 --warmup 2 --timeout 70 \
    --variants herd-bf16,herd-fp8,hf-bf16 --log-dir "$W/accum" --results-suffix _accum8 --save \
    >"$W/accum.log" 2>&1
  echo "accum exit $?"
fi

if has kernels; then
  stage "benchmarks/kernels"
  timeout "$(limit 200)" python -m benchmarks.kernels.run --save >"$W/kernels.log" 2>&1
  echo "kernels exit $?"
fi

if has dryrun; then
  stage "herd train --dry-run --device cuda (405B, rank 0 of 8192)"
  for device in cuda cpu; do
    timeout "$(limit 120)" python -m launch train configs/pretrain_llama3_405b.yaml --dry-run --world-size 8192 \
      --rank 0 --device $device parallel.activation_checkpointing=full >>"$W/dryrun.log" 2>&1
    echo "dryrun $device exit $?"
  done
fi

stage "summary"
{
  echo "gpu: $(head -1 "$W/gpu.txt")"
  echo "build: exit $build_rc; tests/gpu: $(tail -1 "$W/pytest_gpu.log" 2>/dev/null) (exit $tests_rc)"
  cat "$W/kernel_status.txt"
  [ -f "$W/kernels.log" ] && grep -E "^\| |FAILED|Error" "$W/kernels.log"
  [ -f "$W/mfu.log" ] && grep -E "^\| (herd|hf)|^\*\*|FAILED|failed" "$W/mfu.log"
  [ -f "$W/mfu8.log" ] && echo "8 layers:" && grep -E "^\| (herd|hf)|^\*\*|FAILED|failed" "$W/mfu8.log"
  [ -f "$W/accum.log" ] && echo "8 micro-batches per step:" && grep -E "^\| (herd|hf)|FAILED|failed" "$W/accum.log"
  [ -f "$W/dryrun.log" ] && grep -E "^dry run|^  |Error" "$W/dryrun.log"
} | tee "$W/summary.txt"
cp benchmarks/results/mfu_* benchmarks/results/kernels_* "$W/" 2>/dev/null
tar -czf "$OUT/logs.tgz" -C "$W" . && cp "$W/summary.txt" "$OUT/"
ls benchmarks/results/mfu_*.md benchmarks/results/kernels_*.md 2>/dev/null | head -4 | xargs -r cp -t "$OUT/"
exit 0
