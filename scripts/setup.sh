#!/usr/bin/env bash
# Create .venv and install the project into it. Extras in $1 (e.g. "test").
# torch is pinned to 2.13.0 (a local CPU build here) only when no torch is
# installed yet; the package itself asks for torch>=2.3.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".${1:+[$1]}"
