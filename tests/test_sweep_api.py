"""The Python API's Sweep: what one object reads, once, and where (attack B, F1-F4)."""

import os
import shutil

import pytest
from conftest import expo_recipe, write_recipe
from safetensors.torch import load_file, save_file
from test_sweep_trust import FakeBackend, folder, sweep_config  # noqa: F401 (fixture)

import expo_eval.inputs as inputs_module
from expo_eval.config import SweepConfig
from expo_eval.outdir import OutputFolderError
from expo_eval.sweep import InputsChangedError, Sweep, SweepReusedError


def remerge(model_folder, shift):
    """Replace the folder's weights the way a merge does: a new file renamed over the old."""
    weights = model_folder / "model.safetensors"
    state = {k: v + shift if v.is_floating_point() else v for k, v in load_file(weights).items()}
    save_file(state, model_folder / "new.safetensors", metadata={"format": "pt"})
    os.replace(model_folder / "new.safetensors", weights)


def measured(outcome):
    """What the sweep read of the models: responses and each candidate's KL from theta0."""
    responses = {k: [g.response for g in rows] for k, rows in outcome.generations.items()}
    kl = {(r.label, r.split): r.kl for r in outcome.results}
    assert any(value for value in kl.values())
    return responses, kl


def test_a_second_sweep_reads_a_model_merged_again_since_the_first(folder, tmp_path):
    deterministic = {"sampling": {"max_new_tokens": 6, "temperature": 0}}
    Sweep(sweep_config(folder, tmp_path, **deterministic)).run()  # mergekit now holds dpo's loader
    remerge(folder / "dpo", 0.05)
    second = Sweep(sweep_config(folder, tmp_path, out=tmp_path / "second", **deterministic)).run()
    fresh_copy = tmp_path / "fresh"  # another path: read as a fresh process reads it
    shutil.copytree(folder / "dpo", fresh_copy / "dpo")
    shutil.copytree(folder / "sft", fresh_copy / "sft")
    fresh = Sweep(sweep_config(fresh_copy, fresh_copy, **deterministic)).run()
    assert measured(second) == measured(fresh)


def test_an_input_changed_while_the_sweep_ran_keeps_no_result(folder, tmp_path, monkeypatch):
    config = sweep_config(folder, tmp_path)
    sweep = Sweep(config, backend=FakeBackend())
    real = inputs_module.model_fingerprint
    monkeypatch.setattr(inputs_module, "model_fingerprint", lambda spec: real(spec) + "-remerged")
    with pytest.raises(InputsChangedError, match=r"aligned model .* changed while the sweep ran.*rerun"):
        sweep.run()
    assert not (config.out / "results.json").exists()
    assert not list((config.out / "cache").glob("*.jsonl")) and not list((config.out / "cache").glob("*.scores.json"))
    monkeypatch.setattr(inputs_module, "model_fingerprint", real)
    again = Sweep(config, backend=FakeBackend()).run()
    assert again.generated == 5 and again.reused == 0  # 3 candidate runs, 2 KL sample sets


def test_a_sweep_runs_once(folder, tmp_path):
    sweep = Sweep(sweep_config(folder, tmp_path), backend=FakeBackend())
    assert sweep.run().generated == 5
    with pytest.raises(SweepReusedError, match="build a new Sweep"):
        sweep.run()


def relative_sweep(folder, tmp_path, monkeypatch, out):
    built_in = tmp_path / "a"
    built_in.mkdir()
    for name in ("sft", "dpo"):
        shutil.copytree(folder / name, built_in / name)
    monkeypatch.chdir(built_in)
    write_recipe(built_in / "r.yaml", expo_recipe({"sft": "sft", "dpo": "dpo"}))
    config = SweepConfig(recipe="r.yaml", out=out, alphas=[0.5], prompts="smoke", limit=4,
                         reward_models=["rewards:word_count"])
    sweep = Sweep(config, backend=FakeBackend())
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return sweep, built_in, elsewhere


def test_relative_paths_mean_the_folder_the_sweep_was_built_in(folder, tmp_path, monkeypatch):
    sweep, built_in, elsewhere = relative_sweep(folder, tmp_path, monkeypatch, out="out")
    sweep.run()
    assert (built_in / "out" / "results.json").exists() and not (elsewhere / "out").exists()
    assert sweep.recipe.models[0].model.model.path == str(built_in / "dpo")


def test_a_relative_out_inside_a_relative_model_is_refused_after_a_chdir(folder, tmp_path, monkeypatch):
    sweep, built_in, _ = relative_sweep(folder, tmp_path, monkeypatch, out="dpo/sweep")
    with pytest.raises(OutputFolderError):
        sweep.run()
    assert not (built_in / "dpo" / "sweep").exists()
