#!/usr/bin/env bash
# Every GPU check in one call on a lent H100/H200 (see README "GPU checks"). Run from the repository root with the
# pure-Python wheels that the GPU machine lacks carried in wheels/ (`make gpu-wheels` fetches them here):
#   run(command="bash benchmarks/gpu/check.sh", carry=["wheels"], timeout_s=560)
# Stages (STAGES, default all, in this order): build (csrc/ -> herd_kernels, in place), tests (pytest tests/gpu),
# mfu (benchmarks/mfu.py: herd bf16 with and without kernels, native FP8, HF transformers baseline), kernels
# (benchmarks/kernels/run.py). Each stage has its own time limit so a hang cannot eat the call. Full logs and the
# results files go to $OUT (or ./gpu-out); a short table is printed last.
set -uo pipefail
OUT=${OUT:-gpu-out}
STAGES=${STAGES:-build tests mfu kernels}
MFU_VARIANTS=${MFU_VARIANTS:-herd-bf16,herd-fp8,hf-bf16,herd-bf16-nokernels,herd-fp8-delayed}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
START=$SECONDS
stage() { echo "== [$((SECONDS - START)) s] $*"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
{ python -m pip install -q --no-index --find-links wheels omegaconf tiktoken ninja \
  && python -m pip install -q --no-index --no-deps --find-links wheels llama-models; } >"$OUT/pip.log" 2>&1 \
  || { echo "wheel install failed (see $OUT/pip.log)"; tail -5 "$OUT/pip.log"; }

build_rc=skipped
if has build; then
  stage "build csrc/"
  MAX_JOBS=16 timeout 240 python setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  build_rc=$?
  grep -E "error|Used [0-9]+ registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -40 >"$OUT/ptxas.txt"
  [ "$build_rc" = 0 ] || { echo "build failed ($build_rc):"; grep -m 15 -E "error" "$OUT/build.log"; }
fi
python -c "import engine.ops as o; [print(f'{k}: {v}') for k, v in o.kernel_status().items()]" 2>&1 \
  | tee "$OUT/kernel_status.txt"

tests_rc=skipped
if has tests; then
  stage "pytest tests/gpu"
  timeout 200 python -m pytest -q -p no:cacheprovider tests/gpu -m "gpu or not gpu" -rf >"$OUT/pytest_gpu.log" 2>&1
  tests_rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu.log" | tail -25
fi

if has mfu; then
  stage "benchmarks/mfu.py"
  timeout 330 python -m benchmarks.mfu --steps 10 --warmup 3 --timeout 100 --variants "$MFU_VARIANTS" \
    --log-dir "$OUT/mfu" --save >"$OUT/mfu.log" 2>&1
  echo "mfu exit $?"
  cp benchmarks/results/mfu_* "$OUT/" 2>/dev/null
fi

if has kernels; then
  stage "benchmarks/kernels"
  timeout 200 python -m benchmarks.kernels.run --save >"$OUT/kernels.log" 2>&1
  echo "kernels exit $?"
  cp benchmarks/results/kernels_* "$OUT/" 2>/dev/null
fi

stage "summary"
echo "gpu: $(head -1 "$OUT/gpu.txt")"
echo "build: exit $build_rc; tests/gpu: $(tail -1 "$OUT/pytest_gpu.log" 2>/dev/null) (exit $tests_rc)"
cat "$OUT/kernel_status.txt"
[ -f "$OUT/kernels.log" ] && grep -E "^\| |FAILED" "$OUT/kernels.log"
[ -f "$OUT/mfu.log" ] && tail -22 "$OUT/mfu.log"
exit 0
