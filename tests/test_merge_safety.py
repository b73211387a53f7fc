"""Merges never destroy or mislabel data: input folders, the previous output, copied files."""

import errno
import hashlib
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, expo_recipe, load, merge, run_cli, slices_recipe, write_recipe
from safetensors.torch import load_file

from mergekit_expo import run
from mergekit_expo.tiny import build_family, tiny_config, build_tokenizer


def digest(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def leftovers(parent: Path) -> list:
    return [p for p in os.listdir(parent) if ".expo-" in p]


def mergekit_yaml(recipe, tmp_path, out, *args, **kwargs):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    return run_cli("mergekit-yaml", path, out, *args, check=False, **kwargs)


def assert_clean_failure(result, *messages):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for message in messages:
        assert message in result.stderr, result.stderr[-2000:]


# ------------------------------------------------------------------ input folders


@pytest.mark.parametrize("where", ["aligned", "sft", "inside", "contains"])
def test_output_folder_overlapping_an_input_is_refused(family, tmp_path, where):
    out = {
        "aligned": family["dpo"],
        "sft": family["sft"],
        "inside": family["dpo"] / "merged",
        "contains": family["dpo"].parent,
    }[where]
    before = {name: digest(path) for name, path in family.items()}
    result = mergekit_yaml(expo_recipe(family), tmp_path, out)
    relation = {"inside": "lies inside", "contains": "contains"}.get(where, "is")
    assert_clean_failure(result, f"the output folder {out} {relation} the folder of input model")
    assert {name: digest(path) for name, path in family.items()} == before
    assert not (family["dpo"] / "merged").exists()


def test_existing_folder_with_other_files_is_refused(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = mergekit_yaml(expo_recipe(family), tmp_path, out)
    assert_clean_failure(result, "holds files that are not a model (notes.txt)")
    assert os.listdir(out) == ["notes.txt"]


# ------------------------------------------------------------------ the previous output


def test_re_merge_with_other_shard_size_leaves_no_stale_shard(family, tmp_path):
    out = merge(expo_recipe(family, alpha=0.3), tmp_path)
    assert (out / "model.safetensors").exists()
    result = mergekit_yaml(expo_recipe(family, alpha=1.0), tmp_path, out, "--out-shard-size", "100K")
    assert result.returncode == 0, result.stderr[-2000:]
    names = set(os.listdir(out))
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    shards = {n for n in names if n.endswith(".safetensors")}
    state = {}
    for shard in shards:
        state.update(load_file(out / shard))
    key = "model.layers.0.mlp.up_proj.weight"
    t0, t1 = load(family["sft"])[key].double(), load(family["dpo"])[key].double()
    delta = t1 - t0
    alpha = float(((state[key].double() - t1) * delta).sum() / (delta * delta).sum())
    assert alpha == pytest.approx(1.0, abs=0.02)
    assert "alpha: 1" in (out / "README.md").read_text()
    assert not leftovers(tmp_path)


def test_failed_re_merge_keeps_the_previous_output_exactly(family, tmp_path):
    """A NaN found mid-merge, after shards were written: the old model is untouched."""
    out = merge(expo_recipe(family, alpha=0.3), tmp_path)
    before = digest(out)
    recipe = nan_recipe(family, tmp_path)
    result = mergekit_yaml(recipe, tmp_path, out, "--out-shard-size", "50K")
    assert_clean_failure(result, "model.norm.weight: 1 NaN or Inf value(s)")
    assert digest(out) == before
    assert not leftovers(tmp_path)


def test_interrupted_merge_in_process_keeps_the_previous_output(family, tmp_path):
    import mergekit.merge
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    out = merge(expo_recipe(family, alpha=0.3), tmp_path)
    before = digest(out)
    original = mergekit.merge.run_merge.__wrapped__

    def interrupted(merge_config, out_path, options, config_source=None):
        Path(out_path).mkdir()
        (Path(out_path) / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    assert original is not interrupted
    with pytest.raises(KeyboardInterrupt):
        run.run_expo_merge(
            interrupted, MergeConfiguration.model_validate(expo_recipe(family, alpha=1.0)),
            str(out), MergeOptions(quiet=True),
        )
    assert digest(out) == before
    assert not leftovers(tmp_path)


def test_sigint_during_a_real_re_merge_keeps_the_previous_output(tmp_path):
    big = build_family(
        str(tmp_path / "big"), aligned=("dpo",),
        config=tiny_config(len(build_tokenizer()), hidden_size=512, num_layers=6, intermediate_size=1536),
    )
    family = {k: Path(v) for k, v in big.items()}
    out = tmp_path / "out"
    assert mergekit_yaml(expo_recipe(family, alpha=0.3), tmp_path, out).returncode == 0
    before = digest(out)
    path = write_recipe(tmp_path / "again.yaml", expo_recipe(family, alpha=1.0))
    process = subprocess.Popen(
        [str(BIN / "mergekit-yaml"), str(path), str(out), "--out-shard-size", "1M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        partial = [name for name in leftovers(tmp_path) if ".expo-partial-" in name]  # not the lock
        if partial and any(n.endswith(".safetensors") for n in os.listdir(tmp_path / partial[0])):
            break
        time.sleep(0.005)
    assert process.poll() is None, "the merge ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0, stderr[-2000:]
    assert digest(out) == before
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------ copied files, full disks


def limit_file_size(limit: int):
    """A file-size limit makes writes past it fail as a full disk would (Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def run_limited(recipe, tmp_path, out, limit):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    return subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(out)], capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=limit_file_size(limit),
    )


def test_tokenizer_copy_that_fails_stops_the_merge(family, tmp_path):
    """mergekit logs a failed tokenizer copy and carries on; the merge must not."""
    import shutil

    sft = Path(shutil.copytree(family["sft"], tmp_path / "sft_big_tokenizer"))
    with open(sft / "tokenizer.json", "a") as handle:  # still valid JSON, now 1 MB
        handle.write(" " * (1 << 20))
    recipe = expo_recipe(family)
    recipe["base_model"] = str(sft)
    out = tmp_path / "out"
    result = run_limited(recipe, tmp_path, out, 600_000)
    assert_clean_failure(result, "tokenizer")
    assert "Failed to copy tokenizer" in result.stderr or "not copied completely" in result.stderr
    assert not out.exists() and not leftovers(tmp_path)


def test_weights_that_cannot_be_written_stop_the_merge(family, tmp_path):
    out = tmp_path / "out"
    result = run_limited(expo_recipe(family), tmp_path, out, 60_000)
    assert_clean_failure(result, "File too large", "is the disk full?")
    assert not out.exists() and not leftovers(tmp_path)


def test_incomplete_copy_is_named(tmp_path):
    donor, written = tmp_path / "donor", tmp_path / "written"
    donor.mkdir(), written.mkdir()
    (donor / "tokenizer.json").write_bytes(b"x" * 10000)
    (written / "tokenizer.json").write_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match=r"tokenizer.json was not copied completely .* \(4096 of 10000 bytes\)"):
        run.check_copies(str(donor), written)


def test_full_disk_message():
    error = OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors")
    assert run.describe(error) == (
        "/out/model.safetensors: no space left on device; the previous output (if any) is untouched"
    )


def test_a_project_folder_with_a_config_json_is_not_a_model_to_replace(family, tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text('{"lr": 1}')
    (project / "src" / "train.py").write_text("x = 1\n")
    before = digest(project)
    result = mergekit_yaml(expo_recipe(family), tmp_path, project)
    assert_clean_failure(result, "holds files that are not a model")
    assert digest(project) == before


def test_the_current_folder_is_refused_before_merging(family, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    result = mergekit_yaml(expo_recipe(family), tmp_path, ".", cwd=here)
    assert_clean_failure(result, "the current folder")


def test_an_alpha_beyond_float32_is_refused(family, tmp_path):
    result = mergekit_yaml(expo_recipe(family, alpha=1.0e39), tmp_path, tmp_path / "out")
    assert_clean_failure(result, "float32")


def test_a_partial_folder_left_by_kill_9_is_removed_by_the_next_merge(family, tmp_path):
    stale = tmp_path / ".out.expo-partial-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    mergekit_yaml(expo_recipe(family), tmp_path, tmp_path / "out")
    assert not stale.exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_sigterm_leaves_the_previous_output_and_no_partial_folder(family, tmp_path):
    out = tmp_path / "out"
    mergekit_yaml(expo_recipe(family, alpha=0.3), tmp_path, out)
    before = digest(out)
    path = write_recipe(tmp_path / "again.yaml", expo_recipe(family, alpha=1.0))
    process = subprocess.Popen([str(BIN / "mergekit-yaml"), str(path), str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".expo-partial-" in p for p in os.listdir(tmp_path)):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert not leftovers(tmp_path)
    if process.returncode != 0:  # stopped in time: the old output is untouched
        assert digest(out) == before


def test_a_slices_recipe_with_base_model_in_its_slice_gets_a_card(family, tmp_path):
    recipe = slices_recipe(family)
    result = mergekit_yaml(recipe, tmp_path, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ExPO" in (tmp_path / "out" / "README.md").read_text()


# ------------------------------------------------------------------ symlinked outputs, concurrent merges


def fitted_alpha(out: Path, family) -> float:
    """The alpha the merged weights in `out` were made with (least squares on one tensor)."""
    key = "model.layers.0.mlp.up_proj.weight"
    theta2 = load(out)[key].double()
    t0, t1 = load(family["sft"])[key].double(), load(family["dpo"])[key].double()
    delta = t1 - t0
    return float(((theta2 - t1) * delta).sum() / (delta * delta).sum())


@pytest.fixture
def linked_output(family, tmp_path):
    """tmp_path/out -> tmp_path/disk/real, which holds an alpha-0.3 merge."""
    (tmp_path / "disk").mkdir()
    target = merge(expo_recipe(family, alpha=0.3), tmp_path / "disk", name="real")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    return link, target


def test_a_merge_into_a_symlink_replaces_its_target_and_keeps_the_link(family, tmp_path, linked_output):
    link, target = linked_output
    result = mergekit_yaml(expo_recipe(family, alpha=1.0), tmp_path, link)
    assert result.returncode == 0, result.stderr[-2000:]
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert fitted_alpha(target, family) == pytest.approx(1.0, abs=0.02)
    assert "alpha: 1" in (target / "README.md").read_text()
    assert not leftovers(tmp_path) and not leftovers(target.parent)


def test_a_failed_merge_into_a_symlink_keeps_its_target_and_leaves_nothing(family, tmp_path, linked_output):
    """A guard of the failure path at the link's target (the merge fails before the swap)."""
    link, target = linked_output
    before = digest(target)
    recipe = nan_recipe(family, tmp_path)
    result = mergekit_yaml(recipe, tmp_path, link, "--out-shard-size", "50K")
    assert_clean_failure(result, "model.norm.weight: 1 NaN or Inf value(s)")
    assert link.is_symlink() and digest(target) == before
    assert not leftovers(tmp_path) and not leftovers(target.parent)


def test_a_partial_symlink_an_earlier_version_left_is_removed_not_followed(family, tmp_path, linked_output):
    """Earlier versions swapped a symlinked output's link itself out, to `.NAME.expo-partial-*`."""
    link, target = linked_output
    before = digest(target)
    out = merge(expo_recipe(family, alpha=0.3), tmp_path, name="again")
    stale = tmp_path / ".again.expo-partial-0123abcd"
    stale.symlink_to(target, target_is_directory=True)
    result = mergekit_yaml(expo_recipe(family, alpha=1.0), tmp_path, out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not stale.is_symlink() and digest(target) == before
    assert not leftovers(tmp_path)


HOLD_THE_LOCK = """
import sys
from mergekit_expo.run import output_lock, output_target
with output_lock(output_target(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def merge_in_progress(tmp_path):
    """tmp_path/out as another merge writes it: that process holds the lock, its partial folder is there."""
    out = tmp_path / "out"
    holder = subprocess.Popen([str(BIN / "python"), "-c", HOLD_THE_LOCK, str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    partial = tmp_path / ".out.expo-partial-0123abcd"
    partial.mkdir()
    (partial / "model-00001-of-00002.safetensors").write_bytes(b"being written")
    yield out, holder.pid, partial
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0
    assert not (tmp_path / ".out.expo-lock").exists()  # its holder deleted it


def test_a_second_merge_into_the_same_output_stops_at_once(family, tmp_path, merge_in_progress):
    out, pid, partial = merge_in_progress
    before = digest(partial)
    result = mergekit_yaml(expo_recipe(family), tmp_path, out)
    assert_clean_failure(result, f"another merge is writing to {run.output_target(out)}: pid {pid} on ")
    assert digest(partial) == before and not out.exists()


def test_a_held_lock_whose_file_is_no_record_is_named(tmp_path):
    import fcntl

    from mergekit_expo.lock import OutputLock, OutputLockedError

    path = tmp_path / ".out.expo-lock"
    path.write_text("locked by hand\n")
    with open(path) as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(OutputLockedError, match=r"another merge is writing to .*out: holder unknown: .* is locked, .*\('locked by hand'\)"):
            OutputLock(path, "merge", tmp_path / "out").__enter__()
    with OutputLock(path, "merge", tmp_path / "out") as lock:
        assert str(os.getpid()) in path.read_text() and lock.token
    assert not path.exists()


def test_a_lock_taken_on_a_file_its_holder_just_deleted_is_taken_again(tmp_path, monkeypatch):
    """Opened before the holder deleted it, locked after: the path names another file by then."""
    from mergekit_expo import lock as lock_module

    path = tmp_path / ".out.expo-lock"
    holder = lock_module.OutputLock(path, "merge", tmp_path / "out").__enter__()
    deleted = open(path, "a+")
    holder.__exit__(None, None, None)
    opened, real_open = iter([deleted]), lock_module.OutputLock._open
    monkeypatch.setattr(lock_module.OutputLock, "_open", lambda self: next(opened, None) or real_open(self))
    with lock_module.OutputLock(path, "merge", tmp_path / "out") as taken:
        assert deleted.closed and path.exists() and taken.token in path.read_text()


# ------------------------------------------------------------------ the card's sweep record


def sweep_record(chosen_alpha) -> dict:
    """A best.yaml `expo_sweep` record of a sweep over alphas 0 and 0.5."""
    return {
        "results": "/sweeps/zephyr/results.json", "results_sha256": "ab" * 32, "rule": "kl-bound",
        "rule_description": "kl-bound (reward less its error bound)", "scorers": ["rm"],
        "alphas": [0.0, 0.5], "chosen_alpha": chosen_alpha,
        "select": [{"candidate": "alpha=0", "n": 8, "rm": [1.0, 0.1], "kl": 0.0, "selection_value": 1.0},
                   {"candidate": "alpha=0.5", "n": 8, "rm": [1.3, 0.1], "kl": 0.1, "selection_value": 1.1}],
    }


@pytest.mark.parametrize("chosen, swept", [(0.5, True), (0.7, False)])
def test_a_sweep_record_whose_chosen_alpha_was_never_swept_gives_no_sweep_section(family, tmp_path, caplog, chosen, swept):
    """chosen_alpha (and the recipe's alpha) edited by hand to 0.7, which the sweep never tried."""
    recipe = {**expo_recipe(family, alpha=chosen), "expo_sweep": sweep_record(chosen)}
    with caplog.at_level("WARNING", logger="mergekit_expo"):
        card = (merge(recipe, tmp_path) / "README.md").read_text()
    assert ("### How alpha was chosen" in card) == swept and ("| alpha=0.5 |" in card) == swept
    warned = [r.message for r in caplog.records if "chose alpha = 0.7, which is not among the alphas it swept (0, 0.5)" in r.message]
    assert bool(warned) == (not swept)


@pytest.mark.parametrize("lazy", ["--lazy", "--no-lazy"])
def test_mergekit_multi_refuses_an_out_path_that_is_a_stage_folder(family, tmp_path, lazy):
    """Under --lazy mergekit-multi would skip the final merge (the stage folder holds a model)."""
    import yaml

    stages = [
        {**expo_recipe(family, alpha=0.3, dtype="float32"), "name": "stage1"},
        {**expo_recipe(family, alpha=0.5, dtype="float32"), "models": [{"model": "stage1"}]},
    ]
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(yaml.safe_dump_all(stages, sort_keys=False))
    stage = tmp_path / "inter" / "stage1"
    result = run_cli("mergekit-multi", recipe, "-I", tmp_path / "inter", "--out-path", stage, lazy, check=False)
    assert result.returncode == 1 and "is the folder of the stage `stage1`" in result.stderr, result.stderr[-2000:]
    assert not stage.exists() and "Traceback" not in result.stderr


def nan_recipe(family, tmp_path) -> dict:
    """An alpha-1 recipe whose aligned model (a copy of dpo) holds one NaN in model.norm.weight."""
    import shutil

    from safetensors.torch import save_file

    broken = Path(shutil.copytree(family["dpo"], tmp_path / "broken"))
    state = load_file(broken / "model.safetensors")
    state["model.norm.weight"][3] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    return expo_recipe(family, alpha=1.0) | {"models": [{"model": str(broken)}]}
