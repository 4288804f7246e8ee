#!/usr/bin/env bash
# One-command setup for a fresh machine: a virtual environment in .venv with torch,
# the test and benchmark tools, and eagle3_ops built in place (CUDA kernels included
# when torch is a CUDA build and nvcc is present).
#
#   bash scripts/setup.sh
#
# TORCH_SPEC picks the torch to install when .venv has none (default torch==2.14.1,
# a CUDA 13.0 build; CPU-only machines compile the CUDA sources with it too).
# PYTHON picks the interpreter for the venv (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install -q "$TORCH_SPEC"
fi
$PIP install -q numpy pytest hypothesis pytest-benchmark matplotlib tqdm safetensors transformers "cmake>=3.26" ninja setuptools wheel
$PIP install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import eagle3_ops, torch; print('eagle3_ops ready: torch', torch.__version__, '| CUDA kernels built:', eagle3_ops.has_cuda_kernels())"
