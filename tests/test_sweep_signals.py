"""Ctrl-C and SIGTERM against the sweep: a report swap is never cut in half by either (the moves
hold them back until the report is whole), and SIGTERM unwinds like Ctrl-C, so the lock and the
staged report are removed and the command says what survives."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from conftest import REPO

from expo_eval.files import REPORT_MANIFEST, REPORT_STAGING, replace_report
from mergekit_expo.signals import terminate_cleanly


def report(files):
    def write(staging):
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)

    return write


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_a_signal_during_the_report_swap_acts_once_the_report_is_whole(tmp_path, monkeypatch, signum, raised):
    """attackA #4/#5: the signal arrives as the second staged file moves in, with another
    thread running (a signal mask on the main thread alone would not hold it back)."""
    old = {"best.yaml": "old", "results.json": "old", "generations/alpha=0.5.jsonl": "old"}
    new = {"best.yaml": "new", "results.json": "new", "generations/alpha=1.jsonl": "new"}
    replace_report(tmp_path, report(old))
    real_replace, moved = os.replace, []

    def replace(source, target, *args, **kwargs):
        if REPORT_STAGING in str(source) and REPORT_MANIFEST not in str(source):
            moved.append(source)
            if len(moved) == 2:
                os.kill(os.getpid(), signum)
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    done = threading.Event()
    worker = threading.Thread(target=done.wait)  # as torch's are: the kernel may hand it the signal
    worker.start()
    try:
        with terminate_cleanly(), pytest.raises(raised):
            replace_report(tmp_path, report(new))
    finally:
        done.set()
        worker.join()
    monkeypatch.undo()
    assert len(moved) == 3
    for name, text in new.items():
        assert (tmp_path / name).read_text() == text
    assert not (tmp_path / "generations/alpha=0.5.jsonl").exists()
    assert sorted(json.loads((tmp_path / REPORT_MANIFEST).read_text())) == sorted(new)
    assert not (tmp_path / REPORT_STAGING).exists()


TERMINATE_AT_BEST_RECIPE = """
import os, signal, sys
import expo_eval.report
real = expo_eval.report.best_recipe
def best_recipe(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
expo_eval.report.best_recipe = best_recipe
import expo_eval.cli
from mergekit_expo.cli import main
sys.argv = ["mergekit-expo", *sys.argv[1:]]
main()
"""


def test_sigterm_during_a_sweep_unwinds_like_ctrl_c(recipe, tmp_path):
    """attackA #23: it was exit 143 with no message, the lock and a half-written staging left."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "tests")}
    result = subprocess.run(
        [sys.executable, "-c", TERMINATE_AT_BEST_RECIPE, "sweep", str(recipe), "--out", str(out), "--alphas", "0.5",
         "--prompts", "smoke", "--limit", "2", "--max-new-tokens", "2", "--device", "cpu",
         "--reward-model", "rewards:word_count"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert f"Error: terminated; finished candidates are cached in {out / 'cache'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / ".sweep.lock").exists() and not (out / REPORT_STAGING).exists()
    assert not (out / "results.json").exists()  # the report was cut before its swap: none is left
