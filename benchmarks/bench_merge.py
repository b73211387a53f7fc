#!/usr/bin/env python
"""Benchmark an `expo` merge against vanilla mergekit and the paper's in-memory script.

Not a test: it prints numbers and asserts nothing about them.

It builds (once, cached in --work-dir) a synthetic llama-style SFT model theta0 of
about --size-gb in bfloat16 and an aligned model theta1 = theta0 + a DPO-sized
change (Gaussian noise of relative size 1e-3 added in float32, rounded back to
bfloat16, so most elements are unchanged and the rest move by a few ulps). Then it
runs, each in its own fresh subprocess and interleaved over --repeats rounds:

  (a) expo             mergekit-yaml, merge_method: expo, alpha, dtype: bfloat16
  (b) task_arithmetic  mergekit-yaml, weight 1 + alpha on theta1, base theta0,
                       dtype: float32, out_dtype: bfloat16
  (c) paper            transformers: load both models in bfloat16, p1 += alpha *
                       (p1 - p0) parameter by parameter in bfloat16, save_pretrained

and reports the median wall time and the largest peak RSS (ru_maxrss of the child,
from os.wait4) of each, their ratios, and how far each output is from the correctly
rounded reference theta1 + alpha * (theta1 - theta0) (float64, one rounding to
bfloat16).

    python benchmarks/bench_merge.py                    # about 1.5 GB model
    python benchmarks/bench_merge.py --quick            # small smoke run
    python benchmarks/bench_merge.py --work-dir /tmp/expo-bench --repeats 5
"""

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

from common import add_model_options, table

BENCH_FORMAT = 1  # bump when the synthetic model recipe changes
INIT_STD = 0.02  # LlamaConfig.initializer_range
DPO_SCALE = 1e-3  # relative size of theta1 - theta0 before rounding to bfloat16
SHARD_BYTES = 1 << 30  # input checkpoints are written in shards of at most 1 GiB

RUNS = ("expo", "task_arithmetic", "paper")
LABELS = {
    "expo": "(a) expo (mergekit-yaml)",
    "task_arithmetic": "(b) task_arithmetic (mergekit-yaml)",
    "paper": "(c) paper script (transformers, bf16)",
}


# --------------------------------------------------------------------------- model


def plan_config(size_gb: float):
    """A llama config whose bfloat16 weights come close to size_gb (1e9 bytes)."""
    from mergekit_expo.tiny import tiny_config

    if size_gb >= 0.5:
        hidden, intermediate, heads = 2048, 5504, 16
    elif size_gb >= 0.05:
        hidden, intermediate, heads = 512, 1376, 8
    else:
        hidden, intermediate, heads = 128, 352, 4
    vocab = 32000
    embed = 2 * vocab * hidden + hidden  # embed_tokens, lm_head, final norm
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    layers = max(1, round((size_gb * 1e9 / 2 - embed) / per_layer))
    config = tiny_config(vocab, hidden, layers, intermediate, heads)
    config.architectures = ["LlamaForCausalLM"]
    return config


def parameter_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the persistent state, from a meta-device model (no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _shards(shapes: Dict[str, Tuple[int, ...]]) -> List[List[str]]:
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def build_models(model_dir: str, size_gb: float, seed: int = 0) -> Dict:
    """Write theta0/ and theta1/ under model_dir unless a matching build is there."""
    import torch
    from safetensors.torch import save_file

    spec = {"format": BENCH_FORMAT, "size_gb": size_gb, "seed": seed, "scale": DPO_SCALE}
    marker = os.path.join(model_dir, "bench_model.json")
    if os.path.exists(marker):
        with open(marker) as handle:
            info = json.load(handle)
        if info.get("spec") == spec:
            print(f"Using cached models in {model_dir}")
            return info
    shutil.rmtree(model_dir, ignore_errors=True)
    started = time.perf_counter()
    config = plan_config(size_gb)
    config.dtype = torch.bfloat16
    shapes = parameter_shapes(config)
    shards = _shards(shapes)
    paths = {key: os.path.join(model_dir, key) for key in ("theta0", "theta1")}
    for path in paths.values():
        os.makedirs(path)
        config.save_pretrained(path)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total_bytes, changed, numel = {}, 0, 0, 0
    for index, names in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        theta0, theta1 = {}, {}
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                base = torch.ones(shape)
            else:
                base = torch.randn(shape, generator=generator).mul_(INIT_STD)
            t0 = base.to(torch.bfloat16)
            base = t0.float()
            rms = base.square().mean().sqrt().item()
            noise = torch.randn(shape, generator=generator).mul_(DPO_SCALE * rms)
            t1 = base.add_(noise).to(torch.bfloat16)
            del noise, base
            changed += int((t0 != t1).sum())
            numel += t0.numel()
            theta0[name], theta1[name] = t0, t1
            weight_map[name] = filename
            total_bytes += 2 * t0.numel()
        save_file(theta0, os.path.join(paths["theta0"], filename), metadata={"format": "pt"})
        save_file(theta1, os.path.join(paths["theta1"], filename), metadata={"format": "pt"})
        del theta0, theta1
    index_json = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    for path in paths.values():
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as handle:
            json.dump(index_json, handle, indent=2)
    info = {
        "spec": spec,
        "paths": paths,
        "params": numel,
        "bytes": total_bytes,
        "changed_fraction": changed / numel,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
        "shards": len(shards),
        "build_seconds": time.perf_counter() - started,
    }
    with open(marker, "w") as handle:
        json.dump(info, handle, indent=2)
    print(f"Built models in {info['build_seconds']:.1f} s under {model_dir}")
    return info


# --------------------------------------------------------------------------- runs


def write_recipes(work_dir: str, paths: Dict[str, str], alpha: float) -> Dict[str, str]:
    import yaml

    recipes = {
        "expo": {
            "merge_method": "expo",
            "base_model": paths["theta0"],
            "models": [{"model": paths["theta1"]}],
            "parameters": {"alpha": alpha},
            "dtype": "bfloat16",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": paths["theta0"],
            "models": [{"model": paths["theta1"], "parameters": {"weight": 1.0 + alpha}}],
            "dtype": "float32",
            "out_dtype": "bfloat16",
        },
    }
    files = {}
    for name, recipe in recipes.items():
        files[name] = os.path.join(work_dir, f"{name}.yaml")
        with open(files[name], "w") as handle:
            yaml.safe_dump(recipe, handle, sort_keys=False)
    return files


def paper_worker(theta0: str, theta1: str, out: str, alpha: float) -> None:
    """The paper's released approach: two bfloat16 models in memory, update, save."""
    import torch
    from transformers import AutoModelForCausalLM

    sft = AutoModelForCausalLM.from_pretrained(theta0, dtype=torch.bfloat16)
    aligned = AutoModelForCausalLM.from_pretrained(theta1, dtype=torch.bfloat16)
    sft_params = dict(sft.named_parameters())
    with torch.no_grad():
        for name, p1 in aligned.named_parameters():
            p1 += alpha * (p1 - sft_params[name])
    aligned.save_pretrained(out)


def mergekit_yaml() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    if os.path.exists(candidate):
        return candidate
    return shutil.which("mergekit-yaml") or "mergekit-yaml"


def command_for(run: str, recipes, paths, out: str, alpha: float, extra: List[str]):
    if run == "paper":
        return [
            sys.executable, os.path.abspath(__file__), "_paper_worker",
            paths["theta0"], paths["theta1"], out, repr(alpha),
        ]
    return [mergekit_yaml(), recipes[run], out, "--no-copy-tokenizer", *extra]


class AnonPoller(threading.Thread):
    """Samples RssAnon of a process from /proc every `interval` s, keeping the peak.

    ru_maxrss counts file pages mapped in (mergekit and transformers both mmap the
    safetensors inputs, so touched input pages count as resident although the page
    cache owns them); RssAnon is the process's own heap, the part that needs RAM.
    """

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.path, self.interval = f"/proc/{pid}/status", interval
        self.peak_kib = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                with open(self.path) as handle:
                    for line in handle:
                        if line.startswith("RssAnon:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                            break
            except (OSError, ValueError):
                return
            self.halt.wait(self.interval)


def run_child(command: List[str], log_path: str, env: Dict[str, str]) -> Dict[str, float]:
    """Run command in a fresh process: wall time, its rusage via os.wait4, peak RssAnon."""
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        poller = AnonPoller(process.pid)
        poller.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        poller.halt.set()
        poller.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-4000:]
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{tail}")
    return {
        "wall": wall,
        "rss_mib": usage.ru_maxrss / 1024.0,  # KiB on Linux
        "anon_mib": poller.peak_kib / 1024.0,
        "cpu": usage.ru_utime + usage.ru_stime,
    }


def settle(paths: Dict[str, str]) -> None:
    """Flush dirty pages (earlier outputs, a fresh build) and warm the inputs' page
    cache, so every timed run starts from the same state: inputs cached, disk idle."""
    os.sync()
    for path in paths.values():
        for filename in sorted(os.listdir(path)):
            with open(os.path.join(path, filename), "rb") as handle:
                while handle.read(1 << 24):
                    pass


# --------------------------------------------------------------------------- accuracy


def _tensor_files(path: str) -> Dict[str, str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            weight_map = json.load(handle)["weight_map"]
        return {name: os.path.join(path, f) for name, f in weight_map.items()}
    from safetensors import safe_open

    files = {}
    for filename in sorted(os.listdir(path)):
        if filename.endswith(".safetensors"):
            with safe_open(os.path.join(path, filename), "pt") as handle:
                for name in handle.keys():
                    files[name] = os.path.join(path, filename)
    return files


def round_to_bf16(x):
    """Correctly rounded float64 -> bfloat16 (nearest, ties to even).

    torch rounds float64 -> bfloat16 through float32, which can round twice; going
    through float32 with round-to-odd first gives one correct rounding (float32 has
    more than bfloat16's precision + 2 bits).
    """
    import torch

    f = x.to(torch.float32)
    inexact = f.to(torch.float64) != x
    bits = f.view(torch.int32)
    away = f.to(torch.float64).abs() > x.abs()  # nearest rounding went away from zero
    truncated = torch.where(away & inexact, bits - 1, bits)
    odd = torch.where(inexact, truncated | 1, truncated)
    return odd.view(torch.float32).to(torch.bfloat16)


def _ordered(bf16):
    """bfloat16 bit patterns as integers that count ulps (sign-magnitude -> linear)."""
    import torch

    bits = bf16.view(torch.int16).to(torch.int32)
    magnitude = bits & 0x7FFF
    return torch.where(bits < 0, -magnitude, magnitude)


def _ulp_of(bf16):
    """The bfloat16 ulp at each element's magnitude, in float64."""
    import torch

    exponent = (bf16.view(torch.int16).to(torch.int32) >> 7) & 0xFF
    return torch.exp2((exponent.clamp_min(1) - 134).to(torch.float64))


def accuracy(paths: Dict[str, str], outputs: Dict[str, str], alpha: float, chunk: int = 1 << 18):
    """Per output, against the correctly rounded reference: elements that differ,
    elements more than 1 ulp away (counting the bf16 values between), the largest
    |output - reference| in bf16 ulps of max(|theta0|, |theta1|), the weight's own
    scale (near-zero results of cancellation would make plain ulp counts huge for
    harmless absolute errors), and elements that differ from theta1 (that the
    extrapolation moved). Bit patterns are compared, so -0 != +0."""
    import torch
    from safetensors import safe_open

    # Small chunks on one thread: an order of magnitude faster here than 2 threads
    # on big chunks (no OpenMP barriers, fewer page faults, cache-sized temporaries).
    torch.set_num_threads(1)
    sources = {key: _tensor_files(path) for key, path in {**paths, **outputs}.items()}
    handles: Dict[str, object] = {}

    def load(key: str, name: str):
        filename = sources[key].get(name)
        if filename is None:
            raise SystemExit(f"{key} output has no tensor {name}")
        if filename not in handles:
            handles[filename] = safe_open(filename, "pt")
        return handles[filename].get_tensor(name)

    keys = ["reference", *outputs]
    stats = {key: {"diff": 0, "farther": 0, "off1": 0, "err": 0.0, "moved": 0} for key in keys}
    numel = 0
    for name in sources["theta0"]:
        t0 = load("theta0", name).reshape(-1)
        t1 = load("theta1", name).reshape(-1)
        outs = {key: load(key, name).reshape(-1) for key in outputs}
        for key, tensor in outs.items():
            if tensor.dtype != torch.bfloat16 or tensor.shape != t0.shape:
                raise SystemExit(f"{key}:{name} is {tensor.dtype} {tuple(tensor.shape)}")
        numel += t0.numel()
        for start in range(0, t0.numel(), chunk):
            b0, b1 = t0[start : start + chunk], t1[start : start + chunk]
            a1 = b1.to(torch.float64)
            exact = a1 + alpha * (a1 - b0.to(torch.float64))
            reference = round_to_bf16(exact)
            ref_bits, b1_bits = reference.view(torch.int16), b1.view(torch.int16)
            stats["reference"]["moved"] += int((ref_bits != b1_bits).sum())
            for key, tensor in outs.items():
                piece = tensor[start : start + chunk]
                where = (piece.view(torch.int16) != ref_bits).nonzero().squeeze(1)
                s = stats[key]
                s["moved"] += int((piece.view(torch.int16) != b1_bits).sum())
                if where.numel() == 0:
                    continue
                wrong, ref = piece[where], reference[where]
                ulps = (_ordered(wrong) - _ordered(ref)).abs()
                scale = _ulp_of(torch.maximum(b1[where].abs(), b0[where].abs()))
                error = (wrong.to(torch.float64) - ref.to(torch.float64)).abs() / scale
                s["diff"] += where.numel()
                # Not a nearest value at all; at exact ties either neighbour is nearest.
                target = exact[where]
                gap = (wrong.to(torch.float64) - target).abs() - (ref.to(torch.float64) - target).abs()
                s["farther"] += int((gap > target.abs() * 2.0**-40).sum())
                s["off1"] += int((ulps > 1).sum())
                s["err"] = max(s["err"], float(error.max()))
    handles.clear()
    return stats, numel


# --------------------------------------------------------------------------- report


def _fmt_mib(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"





def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def versions() -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}"]
    for package in ("torch", "transformers", "mergekit", "safetensors", "mergekit-expo"):
        try:
            parts.append(f"{package} {md.version(package)}")
        except md.PackageNotFoundError:
            parts.append(f"{package} (missing)")
    return ", ".join(parts)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_paper_worker":
        theta0, theta1, out, alpha = argv[1:5]
        paper_worker(theta0, theta1, out, float(alpha))
        return

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, size_gb=1.5, runs="a, b, c")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument(
        "--mergekit-args", default="",
        help="extra options for both mergekit-yaml runs, e.g. '--out-shard-size 1B'",
    )
    parser.add_argument(
        "--threads", type=int,
        help="OMP_NUM_THREADS for the timed runs (default: unset, torch uses all cores)",
    )
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--keep-outputs", action="store_true", help="leave the merged models")
    args = parser.parse_args(argv)
    size_gb = 0.1 if args.quick and args.size_gb == 1.5 else args.size_gb
    repeats = args.repeats or (1 if args.quick else 3)
    extra = args.mergekit_args.split()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)

    temporary = args.work_dir is None
    work_dir = tempfile.mkdtemp(prefix="expo-bench-") if temporary else args.work_dir
    os.makedirs(work_dir, exist_ok=True)
    try:
        model_dir = os.path.join(work_dir, f"models-{size_gb:g}gb-seed{args.seed}")
        info = build_models(model_dir, size_gb, args.seed)
        paths = info["paths"]
        recipes = write_recipes(work_dir, paths, args.alpha)
        outputs = {run: os.path.join(work_dir, "out", run) for run in RUNS}
        logs = os.path.join(work_dir, "logs")
        os.makedirs(logs, exist_ok=True)

        print()
        print(f"Model: llama, {info['layers']} layers, hidden {info['hidden']}, "
              f"intermediate {info['intermediate']}, vocab {info['vocab']}: "
              f"{info['params'] / 1e6:.0f}M params, {info['bytes'] / 1e9:.2f} GB bf16 "
              f"per model in {info['shards']} shard(s)")
        print(f"theta1 - theta0: {100 * info['changed_fraction']:.1f}% of bf16 elements "
              f"changed (noise {DPO_SCALE:g} x tensor RMS)")
        print(f"alpha {args.alpha}, {repeats} interleaved round(s), {os.cpu_count()} CPUs, "
              f"mergekit options: --no-copy-tokenizer {' '.join(extra)}".rstrip())
        print(versions())
        threads = f"OMP_NUM_THREADS={args.threads}" if args.threads else "torch default threads"
        print(f"{threads}; load average before the runs: {_load()} (other processes skew "
              f"timings, torch's thread pool especially when cores are oversubscribed)")
        print()

        results: Dict[str, List[Dict[str, float]]] = {run: [] for run in RUNS}
        for round_index in range(repeats):
            for run in RUNS:
                shutil.rmtree(outputs[run], ignore_errors=True)
                settle(paths)
                command = command_for(run, recipes, paths, outputs[run], args.alpha, extra)
                log_path = os.path.join(logs, f"{run}-{round_index}.log")
                result = run_child(command, log_path, env)
                results[run].append(result)
                print(f"  round {round_index + 1}/{repeats} {run:<16} "
                      f"{result['wall']:7.1f} s  peak RSS {_fmt_mib(result['rss_mib'])}, "
                      f"peak RssAnon {_fmt_mib(result['anon_mib'])}",
                      flush=True)

        print(f"  load average after the runs: {_load()}")
        summary = {}
        for run in RUNS:
            walls = [r["wall"] for r in results[run]]
            summary[run] = {
                "wall": statistics.median(walls),
                "min": min(walls),
                "max": max(walls),
                "rss": max(r["rss_mib"] for r in results[run]),
                "anon": max(r["anon_mib"] for r in results[run]),
                "cpu": statistics.median(r["cpu"] for r in results[run]),
            }
        print()
        print(f"Timing and memory (median wall and CPU over {repeats} run(s); largest peaks)")
        print(table(
            ["run", "wall median", "wall min..max", "CPU user+sys", "peak RSS",
             "peak RssAnon"],
            [
                [LABELS[run], f"{s['wall']:.1f} s", f"{s['min']:.1f}..{s['max']:.1f} s",
                 f"{s['cpu']:.1f} s", _fmt_mib(s["rss"]), _fmt_mib(s["anon"])]
                for run, s in summary.items()
            ],
        ))
        print("peak RSS: ru_maxrss from os.wait4, counts mmapped input pages; peak RssAnon: "
              "/proc/PID/status sampled every 20 ms (private memory only)")
        expo, ta, paper = (summary[run] for run in RUNS)
        print()
        print(table(
            ["ratio", "value", "target"],
            [
                ["expo wall / task_arithmetic wall", f"{expo['wall'] / ta['wall']:.2f}", "<= 1.1"],
                ["expo peak RSS / paper peak RSS", f"{expo['rss'] / paper['rss']:.2f}", "<= 0.5"],
                ["expo peak RssAnon / paper peak RssAnon",
                 f"{expo['anon'] / paper['anon']:.2f}", "(info)"],
                ["expo wall / paper wall", f"{expo['wall'] / paper['wall']:.2f}", "(info)"],
                ["expo peak RSS / task_arithmetic peak RSS",
                 f"{expo['rss'] / ta['rss']:.2f}", "(info)"],
                ["expo CPU / task_arithmetic CPU", f"{expo['cpu'] / ta['cpu']:.2f}", "(info)"],
            ],
        ))

        if not args.skip_accuracy:
            started = time.perf_counter()
            stats, numel = accuracy(paths, outputs, args.alpha)
            print()
            print(f"Accuracy vs the correctly rounded reference theta1 + {args.alpha} * "
                  f"(theta1 - theta0) (float64, one rounding to bf16); {numel / 1e6:.0f}M "
                  f"elements, checked in {time.perf_counter() - started:.0f} s")
            def share(count: int) -> str:
                return f"{100 * count / numel:.4f}% ({count})"

            rows = [["reference (float64, 1 rounding)", share(0), share(0), share(0), "0",
                     share(stats["reference"]["moved"])]]
            for run in RUNS:
                s = stats[run]
                rows.append([LABELS[run], share(s["diff"]), share(s["farther"]), share(s["off1"]),
                             f"{s['err']:.3g}", share(s["moved"])])
            print(table(["output", "!= reference", "not nearest (ties ok)", "> 1 ulp off",
                          "max err [weight ulp]", "!= theta1 (moved)"], rows))
        print()
        if not temporary:
            print(f"Logs: {logs}; cached models: {model_dir}")
        if not args.keep_outputs:
            shutil.rmtree(os.path.join(work_dir, "out"), ignore_errors=True)
        else:
            print(f"Outputs: {os.path.join(work_dir, 'out')}")
    finally:
        if temporary and not args.keep_outputs:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
