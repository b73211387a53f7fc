"""The sweep's output folder: refused where writing could destroy something, a report replaced
only whole, only the sweep's own files removed, write failures and odd locks as one line."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import expo_recipe, run_cli, write_recipe
from test_sweep_trust import FakeBackend, folder, run, sweep_config  # noqa: F401 (folder: a fixture)

import expo_eval.files
from expo_eval.files import REPORT_MANIFEST, REPORT_STAGING, finish_report_swap, replace_report
from expo_eval.lock import SweepLockedError
from expo_eval.outdir import OutputFolderError
from expo_eval.scoring import ScorerError

TESTS = Path(__file__).parent
REPORT = ("results.json", "best.yaml", "card_table.md", "results.csv")


def snapshot(out: Path) -> dict:
    """Every file under `out` (the cache and the lock aside) by relative path, with its bytes."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.relative_to(out).parts[0] not in ("cache", ".sweep.lock")
    }


def test_out_dot_is_refused_and_the_users_files_stay(family, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "alpaca_eval").mkdir(parents=True)
    (project / "alpaca_eval" / "mine.json").write_text("[]\n")
    (project / "generations").mkdir()
    (project / "generations" / "human_labels.jsonl").write_text('{"label": 1}\n')
    (project / "results.json").write_text('{"mine": true}\n')
    write_recipe(project / "recipe.yaml", expo_recipe(family))
    before = snapshot(project)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    result = run_cli("mergekit-expo", "sweep", "recipe.yaml", "--out", ".", "--alphas", "0.5", "--prompts", "smoke",
                     "--limit", "2", "--max-new-tokens", "4", "--reward-model", "rewards:word_count",
                     cwd=project, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1] == (
        f"Error: the output folder {project.absolute()} is the current folder: a sweep replaces its report, "
        "generations/ and alpaca_eval/ there; give it a folder of its own (e.g. --out sweep)"
    )
    assert snapshot(project) == before and not (project / ".sweep.lock").exists()


def test_a_folder_holding_a_foreign_file_is_refused_naming_it(folder, tmp_path):
    config = sweep_config(folder, tmp_path)
    run(config)  # an earlier sweep's folder is accepted
    (config.out / "notes.txt").write_text("mine\n")
    before = snapshot(config.out)
    with pytest.raises(OutputFolderError, match=r"holds files a sweep does not write \(notes.txt\)"):
        run(config)
    assert snapshot(config.out) == before


@pytest.mark.parametrize("where, message", [
    ("dpo", "is the aligned model's folder"),
    ("dpo/sweep", "lies inside the aligned model's folder"),
    (".", "contains the theta0 folder"),
])
def test_out_is_inside_or_contains_an_input_model_is_refused(folder, tmp_path, where, message):
    recipe_config = sweep_config(folder, tmp_path)
    out = (folder / where).resolve()
    config = recipe_config.model_copy(update={"out": out})
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    backend = FakeBackend()
    with pytest.raises(OutputFolderError, match=re.escape(f"the output folder {out} {message}")):
        run(config, backend)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # no cache, no lock
    assert backend.generated == [] and not (folder / "dpo" / "sweep").exists()


def test_out_that_is_a_file_is_refused(folder, tmp_path):
    config = sweep_config(folder, tmp_path)
    config.out.write_text("a file\n")
    with pytest.raises(OutputFolderError, match=r"is a file, not a folder"):
        run(config)
    assert config.out.read_text() == "a file\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only folder anyway")
def test_a_read_only_out_is_refused(folder, tmp_path):
    config = sweep_config(folder, tmp_path)
    run(config)
    before = snapshot(config.out)
    config.out.chmod(0o555)
    try:
        with pytest.raises(OutputFolderError, match=r"is not writable"):
            run(config)
    finally:
        config.out.chmod(0o755)
    assert snapshot(config.out) == before


def test_a_full_disk_is_one_line_and_the_previous_report_stays(folder, tmp_path, monkeypatch):
    config = sweep_config(folder, tmp_path)
    run(config)
    before = snapshot(config.out)
    write_atomic = expo_eval.files.write_atomic

    def full(path, write):  # the disk fills while the new report is written
        if path.name == "card_table.md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_atomic(path, write)

    monkeypatch.setattr(expo_eval.files, "write_atomic", full)
    with pytest.raises(OutputFolderError) as caught:
        run(config.model_copy(update={"alphas": [0.5, 1.0]}))  # a report that would differ
    assert str(caught.value).splitlines() == [
        f"cannot write to the output folder {config.out}: No space left on device; nothing half-written is left there "
        "(the report in it is a complete one)"
    ]
    assert snapshot(config.out) == before and not (config.out / REPORT_STAGING).exists()


def test_a_rerun_that_fails_its_checks_leaves_the_previous_report_byte_identical(folder, tmp_path):
    config = sweep_config(folder, tmp_path, alphas=[0.5, 1.0])
    run(config)
    before = snapshot(config.out)
    assert set(REPORT) <= set(before) and "generations/alpha=1.jsonl" in before
    with pytest.raises(ScorerError):
        run(config.model_copy(update={"reward_models": [str(tmp_path / "rewrad-model")]}))
    assert snapshot(config.out) == before


def test_a_rerun_removes_only_the_report_files_it_wrote(folder, tmp_path):
    config = sweep_config(folder, tmp_path, alphas=[0.5, 1.0])
    run(config)
    (config.out / "generations" / "human_labels.jsonl").write_text('{"label": 1}\n')
    run(config.model_copy(update={"alphas": [0.5]}))
    generations = sorted(p.name for p in (config.out / "generations").iterdir())
    assert generations == ["alpha=0.5.jsonl", "alpha=0.jsonl", "human_labels.jsonl"]
    listed = json.loads((config.out / REPORT_MANIFEST).read_text())
    assert "generations/alpha=0.5.jsonl" in listed and "generations/human_labels.jsonl" not in listed
    assert json.loads((config.out / "results.json").read_text())["inputs"] == json.loads(
        (config.out / "cache" / "inputs.json").read_text())  # what this report came from


def test_a_swap_cut_short_is_finished_not_left_mixed(tmp_path, monkeypatch):
    def report(**files):
        def write(staging):
            for name, text in files.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).write_text(text)
        return write

    replace_report(tmp_path, report(**{"results.json": "old", "a/old.json": "old"}))
    replace = os.replace
    moves = []

    def killed(source, target):
        moves.append(target)
        if len(moves) == 3:  # the staged manifest, best.yaml, then killed
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        replace_report(tmp_path, report(**{"results.json": "new", "best.yaml": "new"}))
    monkeypatch.setattr(os, "replace", replace)
    finish_report_swap(tmp_path)  # as the next sweep does first
    files = {p.relative_to(tmp_path).as_posix(): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    assert files == {"results.json": "new", "best.yaml": "new", REPORT_MANIFEST: '[\n "best.yaml",\n "results.json"\n]\n'}


def test_a_held_lock_that_is_not_json_is_a_message(folder, tmp_path):
    config = sweep_config(folder, tmp_path)
    config.out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        "handle = open(sys.argv[1], 'w'); handle.write('busy\\n'); handle.flush()\n"
        "fcntl.flock(handle, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"
    ), str(config.out / ".sweep.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepLockedError, match=r"holder unknown: .*\.sweep\.lock is locked"):
            run(config)
    finally:
        holder.kill()
        holder.wait()


def tokenizer_source_config(folder, tmp_path):
    """A sweep whose recipe takes its tokenizer from a folder of its own (a copy of sft's)."""
    tokenizer = shutil.copytree(folder / "sft", folder / "tok", ignore=shutil.ignore_patterns("*.safetensors"))
    config = sweep_config(folder, tmp_path)
    write_recipe(config.recipe, expo_recipe({"sft": folder / "sft", "dpo": folder / "dpo"}, tokenizer_source=str(tokenizer)))
    return config, tokenizer


def test_a_tokenizer_source_edited_in_place_is_noticed(folder, tmp_path):
    config, tokenizer = tokenizer_source_config(folder, tmp_path)
    first, _ = run(config)
    data = json.loads((tokenizer / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    (a, i), (b, j) = list(vocab.items())[-2:]
    vocab[a], vocab[b] = j, i  # same size, other token ids
    (tokenizer / "tokenizer.json").write_text(json.dumps(data))
    again, _ = run(config)
    assert first.generated == 5 and again.generated == 5 and again.reused == 0


def test_out_inside_the_tokenizer_source_is_refused(folder, tmp_path):
    config, tokenizer = tokenizer_source_config(folder, tmp_path)
    config = config.model_copy(update={"out": tokenizer / "sweep"})
    with pytest.raises(OutputFolderError, match=re.escape(f"lies inside the tokenizer source's folder {tokenizer}")):
        run(config)
    assert not (tokenizer / "sweep").exists()


def test_a_users_results_with_no_sweep_marker_are_refused(folder, tmp_path):
    config = sweep_config(folder, tmp_path)
    config.out.mkdir()
    (config.out / "results.csv").write_text("my precious results\n")
    (config.out / "best.yaml").write_text("notes\n")
    with pytest.raises(OutputFolderError, match=r"holds best.yaml, results.csv but no sweep's \.report-files\.json"):
        run(config)
    assert snapshot(config.out) == {"results.csv": b"my precious results\n", "best.yaml": b"notes\n"}


def test_out_named_like_a_sweeps_own_entry_inside_a_sweep_is_refused(folder, tmp_path):
    config = sweep_config(folder, tmp_path)
    run(config)
    before = snapshot(config.out)
    nested = config.model_copy(update={"out": config.out / REPORT_STAGING})
    with pytest.raises(OutputFolderError, match=r"is \.report-new, a name the sweep in .* keeps for itself"):
        run(nested)
    assert snapshot(config.out) == before and not (config.out / REPORT_STAGING).exists()


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_kept(folder, tmp_path):
    config = sweep_config(folder, tmp_path)
    config.out.mkdir()
    users = tmp_path / "userfile.txt"
    users.write_text("mine\n")
    (config.out / ".sweep.lock").symlink_to(users)
    with pytest.raises(SweepLockedError, match=r"\.sweep\.lock is a symlink"):
        run(config)
    assert users.read_text() == "mine\n"


@pytest.mark.parametrize("make, message", [
    (lambda out: out.symlink_to(out), "is a symlink loop"),
    (lambda out: out.symlink_to(out.parent / "missing"), "is a symlink to a missing folder"),
])
def test_a_broken_symlink_out_is_one_line(folder, tmp_path, make, message):
    config = sweep_config(folder, tmp_path)
    make(config.out)
    with pytest.raises(OutputFolderError, match=re.escape(f"the output folder {config.out} {message}")):
        run(config)


@pytest.mark.parametrize("name", ["cache", "generations"])
def test_a_sweep_folder_that_is_a_file_is_refused_before_generating(folder, tmp_path, name):
    config = sweep_config(folder, tmp_path)
    run(config)
    shutil.rmtree(config.out / name)
    (config.out / name).write_text("x\n")
    backend = FakeBackend()
    with pytest.raises(OutputFolderError, match=re.escape(f"{config.out / name} is a file, not the sweep's {name} folder")):
        run(config, backend)
    assert backend.generated == []
