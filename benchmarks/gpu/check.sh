#!/usr/bin/env bash
# Every GPU check in one call on a lent H100/H200 (see README "GPU checks"). Run from the repository root with the
# pure-Python wheels that the GPU machine lacks carried in wheels/ (`make gpu-wheels` fetches them here):
#   run(command="bash benchmarks/gpu/check.sh", carry=["wheels"], timeout_s=480)
# Full logs and results go to $OUT (or ./gpu-out); a short table is printed last.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
{ python -m pip install -q --no-index --find-links wheels omegaconf tiktoken \
  && python -m pip install -q --no-index --no-deps --find-links wheels llama-models; } >"$OUT/pip.log" 2>&1 \
  || { echo "wheel install failed (see $OUT/pip.log)"; exit 1; }
python -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { echo "build failed (see $OUT/build.log)"; exit 1; }

python -m pytest -q tests/gpu -m "gpu or not gpu" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -3
tests_rc=${PIPESTATUS[0]}

python -m benchmarks.cpu_overhead --rounds 8 --steps 5 train.device=cuda train.dtype=bf16 \
  2>&1 | tee "$OUT/overhead_cuda.log" | tail -4

echo
echo "== summary =="
echo "gpu: $(cat "$OUT/gpu.txt")"
echo "tests/gpu: $(tail -1 "$OUT/pytest_gpu.log") (exit $tests_rc)"
grep "^| " "$OUT/overhead_cuda.log" | tail -1 | sed 's/^/herd vs bare loop on cuda: /'
exit $tests_rc
