#!/usr/bin/env python
"""Benchmark a five-alpha sweep on a tiny local model: in place vs --materialize.

Not a test: prints wall times and their ratio (target: in place at least 2x faster).
Both runs use fresh output folders (no cache), the same prompts, sampling and
reward model, each in its own subprocess, interleaved over --repeats rounds.

    python benchmarks/bench_sweep.py [--repeats 3] [--work-dir DIR]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ALPHAS = "0,0.25,0.5,1,2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--limit", type=int, default=8, help="prompts per candidate")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    from mergekit_expo.tiny import build_family, build_reward_model, tiny_config, build_tokenizer

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="expo-bench-sweep-"))
    models = work / "models"
    if not (models / "rm").exists():
        config = tiny_config(len(build_tokenizer()), hidden_size=256, num_layers=4, intermediate_size=768)
        build_family(str(models), aligned=("dpo",), config=config)
        build_reward_model(str(models / "rm"))
    recipe = work / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "expo",
                "base_model": str(models / "sft"),
                "models": [{"model": str(models / "dpo")}],
                "parameters": {"alpha": 0.3},
                "dtype": "bfloat16",
            }
        )
    )
    command = [
        sys.executable, "-m", "expo_eval.cli", "sweep", str(recipe),
        "--alphas", ALPHAS, "--prompts", "smoke", "--limit", str(args.limit),
        "--reward-model", str(models / "rm"), "--max-new-tokens", str(args.max_new_tokens),
        "--device", "cpu",
    ]
    times = {"in place": [], "materialize": []}
    for round_index in range(args.repeats):
        for mode, extra in (("in place", []), ("materialize", ["--materialize"])):
            out = work / f"out-{mode.replace(' ', '-')}-{round_index}"
            started = time.perf_counter()
            subprocess.run(command + ["--out", str(out)] + extra, check=True, capture_output=True)
            times[mode].append(time.perf_counter() - started)
            print(f"round {round_index + 1}/{args.repeats} {mode:12s} {times[mode][-1]:6.2f} s", flush=True)
    in_place, materialize = (statistics.median(times[m]) for m in ("in place", "materialize"))
    print(f"\nfive-alpha sweep ({ALPHAS}), {args.limit} prompts, {args.max_new_tokens} new tokens, tiny llama")
    print(f"{'mode':14s} {'median wall':>12s}")
    print(f"{'in place':14s} {in_place:10.2f} s")
    print(f"{'--materialize':14s} {materialize:10.2f} s")
    print(f"materialize / in place: {materialize / in_place:.2f}x (target >= 2)")


if __name__ == "__main__":
    main()
