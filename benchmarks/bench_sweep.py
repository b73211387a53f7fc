#!/usr/bin/env python
"""Benchmark a five-alpha sweep: candidates in place vs --materialize.

Not a test: prints times and ratios (target: in place at least 2x faster).
Both modes run in this process after the imports, on fresh output folders (no
cache), with the same prompts, sampling and reward model, interleaved over
--repeats rounds. It prints the whole sweep and, separately, the time spent
switching candidates (`load_s`: copying weights in place, or writing each
checkpoint with mergekit and loading it), the only part the modes change; how
the totals compare depends on how much generation a candidate needs.

    python benchmarks/bench_sweep.py [--repeats 3] [--hidden 512 --layers 8] [--work-dir DIR]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ALPHAS = [0.0, 0.25, 0.5, 1.0, 2.0]


def build(work: Path, hidden: int, layers: int) -> Path:
    from mergekit_expo.tiny import build_family, build_reward_model, build_tokenizer, tiny_config

    models = work / f"models-{hidden}x{layers}"
    if not (models / "rm").exists():
        config = tiny_config(len(build_tokenizer()), hidden_size=hidden, num_layers=layers, intermediate_size=3 * hidden)
        build_family(str(models), aligned=("dpo",), config=config)
        build_reward_model(str(models / "rm"))
    recipe = work / f"recipe-{hidden}x{layers}.yaml"
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
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--limit", type=int, default=4, help="prompts per candidate")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    from expo_eval.config import SweepConfig
    from expo_eval.sweep import Sweep

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="expo-bench-sweep-"))
    recipe = build(work, args.hidden, args.layers)
    rm = recipe.parent / f"models-{args.hidden}x{args.layers}" / "rm"
    totals = {"in place": [], "materialize": []}
    switching = {"in place": [], "materialize": []}
    for round_index in range(args.repeats):
        for mode in totals:
            config = SweepConfig.model_validate(
                {
                    "recipe": recipe,
                    "out": work / f"out-{mode.replace(' ', '-')}-{round_index}-{time.time_ns()}",
                    "prompts": "smoke",
                    "limit": args.limit,
                    "alphas": ALPHAS,
                    "reward_models": [str(rm)],
                    "sampling": {"max_new_tokens": args.max_new_tokens},
                    "materialize": mode == "materialize",
                    "device": "cpu",
                }
            )
            started = time.perf_counter()
            sweep = Sweep(config)
            outcome = sweep.run()
            totals[mode].append(time.perf_counter() - started)
            switching[mode].append(sum(r.timing["load_s"] for r in outcome.results))
            print(f"round {round_index + 1}/{args.repeats} {mode:12s} sweep {totals[mode][-1]:6.2f} s, "
                  f"switching candidates {switching[mode][-1]:6.2f} s", flush=True)
    median = {mode: statistics.median(v) for mode, v in totals.items()}
    switch = {mode: statistics.median(v) for mode, v in switching.items()}
    print(f"\nfive-alpha sweep {ALPHAS}, {args.limit} prompts, {args.max_new_tokens} new tokens, "
          f"llama hidden {args.hidden} x {args.layers} layers, bf16")
    print(f"{'mode':14s} {'sweep (median)':>15s} {'switching (median)':>19s}")
    for mode in totals:
        print(f"{mode:14s} {median[mode]:13.2f} s {switch[mode]:17.2f} s")
    print(f"whole sweep: materialize / in place = {median['materialize'] / median['in place']:.2f}x (target >= 2)")
    print(f"switching:   materialize / in place = {switch['materialize'] / max(switch['in place'], 1e-9):.1f}x")


if __name__ == "__main__":
    main()
