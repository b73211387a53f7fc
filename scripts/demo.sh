#!/usr/bin/env bash
# The main job, offline: train a tiny SFT model, a reward model and DPO checkpoints
# (10/20/40/100% of an epoch) with TRL, extrapolate each with `expo`, sweep alpha, for
# seeds 0, 1 and 2, and write out/demo/report.md (the paper's Table 2 in miniature, and the
# selection rules against the ground truth). 15-20 minutes on two free CPU cores; a
# second run reuses finished stages (add --force to redo them, --seeds 0 for one run).
# Every stage runs seeded on one torch thread whatever the cores, so the same library
# versions and CPU kernels (the report's set-up section names them) print the same figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
export HF_HUB_OFFLINE=1
.venv/bin/mergekit-expo demo --out out/demo "$@"
