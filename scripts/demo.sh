#!/usr/bin/env bash
# Offline end-to-end run: build tiny local models, extrapolate them with the
# unmodified mergekit commands, and show the result's model card.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
work=out/demo
rm -rf "$work" && mkdir -p "$work" && cd "$work"
mergekit-expo tiny-models tiny
mergekit-yaml ../../recipes/tiny/expo.yaml expo -v --quiet 2>&1 | grep -E "mergekit_expo|WARNING"
mergekit-multi ../../recipes/tiny/multi_stage.yaml --intermediate-dir stages --out-path multi_stage --quiet
echo
echo "== $work/expo/README.md (ExPO section)"
sed -n '/^## ExPO/,/^### Citation/p' expo/README.md
echo "Models written: $work/expo, $work/multi_stage"
