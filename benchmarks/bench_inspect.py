#!/usr/bin/env python
"""Benchmark `mergekit-expo inspect` against reading both models once.

Not a test: it prints numbers and asserts nothing about them.

It builds (once, cached in --work-dir; bench_merge.py's builder and cache layout)
a synthetic llama-style bfloat16 pair theta0, theta1 = theta0 + a DPO-sized change
of about --size-gb each, then runs, each in its own fresh subprocess, interleaved
over --repeats rounds, with the inputs in the page cache before every run (warm)
and, with --cache cold or both, evicted from it (cold: read from disk, as a model
just copied in or too large to stay cached would be):

  (i)   read     safetensors: every tensor of both models, one at a time, copied
                 into memory once (`safe_open(...).get_tensor(name).clone()`)
  (ii)  inspect  mergekit-expo inspect theta0 theta1 --json ... (default alphas and
                 dtypes: alpha 0.3; bfloat16, float16, float32)
  (iii) startup  mergekit-expo --help: the start-up part of (ii), for reference

and prints median wall times, the ratio inspect / read (target <= 1.2), and peak
RSS (ru_maxrss, counts mmapped input pages) and peak RssAnon of each.

    python benchmarks/bench_inspect.py                                  # about 1 GB
    python benchmarks/bench_inspect.py --work-dir /tmp/eb15 --size-gb 1.5   # bench_merge's pair
    python benchmarks/bench_inspect.py --quick --cache warm
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import _fmt_mib, _load, build_models, run_child, settle, versions  # noqa: E402
from common import add_model_options, table  # noqa: E402

RUNS = ("read", "inspect", "startup")
LABELS = {
    "read": "(i) read both models (safetensors)",
    "inspect": "(ii) mergekit-expo inspect",
    "startup": "(iii) mergekit-expo --help",
}


def evict(paths: Dict[str, str]) -> None:
    """Drop the inputs from the page cache (clean pages; no privileges needed)."""
    os.sync()
    for path in paths.values():
        for filename in os.listdir(path):
            descriptor = os.open(os.path.join(path, filename), os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def read_worker(folders: List[str]) -> None:
    """Copy every tensor of every shard into memory once, one tensor at a time."""
    from safetensors import safe_open

    for folder in folders:
        for filename in sorted(os.listdir(folder)):
            if filename.endswith(".safetensors"):
                with safe_open(os.path.join(folder, filename), "pt") as handle:
                    for name in handle.keys():
                        handle.get_tensor(name).clone()


def console_script() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "mergekit-expo")
    return candidate if os.path.exists(candidate) else shutil.which("mergekit-expo") or "mergekit-expo"


def command_for(run: str, paths: Dict[str, str], json_path: str) -> List[str]:
    if run == "read":
        return [sys.executable, os.path.abspath(__file__), "_read", paths["theta0"], paths["theta1"]]
    if run == "startup":
        return [console_script(), "--help"]
    return [console_script(), "inspect", paths["theta0"], paths["theta1"], "--json", json_path]


def bench_cache(cache: str, paths, info, repeats: int, json_path: str, logs: str) -> None:
    """Interleaved rounds of (i, ii, iii) with the page cache warm or cold; print the table."""
    prepare = settle if cache == "warm" else evict
    results: Dict[str, List[Dict[str, float]]] = {run: [] for run in RUNS}
    for round_index in range(repeats):
        for run in RUNS:
            prepare(paths)
            log_path = os.path.join(logs, f"inspect-{cache}-{run}-{round_index}.log")
            result = run_child(command_for(run, paths, json_path), log_path, dict(os.environ))
            results[run].append(result)
            print(f"  {cache} round {round_index + 1}/{repeats} {run:<8} {result['wall']:6.1f} s  "
                  f"peak RSS {_fmt_mib(result['rss_mib'])}, "
                  f"peak RssAnon {_fmt_mib(result['anon_mib'])}", flush=True)
    print(f"  load average after the runs: {_load()}")
    summary = {
        run: {
            "wall": statistics.median(r["wall"] for r in rows),
            "cpu": statistics.median(r["cpu"] for r in rows),
            "rss": max(r["rss_mib"] for r in rows),
            "anon": max(r["anon_mib"] for r in rows),
        }
        for run, rows in results.items()
    }
    print()
    print(f"Page cache {cache}: median wall and CPU over {repeats} run(s); largest peaks")
    print(table(
        ["run", "wall median", "CPU user+sys", "peak RSS", "peak RssAnon"],
        [[LABELS[run], f"{s['wall']:.2f} s", f"{s['cpu']:.1f} s", _fmt_mib(s["rss"]),
          _fmt_mib(s["anon"])] for run, s in summary.items()],
    ))
    read, inspect, startup = (summary[run] for run in RUNS)
    print()
    print(table(
        ["ratio (page cache " + cache + ")", "value", "target"],
        [
            ["inspect wall / read wall", f"{inspect['wall'] / read['wall']:.2f}", "<= 1.2"],
            ["(inspect - startup) / read wall",
             f"{(inspect['wall'] - startup['wall']) / read['wall']:.2f}", "(info)"],
            ["inspect peak RSS / model size",
             f"{inspect['rss'] * 2**20 / info['bytes']:.2f}", "(info)"],
        ],
    ))
    print()


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_read":
        read_worker(argv[1:])
        return
    if argv and argv[0] == "_build":
        build_models(argv[1], float(argv[2]), int(argv[3]))
        return

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, size_gb=1.0, runs="i, ii, iii")
    parser.add_argument("--cache", choices=("warm", "cold", "both"), default="both",
                        help="inputs in the page cache before each run, evicted, or both")
    args = parser.parse_args(argv)
    size_gb = 0.1 if args.quick and args.size_gb == 1.0 else args.size_gb
    repeats = args.repeats or (1 if args.quick else 3)

    temporary = args.work_dir is None
    work_dir = tempfile.mkdtemp(prefix="expo-inspect-") if temporary else args.work_dir
    os.makedirs(work_dir, exist_ok=True)
    try:
        model_dir = os.path.join(work_dir, f"models-{size_gb:g}gb-seed{args.seed}")
        # In a child: a parent grown by torch would pass its peak RSS on to every
        # child it forks (Linux keeps ru_maxrss across exec).
        build = [sys.executable, os.path.abspath(__file__), "_build", model_dir, str(size_gb), str(args.seed)]
        subprocess.run(build, check=True)
        with open(os.path.join(model_dir, "bench_model.json")) as handle:
            info = json.load(handle)
        paths = info["paths"]
        json_path = os.path.join(work_dir, "inspect.json")
        logs = os.path.join(work_dir, "logs")
        os.makedirs(logs, exist_ok=True)
        print()
        print(f"Model pair: {info['params'] / 1e6:.0f}M params, {info['bytes'] / 1e9:.2f} GB "
              f"bf16 per model in {info['shards']} shard(s); largest tensor "
              f"{info['vocab'] * info['hidden'] * 2 / 2**20:.0f} MiB (embeddings)")
        print(f"{repeats} interleaved round(s), {os.cpu_count()} CPUs; {versions()}")
        print(f"load average before the runs: {_load()}")
        print()

        caches = ("warm", "cold") if args.cache == "both" else (args.cache,)
        for cache in caches:
            bench_cache(cache, paths, info, repeats, json_path, logs)
        with open(json_path) as handle:
            total = json.load(handle)["total"]
        print()
        print(f"inspect: normalized ||delta|| {total['normalized_frobenius']:.3e}, "
              f"{100 * total['changed_fraction']:.1f}% changed; rounding loss: " + ", ".join(
                  f"{r['dtype']} alpha {r['alpha']:g} keeps {100 * r['kept_along_delta']:.0f}%"
                  for r in total["rounding"]))
        if not temporary:
            print(f"Logs: {logs}; cached models: {model_dir}")
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
