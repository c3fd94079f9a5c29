#!/usr/bin/env bash
# Build llama-cpp-python from its PyPI source distribution (CPU only) in its own virtual
# environment, for scripts/serving/check_llamacpp.py. Compiles llama.cpp: several minutes on 2 cores.
#   bash scripts/serving/setup_llamacpp.sh [VENV]      (default outputs/venvs/llamacpp)
set -euo pipefail
VENV=${1:-outputs/venvs/llamacpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# --no-binary: build from the sdist, never a prebuilt wheel; CPU backend only, no OpenMP/BLAS
# surprises; CMAKE_BUILD_PARALLEL_LEVEL bounds the compile jobs on a shared machine.
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  "$VENV/bin/pip" install --no-binary llama-cpp-python "llama-cpp-python==$VERSION" numpy
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
