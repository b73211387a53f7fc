#!/usr/bin/env bash
# Set up .venv with the test extra and run the test suite (offline: no hub access).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
