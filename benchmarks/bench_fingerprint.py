#!/usr/bin/env python
"""The cost of the sweep's content fingerprint (every byte of every file) on a checkpoint pair.

Not a test: it prints figures measured side by side in one run.

It builds (once, cached in --work-dir) bench_sweep_memory.py's bf16 llama pair of about
--size-gb each, then, for theta0 and theta1 together (the models a sweep fingerprints), over
--repeats rounds:

  read cold        every file read once in fingerprint.BLOCK pieces, evicted from the page
                   cache before (posix_fadvise DONTNEED: a model just copied in)
  digest cold      model_fingerprint with an empty digest cache, files evicted
  read warm        the same read, files in the page cache
  digest warm      model_fingerprint with an empty digest cache, files in the page cache
  cached           model_fingerprint again: its digest cache holds every file (stat only)

and extrapolates to a 70B checkpoint (140 GB in 5 GB shards) at the measured cold and warm
rates and at a typical NVMe's 3 GB/s. The eviction needs no privileges, but on a virtual
machine the host may still cache the disk image: compare "read cold" with the disk's rate.

    python benchmarks/bench_fingerprint.py [--work-dir /tmp/expo-bench-sweep-memory] [--size-gb 1.6]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_inspect import evict  # noqa: E402
from bench_merge import settle  # noqa: E402
from bench_sweep_memory import build  # noqa: E402
from common import table  # noqa: E402

from expo_eval import fingerprint  # noqa: E402

BYTES_70B = 140e9
FILES_70B = 38  # 28 shards of 5 GB, configs, tokenizer files, index
NVME = 3e9


def read_all(paths: Dict[str, str]) -> None:
    """Every file once, in the fingerprint's block size, nothing hashed."""
    block = bytearray(fingerprint.BLOCK)
    for folder in paths.values():
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb", buffering=0) as handle:
                while handle.readinto(block):
                    pass


def fingerprint_all(paths: Dict[str, str]) -> None:
    for folder in paths.values():
        fingerprint.model_fingerprint(folder)


def timed(prepare: Callable, run: Callable, paths) -> Dict[str, float]:
    prepare(paths)
    started, cpu = time.perf_counter(), time.process_time()
    run(paths)
    return {"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/expo-bench-sweep-memory"))
    parser.add_argument("--size-gb", type=float, default=1.6, help="bf16 model size (1e9 bytes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    args.work_dir.mkdir(parents=True, exist_ok=True)
    paths = build(args.work_dir, args.size_gb)["paths"]
    files = [os.path.join(folder, name) for folder in paths.values() for name in os.listdir(folder)]
    total = sum(os.path.getsize(f) for f in files)
    wait = max(0.0, fingerprint.RECENT_NS / 1e9 - (time.time() - max(os.stat(f).st_ctime for f in files)))
    time.sleep(wait)  # a file written less than RECENT_NS ago is hashed but never cached

    digests = tempfile.TemporaryDirectory(prefix="expo-digests-")

    def empty_cache(prepare):
        def run(paths):
            os.environ[fingerprint.DIGEST_CACHE_ENV] = tempfile.mkdtemp(dir=digests.name)
            prepare(paths)
        return run

    cases = [
        ("read cold", evict, read_all),
        ("digest cold", empty_cache(evict), fingerprint_all),
        ("read warm", settle, read_all),
        ("digest warm", empty_cache(settle), fingerprint_all),
        ("cached", settle, fingerprint_all),  # the digest cache of the round's "digest warm"
    ]
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name, _, _ in cases}
    for _ in range(args.repeats):
        for name, prepare, run in cases:
            results[name].append(timed(prepare, run, paths))
    cached_entries = len(fingerprint._read_digests(fingerprint.digest_cache_path()))
    digests.cleanup()

    rows = []
    for name, _, _ in cases:
        wall = statistics.median(r["wall"] for r in results[name])
        cpu = statistics.median(r["cpu"] for r in results[name])
        rate = total / wall
        if name == "cached":
            extrapolated = f"{wall / len(files) * FILES_70B * 1e3:.1f} ms (stat only)"
        else:
            extrapolated = f"{BYTES_70B / rate:.0f} s"
        rows.append([name, f"{wall:.3f}", f"{cpu:.3f}", f"{rate / 1e9:.2f}" if name != "cached" else "-", extrapolated])
    print(f"theta0 + theta1: {total / 1e9:.2f} GB in {len(files)} files; {args.repeats} rounds, medians; "
          f"{os.cpu_count()} CPUs (shared with other work: see the load average {os.getloadavg()[0]:.1f}); "
          f"the cache held {cached_entries} of {len(files)} files")
    print(table(["run", "wall s", "CPU s", "GB/s", "70B (140 GB)"], rows))
    print(f"70B at a typical NVMe's {NVME / 1e9:.0f} GB/s: {BYTES_70B / NVME:.0f} s to read (and hash) once, "
          "then stat only")


if __name__ == "__main__":
    main()
