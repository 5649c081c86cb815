#!/usr/bin/env bash
# One command on a CUDA machine: the GPU-only kernel tests (fp32, fp16, bf16; 64K tokens), then the
# benchmark (every mixer against softmax, and the kernel's achieved GB/s). Prints everything it measures.
# Usage: bash benchmarks/gpu_check.sh            (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -m pytest -q -m gpu tests/kernels -x -p no:cacheprovider
tests=$?
$PY -m linvision.benchmarks.run --sizes 64 128 256 --dim 256 --heads 4 --dtype bfloat16 --repeat 10
$PY -m linvision.benchmarks.run --mixers linear --sizes 64 128 256 --dim 1024 --heads 16 --dtype bfloat16 --repeat 10 --mode train
bench=$?
exit $(( tests || bench ))
