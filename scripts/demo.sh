#!/usr/bin/env bash
# The main job, offline: for short answers and for long ones (two regimes, run side by side on
# two processes), train a tiny SFT model, two reward models and DPO checkpoints (10/20/40/100%
# of an epoch) with TRL, extrapolate each with `expo`, sweep alpha, and write out/demo/report.md:
# every selection rule against the task's ground truth, and per regime the paper's Table 2 in
# miniature. Seed 0; `bash scripts/demo.sh --seeds 0,1,2` is the full evidence over seeds.
# A second run reuses finished stages (add --force to redo them). Every stage runs seeded on one
# torch thread whatever the cores, so the same library versions and CPU kernels (the report's
# set-up section names them) print the same figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
export HF_HUB_OFFLINE=1
.venv/bin/mergekit-expo demo --out out/demo "$@"
