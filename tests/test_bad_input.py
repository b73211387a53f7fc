"""Bad input: a non-zero exit, a message naming the problem (no traceback), no output."""

import json
import os
import shutil

import pytest
from conftest import expo_recipe, run_cli, write_recipe
from safetensors.torch import load_file, save_file

from mergekit_expo.tiny import build_family, build_tokenizer, save_model, tiny_config

FINISHED = {"config.json", "model.safetensors", "model.safetensors.index.json", "README.md"}


def assert_fails(recipe, tmp_path, *messages, args=()):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "out"
    result = run_cli("mergekit-yaml", path, out, *args, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for message in messages:
        assert message in result.stderr, result.stderr[-2000:]
    assert not (out.exists() and FINISHED & set(os.listdir(out)))
    assert not [p for p in os.listdir(tmp_path) if ".expo-" in p]  # no partial folder left
    return result


def test_no_base_model(family, tmp_path):
    recipe = expo_recipe(family)
    del recipe["base_model"]
    assert_fails(recipe, tmp_path, "expo needs base_model")


@pytest.mark.parametrize(
    "alpha, message",
    [(None, "expo needs alpha"), (float("nan"), "alpha must be a finite number"),
     (float("inf"), "alpha must be a finite number"), (-1.0, "greater than -1"), (-2.5, "greater than -1"),
     ([{"filter": "mlp", "value": float("nan")}, {"value": 0.3}], "alpha must be a finite number"),
     ([0.3, -4.0], "greater than -1")],
)
def test_bad_alpha(family, tmp_path, alpha, message):
    recipe = expo_recipe(family, alpha=alpha)
    if alpha is None:
        del recipe["parameters"]["alpha"]
    assert_fails(recipe, tmp_path, message)


def test_unknown_parameter_is_named(family, tmp_path):
    recipe = expo_recipe(family)
    recipe["parameters"] = {"alpah": 0.3}
    assert_fails(recipe, tmp_path, "unknown parameter `alpah`", "did you mean `alpha`")


def test_unknown_per_model_parameter_is_named(family, tmp_path):
    recipe = expo_recipe(family)
    recipe["models"][0]["parameters"] = {"wieght": 2.0}
    assert_fails(recipe, tmp_path, "unknown parameter `wieght`", "models[0]", "did you mean `weight`")


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


def test_shard_named_in_index_but_missing(family, tmp_path):
    from transformers import LlamaForCausalLM

    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(family["dpo"]).save_pretrained(sharded, max_shard_size="100KB")
    build_tokenizer().save_pretrained(sharded)
    shards = sorted(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1
    (sharded / shards[-1]).unlink()
    recipe = expo_recipe(family)
    recipe["models"] = [{"model": str(sharded)}]
    assert_fails(recipe, tmp_path, "model.safetensors.index.json names the shard", shards[-1])


# ------------------------------------------------------------------ non-finite values


def with_value(family, tmp_path, model, name, value, index=(0, 0)):
    broken = shutil.copytree(family[model], tmp_path / f"{model}_broken")
    state = load_file(broken / "model.safetensors")
    state[name][index] = value
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_value_in_aligned_model(family, tmp_path, value):
    name = "model.layers.1.self_attn.v_proj.weight"
    broken = with_value(family, tmp_path, "dpo", name, value)
    recipe = expo_recipe(family)
    recipe["models"] = [{"model": str(broken)}]
    assert_fails(recipe, tmp_path, f"{name}: 1 NaN or Inf value(s) in {broken}", "theta1")


def test_non_finite_value_in_sft_model_even_where_pruned(family, tmp_path):
    """Sparsification may drop the element from delta; the input is still checked."""
    name = "model.layers.0.mlp.down_proj.weight"
    broken = with_value(family, tmp_path, "sft", name, float("nan"))
    recipe = expo_recipe(family)
    recipe["base_model"] = str(broken)
    recipe["parameters"].update(density=0.5)
    assert_fails(recipe, tmp_path, f"{name}: 1 NaN or Inf value(s) in {broken}", "theta0")


def test_output_overflowing_its_dtype(family, tmp_path):
    recipe = expo_recipe(family, alpha=1e30, dtype=None, out_dtype="float16")
    del recipe["dtype"]
    assert_fails(recipe, tmp_path, "theta2 overflows float16 at alpha 1e+30", "use a smaller alpha")


# ------------------------------------------------------------------ tied embeddings


def test_tied_sft_and_untied_aligned_model_stop(family, tmp_path):
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer))
    config.tie_word_embeddings = True
    state = load_file(family["sft"] / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    tied = save_model(str(tmp_path / "tied_sft"), config, {k: v.clone() for k, v in state.items()}, tokenizer)
    assert json.loads((tmp_path / "tied_sft/config.json").read_text())["tie_word_embeddings"] is True
    recipe = expo_recipe(family)
    recipe["base_model"] = tied
    assert_fails(
        recipe, tmp_path, "tie_word_embeddings differs", f"SFT model {tied} has tie_word_embeddings=True",
        f"aligned model {family['dpo']} has tie_word_embeddings=False",
    )
