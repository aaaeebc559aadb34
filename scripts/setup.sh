#!/usr/bin/env bash
# Create .venv (if missing) with torch, the test/bench tools and rotary_kernels built in
# editable mode (compiled C++/CUDA extension included when a compiler is present).
# Idempotent: a second run only rebuilds the extension.
#
#   TORCH_SPEC                 torch requirement (default torch==2.14.1, a CUDA 13.0 build on Linux)
#   ROTARY_KERNELS_CUDA_ARCHS  CUDA archs to compile (default: 9.0 when no GPU is visible, so a
#                              GPU-less machine only checks that the CUDA code compiles)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$VENV/bin/python" -c "import torch, triton, pytest, kernels, transformers, kernel_abi_check, tabulate, matplotlib" 2>/dev/null; then
  pip_install "${TORCH_SPEC:-torch==2.14.1}" setuptools wheel ninja numpy \
    pytest pytest-benchmark hypothesis kernel-abi-check tabulate matplotlib "kernels==0.17.2" "transformers>=5.20,<5.23"
fi
if [ -z "${ROTARY_KERNELS_CUDA_ARCHS:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  export ROTARY_KERNELS_CUDA_ARCHS="9.0"
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
pip_install --no-build-isolation --no-deps -e .
"$VENV/bin/python" - <<'PY'
import rotary_kernels as rk
from rotary_kernels import _compiled
print("rotary_kernels installed; backends on cpu:", rk.available_backends("cpu"),
      "| compiled extension:", _compiled.HAS_EXT, "| CUDA kernels compiled in:", _compiled.HAS_CUDA_EXT)
PY
