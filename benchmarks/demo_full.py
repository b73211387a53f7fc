#!/usr/bin/env python
"""Run the full offline demo (`mergekit-expo demo`) and print its Table 2 analogues.

Not a test: CI runs only --quick (tests/test_demo.py). This checks the full run's
shape, for each regime (short answers, long ones): every artifact is there, the
stages fit the time budget, SFT and DPO learned the task, and extrapolation of the
least-trained checkpoint rises and then collapses; it prints the paper's claims as
the reports judged them. Exits 1 when a check fails. Finished stages are reused;
--force redoes them (needed for honest timings).

    python benchmarks/demo_full.py [--out out/demo] [--regime short] [--force] [--budget-s 1200]
"""

import argparse
import sys
import time
from pathlib import Path


def main() -> int:
    from expo_eval.demo.pipeline import load_summaries, run_demo
    from expo_eval.demo.rules import GROUND_TRUTH
    from expo_eval.demo.settings import FULL_SEEDS, REGIMES, Layout
    from expo_eval.demo.report import build, print_summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--regime", action="append", choices=list(REGIMES), help="only this regime (repeatable; default: all)")
    parser.add_argument("--force", action="store_true", help="redo every stage (timings of a fresh run)")
    parser.add_argument("--seeds", default=",".join(map(str, FULL_SEEDS)), help="comma-separated seeds, one full run each")
    parser.add_argument("--workers", type=int, default=2, help="regimes run at once, one process each")
    parser.add_argument("--budget-s", type=float, default=1200.0, help="wall time each regime's stages should fit in")
    args = parser.parse_args()

    seeds = [int(seed) for seed in args.seeds.split(",")]
    regimes = {name: settings for name, settings in REGIMES.items() if not args.regime or name in args.regime}
    started = time.perf_counter()
    summaries = run_demo(args.out, regimes, seeds=seeds, force=args.force, workers=args.workers)
    wall = time.perf_counter() - started
    print_summary(summaries)

    checks = {"overview report and summary written": all((args.out / n).is_file() for n in ("report.md", "summary.json"))}
    for name, summary in summaries.items():
        layout = Layout(args.out / name)
        settings = regimes[name].model_copy(update={"seed": seeds[0]})
        checkpoints, sft, _ = build(layout, load_summaries(layout, settings))
        stage_wall = sum(t["wall_s"] for t in summary["timings"].values())
        stage_cpu = sum(t["cpu_s"] for t in summary["timings"].values())
        least, full = checkpoints[0], checkpoints[-1]
        curve = least.dev_curve()
        peak = max(curve, key=lambda r: r.score(GROUND_TRUTH))
        plots = (layout.report, layout.summary, layout.plots / "reward_vs_alpha.png", layout.plots / "length_vs_alpha.png")
        checks.update({
            f"{name}: report, summary and both plots written": all(p.is_file() for p in plots),
            f"{name}: stages took {stage_wall:.0f} s wall ({stage_cpu:.0f} s CPU) when made, budget {args.budget_s:.0f} s": (
                stage_wall <= args.budget_s
            ),
            f"{name}: SFT learned the format: most test responses end": sft.length_cut_share < 0.1,
            f"{name}: full DPO beats SFT by the ground truth": full.test(0.0).score(GROUND_TRUTH) > sft.score(GROUND_TRUTH),
            f"{name}, {least.title}: ground truth peaks at alpha {peak.alpha:g} > 0 on dev prompts": peak.alpha > 0,
            f"{name}, {least.title}: at the largest alpha the ground truth falls below alpha 0": (
                curve[-1].score(GROUND_TRUTH) < curve[0].score(GROUND_TRUTH)
            ),
        })
    print(f"\nThis invocation: {wall:.0f} s wall.")
    for name, passed in checks.items():
        print(f"{'ok    ' if passed else 'FAILED'} {name}")
    print(f"Report: {args.out / 'report.md'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
