"""End-to-end merges of tiny local models through mergekit's own planner and writer."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import expo_recipe, load, merge, misrounded_share, ulp_error

from mergekit_expo.tiny import build_family


def reference(family, names, alpha, weights=None):
    """theta0 + (1 + alpha) * mean delta, in float64, per tensor."""
    theta0 = load(family["sft"])
    aligned = [load(family[n]) for n in names]
    weights = weights or [1.0] * len(names)
    out = {}
    for key, t0 in theta0.items():
        delta = sum(w * (a[key].double() - t0.double()) for w, a in zip(weights, aligned))
        delta = delta / sum(weights)
        anchor = aligned[0][key].double() if len(names) == 1 else t0.double() + delta
        out[key] = anchor + alpha * delta
    return out


def effective_alpha(out, family, key):
    """Least-squares alpha with out = theta1 + alpha * delta, for one tensor."""
    t0, t1 = load(family["sft"])[key].double(), load(family["dpo"])[key].double()
    delta = t1 - t0
    return float(((out[key].double() - t1) * delta).sum() / (delta * delta).sum())


def test_single_model_matches_float64_reference(family, tmp_path):
    out = load(merge(expo_recipe(family, alpha=0.3), tmp_path))
    ref = reference(family, ["dpo"], 0.3)
    assert out.keys() == ref.keys()
    for key, tensor in out.items():
        assert tensor.dtype == torch.bfloat16
        assert ulp_error(tensor, ref[key]).max() <= 1.0, key
    flat_out = torch.cat([out[k].flatten() for k in out])
    flat_ref = torch.cat([ref[k].flatten() for k in out])
    assert misrounded_share(flat_out, flat_ref) <= 1e-6


def test_float16_output_is_rounded_once_from_float32(family, tmp_path):
    """bf16 inputs, fp16 output: the remedy for bf16 rounding loss keeps fp16 precision."""
    out = load(merge(expo_recipe(family, alpha=0.3, out_dtype="float16"), tmp_path))
    ref = reference(family, ["dpo"], 0.3)
    for key, tensor in out.items():
        assert tensor.dtype == torch.float16
        assert misrounded_share(tensor, ref[key]) <= 1e-6, key


def test_dtype_float32_keeps_float32_math(family, tmp_path):
    out = load(merge(expo_recipe(family, alpha=0.3, dtype="float32"), tmp_path))
    ref = reference(family, ["dpo"], 0.3)
    for key, tensor in out.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor.double(), ref[key], rtol=3e-7, atol=1e-9)


def test_several_models_weighted(family, tmp_path):
    recipe = expo_recipe(family, alpha=0.5, models=("dpo", "dpo_b"), dtype="float32")
    recipe["models"][1]["parameters"] = {"weight": 3.0}
    out = load(merge(recipe, tmp_path))
    ref = reference(family, ["dpo", "dpo_b"], 0.5, weights=[1.0, 3.0])
    for key, tensor in out.items():
        torch.testing.assert_close(tensor.double(), ref[key], rtol=0, atol=1e-6)


def test_filters_give_per_module_alpha(family, tmp_path):
    recipe = expo_recipe(family)
    recipe["parameters"]["alpha"] = [
        {"filter": "self_attn", "value": 0.5},
        {"filter": "mlp", "value": 0.2},
        {"filter": "embed_tokens", "value": 0.0},
        {"value": 0.3},
    ]
    recipe["dtype"] = "float32"
    out = load(merge(recipe, tmp_path))
    assert effective_alpha(out, family, "model.layers.0.self_attn.q_proj.weight") == pytest.approx(0.5, abs=1e-4)
    assert effective_alpha(out, family, "model.layers.1.mlp.up_proj.weight") == pytest.approx(0.2, abs=1e-4)
    assert torch.equal(out["model.embed_tokens.weight"], load(family["dpo"])["model.embed_tokens.weight"].float())
    assert effective_alpha(out, family, "lm_head.weight") == pytest.approx(0.3, abs=1e-4)


def test_gradient_gives_per_layer_alpha(family, tmp_path):
    recipe = expo_recipe(family, dtype="float32")
    recipe["parameters"]["alpha"] = [0.0, 0.6]
    out = load(merge(recipe, tmp_path))
    key = "model.layers.{}.mlp.down_proj.weight"
    assert effective_alpha(out, family, key.format(0)) == pytest.approx(0.0, abs=1e-6)
    assert effective_alpha(out, family, key.format(1)) == pytest.approx(0.6, abs=1e-4)


def test_sparsified_delta(family, tmp_path):
    recipe = expo_recipe(family, dtype="float32")
    recipe["parameters"].update(density=0.25, sparsification="magnitude", rescale=False)
    out = load(merge(recipe, tmp_path))
    t0, t1 = load(family["sft"]), load(family["dpo"])
    key = "model.layers.0.mlp.gate_proj.weight"
    moved = out[key] != t1[key].float()
    changed = t1[key] != t0[key]
    assert 0.2 < moved.double().mean() / changed.double().mean() < 0.3


def test_model_card_cites_recipe_and_paper(family, tmp_path):
    recipe = expo_recipe(family, alpha=0.3)
    recipe["parameters"]["alpha"] = [{"filter": "mlp", "value": 0.1}, {"value": 0.3}]
    out = merge(recipe, tmp_path)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "expo" in front["tags"]
    assert front["base_model"] == []  # local paths are not Hub IDs
    assert "2404.16792" in card and "@inproceedings" in card
    assert "| mlp | 0.1 | 0.1 |" in card and "| attention | 0.3 | 0.3 |" in card
    assert "alpha:" in card and str(family["sft"]) in card
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_card_lists_hub_ids_without_asking_the_hub():
    from mergekit.config import MergeConfiguration

    from mergekit_expo.card import expo_card

    recipe = yaml.safe_load(open("recipes/zephyr_expo.yaml"))
    card = expo_card(MergeConfiguration.model_validate(recipe), "...", "zephyr-expo")
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == [
        "alignment-handbook/zephyr-7b-sft-full",
        "alignment-handbook/zephyr-7b-dpo-full",
    ]


def test_identical_models_warn(family, tmp_path, caplog):
    copy = shutil.copytree(family["sft"], tmp_path / "sft_copy")
    recipe = expo_recipe(family)
    recipe["models"] = [{"model": str(copy)}]
    with caplog.at_level("WARNING"):
        out = load(merge(recipe, tmp_path))
    assert "delta is zero in every tensor" in caplog.text
    assert torch.equal(out["lm_head.weight"], load(family["sft"])["lm_head.weight"])


def test_negative_alpha_interpolates_with_warning(family, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        merge(expo_recipe(family, alpha=-0.5, dtype="float32"), tmp_path)
    assert "interpolates toward the SFT model" in caplog.text


def test_added_tokens_align_through_tokenizer_config(tmp_path):
    """An aligned model with a larger vocabulary merges via `tokenizer: {source: base}`."""
    from mergekit_expo.tiny import build_tokenizer, save_model, tiny_config

    family = build_family(str(tmp_path / "tiny"), aligned=("dpo",))
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<|tool|>"])
    config = tiny_config(len(tokenizer))
    state = load(tmp_path / "tiny/dpo")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], state[key][:1]])
    wide = save_model(str(tmp_path / "tiny/dpo_wide"), config, state, tokenizer)
    recipe = {
        "merge_method": "expo",
        "base_model": family["sft"],
        "models": [{"model": wide}],
        "parameters": {"alpha": 0.3},
        "dtype": "bfloat16",
        "tokenizer": {"source": "base"},
    }
    out = load(merge(recipe, tmp_path))
    assert out["lm_head.weight"].shape == load(tmp_path / "tiny/sft")["lm_head.weight"].shape
