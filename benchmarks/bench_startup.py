#!/usr/bin/env python
"""What installing mergekit-expo costs every Python process at start-up.

Not a test: it prints numbers and asserts nothing about them.

The wheel puts `mergekit_expo.pth` into site-packages, and site.py runs its
`import _mergekit_expo_startup` in every interpreter, whether or not it ever
touches mergekit. This script measures that honestly:

  1. builds the project wheel (`pip wheel --no-deps`, or takes --wheel);
  2. creates two fresh venvs from the same base interpreter (`python -m venv
     --without-pip`), installs the wheel with `--no-deps` into one ("installed":
     the .pth, the start-up module and the package, nothing else) and leaves the
     other bare;
  3. times `python -c pass` in both, interleaved (alternating which goes first),
     --runs times each after a warm-up, and prints medians and the difference;
  4. runs `python -X importtime -c pass` in both and lists the modules that only
     the installed venv imports (checking that no torch/mergekit/transformers is
     among them);
  5. does the same against the real project venv (this interpreter's venv, with
     everything installed), where other packages' .pth files also play a part.

    python benchmarks/bench_startup.py
    python benchmarks/bench_startup.py --runs 50 --keep --work-dir /tmp/startup
"""

import argparse
import glob
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from common import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "mergekit", "transformers", "numpy", "safetensors", "pydantic", "yaml")


def check(command: List[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


def base_python() -> str:
    """The interpreter the project venv was made from (so all venvs match)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def build_wheel(out_dir: str) -> str:
    """`pip wheel --no-deps .` with this interpreter's pip; hatchling from PyPI unless
    it is already importable here (then without build isolation)."""
    os.makedirs(out_dir, exist_ok=True)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", REPO, "-w", out_dir]
    if importlib.util.find_spec("hatchling") is not None:
        command.insert(4, "--no-build-isolation")
    check(command)
    wheels = glob.glob(os.path.join(out_dir, "mergekit_expo-*.whl"))
    if not wheels:
        raise SystemExit(f"no mergekit_expo wheel in {out_dir}")
    return max(wheels, key=os.path.getmtime)


def make_venv(path: str, python: str) -> str:
    check([python, "-m", "venv", "--without-pip", path])
    return os.path.join(path, "bin", "python")


def site_packages(python: str) -> str:
    return check([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                 ).stdout.strip()


def install_wheel(wheel: str, python: str) -> List[str]:
    """Install the wheel alone into the venv of `python` with this pip (--python)."""
    check([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
           "--no-index", "-q", wheel])
    return sorted(os.listdir(site_packages(python)))


def clean_env() -> Dict[str, str]:
    """The same small environment for every child: no PYTHON* variables, no venv."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep}


def time_once(python: str, env: Dict[str, str]) -> Tuple[float, float]:
    """Wall and CPU (user+sys, from os.wait4) seconds of `python -c pass`."""
    started = time.perf_counter()
    process = subprocess.Popen([python, "-c", "pass"], env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{python} -c pass failed")
    return wall, usage.ru_utime + usage.ru_stime


def time_pair(a: str, b: str, runs: int, warmup: int = 3) -> Dict[str, List[float]]:
    """Interleave a and b, alternating which goes first; return wall and CPU lists."""
    env = clean_env()
    for _ in range(warmup):
        time_once(a, env)
        time_once(b, env)
    result = {"a": [], "b": [], "a_cpu": [], "b_cpu": []}
    for index in range(runs):
        order = (("a", a), ("b", b)) if index % 2 == 0 else (("b", b), ("a", a))
        for key, python in order:
            wall, cpu = time_once(python, env)
            result[key].append(wall)
            result[f"{key}_cpu"].append(cpu)
    return result


def import_times(python: str) -> Dict[str, Tuple[int, int]]:
    """Module -> (self us, cumulative us) from `python -X importtime -c pass`."""
    stderr = check([python, "-X", "importtime", "-c", "pass"], env=clean_env()).stderr
    modules = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:"):].split("|")
        modules[name.strip()] = (int(self_us), int(cumulative_us))
    return modules





def report_pair(title: str, label_a: str, label_b: str, times: Dict[str, List[float]]) -> None:
    ms = lambda values: 1000 * statistics.median(values)  # noqa: E731
    paired = [1000 * (x - y) for x, y in zip(times["b"], times["a"])]
    print(title)
    print(table(
        ["interpreter", "median wall", "min wall", "median CPU"],
        [
            [label_a, f"{ms(times['a']):.2f} ms", f"{1000 * min(times['a']):.2f} ms",
             f"{ms(times['a_cpu']):.2f} ms"],
            [label_b, f"{ms(times['b']):.2f} ms", f"{1000 * min(times['b']):.2f} ms",
             f"{ms(times['b_cpu']):.2f} ms"],
        ],
    ))
    print(f"difference of medians (wall): {ms(times['b']) - ms(times['a']):+.2f} ms  "
          f"(target <= 5 ms)")
    print(f"median of paired differences (wall): {statistics.median(paired):+.2f} ms; "
          f"difference of min walls: {1000 * (min(times['b']) - min(times['a'])):+.2f} ms; "
          f"difference of median CPU: {ms(times['b_cpu']) - ms(times['a_cpu']):+.2f} ms")


def report_imports(title: str, bare: Dict, other: Dict) -> List[str]:
    extra = [name for name in other if name not in bare]
    heavy = [name for name in other if name.split(".")[0] in HEAVY]
    print(title)
    if extra:
        print(table(
            ["module imported only here", "self", "cumulative"],
            [[name, f"{other[name][0]} us", f"{other[name][1]} us"] for name in extra],
        ))
    else:
        print("(no modules beyond the bare interpreter's)")
    total = sum(other[name][0] for name in extra)
    print(f"modules: {len(other)} vs {len(bare)} bare; self time of the extra ones: {total} us")
    print(f"heavy imports ({', '.join(HEAVY)}): {', '.join(heavy) if heavy else 'none'}")
    return extra


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per interpreter")
    parser.add_argument("--work-dir", help="venvs and wheel go here (default: temp dir)")
    parser.add_argument("--wheel", help="an already built mergekit_expo wheel")
    parser.add_argument("--python", default=base_python(), help="base interpreter for the venvs")
    parser.add_argument("--project-venv", default=sys.prefix if sys.prefix != sys.base_prefix
                        else os.path.join(REPO, ".venv"),
                        help="the real venv with everything installed (default: this one)")
    parser.add_argument("--skip-project-venv", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)

    work_dir = args.work_dir or tempfile.mkdtemp(prefix="expo-startup-")
    os.makedirs(work_dir, exist_ok=True)
    try:
        started = time.perf_counter()
        wheel = args.wheel or build_wheel(os.path.join(work_dir, "wheel"))
        for name in ("bare", "installed"):
            shutil.rmtree(os.path.join(work_dir, name), ignore_errors=True)
        bare = make_venv(os.path.join(work_dir, "bare"), args.python)
        installed = make_venv(os.path.join(work_dir, "installed"), args.python)
        bare_files = sorted(os.listdir(site_packages(bare)))
        installed_files = install_wheel(wheel, installed)
        version = check([bare, "-c", "import sys; print(sys.version.split()[0])"]).stdout.strip()
        print(f"Base interpreter: {args.python} (Python {version}); wheel: "
              f"{os.path.basename(wheel)}; set-up {time.perf_counter() - started:.1f} s")
        print(f"bare venv site-packages:      {bare_files or '(empty)'}")
        added = [f for f in installed_files if f not in bare_files]
        print(f"installed venv site-packages: {added}")
        print(f"{args.runs} timed runs each, interleaved, after 3 warm-up runs each; "
              f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
              f"on {os.cpu_count()} CPUs")
        print()

        times = time_pair(bare, installed, args.runs)
        report_pair("python -c pass: bare venv vs venv with only mergekit-expo installed",
                    "bare venv", "mergekit-expo venv", times)
        print()
        bare_imports = import_times(bare)
        report_imports("python -X importtime -c pass in the mergekit-expo venv:",
                       bare_imports, import_times(installed))

        project_python = os.path.join(args.project_venv, "bin", "python")
        if args.skip_project_venv:
            pass
        elif not os.path.exists(project_python):
            print(f"\n(no project venv at {args.project_venv}: skipped)")
        else:
            print()
            pth = sorted(glob.glob(os.path.join(site_packages(project_python), "*.pth")))
            print(f"Project venv {args.project_venv}: .pth files "
                  f"{[os.path.basename(p) for p in pth]} (all of them run at start-up, not "
                  f"only ours; an editable install adds a sys.path entry)")
            times = time_pair(bare, project_python, args.runs)
            report_pair("python -c pass: bare venv vs the project venv (everything installed)",
                        "bare venv", "project venv", times)
            print()
            report_imports("python -X importtime -c pass in the project venv:",
                           bare_imports, import_times(project_python))
        print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    finally:
        if args.keep:
            print(f"Kept {work_dir}")
        elif not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            for name in ("bare", "installed"):
                shutil.rmtree(os.path.join(work_dir, name), ignore_errors=True)


if __name__ == "__main__":
    main()
