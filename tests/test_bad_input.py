"""Bad input: a non-zero exit, a message naming the problem, no finished-looking output."""

import os
import shutil

import pytest
from conftest import expo_recipe, run_cli, write_recipe
from safetensors.torch import load_file, save_file

from mergekit_expo.tiny import build_family, build_tokenizer, tiny_config

FINISHED = {"config.json", "model.safetensors", "model.safetensors.index.json", "README.md"}


def assert_fails(recipe, tmp_path, *messages):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "out"
    result = run_cli("mergekit-yaml", path, out, check=False)
    assert result.returncode != 0
    for message in messages:
        assert message in result.stderr, result.stderr[-2000:]
    assert not (out.exists() and FINISHED & set(os.listdir(out)))


def test_no_base_model(family, tmp_path):
    recipe = expo_recipe(family)
    del recipe["base_model"]
    assert_fails(recipe, tmp_path, "expo needs base_model")


@pytest.mark.parametrize(
    "alpha, message",
    [(None, "Missing required parameter alpha"), (float("nan"), "alpha must be a finite number"),
     (-1.0, "greater than -1"), (-2.5, "greater than -1")],
)
def test_bad_alpha(family, tmp_path, alpha, message):
    recipe = expo_recipe(family, alpha=alpha)
    if alpha is None:
        del recipe["parameters"]["alpha"]
    assert_fails(recipe, tmp_path, message)


def test_different_shapes(family, tmp_path):
    config = tiny_config(len(build_tokenizer()), intermediate_size=160)
    wide = build_family(str(tmp_path / "wide"), aligned=("dpo",), config=config)
    recipe = expo_recipe(family)
    recipe["models"] = [{"model": wide["dpo"]}]
    assert_fails(recipe, tmp_path, "Tensor size mismatch for model.layers.0.mlp", "(64, 160)", "(64, 128)")


def test_tensor_missing_from_aligned_model(family, tmp_path):
    broken = shutil.copytree(family["dpo"], tmp_path / "broken")
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = expo_recipe(family)
    recipe["models"] = [{"model": str(broken)}]
    assert_fails(recipe, tmp_path, "model.layers.1.mlp.up_proj.weight", str(broken))


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_safetensors(family, tmp_path, damage):
    broken = shutil.copytree(family["dpo"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size - 100)
    else:
        weights.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{not json" * 10)
    recipe = expo_recipe(family)
    recipe["models"] = [{"model": str(broken)}]
    assert_fails(recipe, tmp_path, f"{weights}: ", "safetensors")


def test_failed_merge_into_existing_folder_keeps_only_old_files(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    recipe = expo_recipe(family, alpha=-4)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert run_cli("mergekit-yaml", path, out, check=False).returncode != 0
    assert os.listdir(out) == ["notes.txt"]
