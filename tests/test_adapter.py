"""`mergekit-expo adapter`: ExPO on a LoRA adapter, written as an adapter, equals the full-weight merge."""

import json

import pytest
import torch
from conftest import run_cli, write_recipe
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mergekit_expo.tiny import build_family


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """theta0 (float32), a trained-looking rsLoRA adapter with a whole lm_head, and theta1 merged."""
    root = tmp_path_factory.mktemp("lora")
    theta0 = build_family(str(root / "family"), aligned=(), dtype=torch.float32)["sft"]
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(theta0),
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                   modules_to_save=["lm_head"], rank_pattern={"down_proj": 2}),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(root / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(root / "theta1")
    return {"theta0": theta0, "adapter": root / "adapter", "theta1": root / "theta1", "root": root}


def state(folder):
    return {k: v for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def test_the_extrapolated_adapter_equals_the_full_weight_expo_merge(lora, tmp_path):
    alpha = 0.5
    run_cli("mergekit-expo", "adapter", lora["adapter"], "--alpha", alpha, "--out", tmp_path / "expo_adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora["theta0"]), tmp_path / "expo_adapter")
    from_adapter = model.merge_and_unload().state_dict()
    recipe = write_recipe(tmp_path / "expo.yaml", {
        "merge_method": "expo", "base_model": str(lora["theta0"]), "dtype": "float32",
        "parameters": {"alpha": alpha}, "models": [{"model": str(lora["theta1"])}],
    })
    run_cli("mergekit-yaml", recipe, tmp_path / "full")
    full = state(tmp_path / "full")
    assert from_adapter.keys() == full.keys()
    theta0 = state(lora["theta0"])
    changed = [k for k in full if not torch.equal(full[k], theta0[k])]
    assert any("q_proj" in k for k in changed) and "lm_head.weight" in changed and any("down_proj" in k for k in changed)
    for name in full:
        torch.testing.assert_close(from_adapter[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
    original, scaled = load_file(lora["adapter"] / "adapter_model.safetensors"), load_file(tmp_path / "expo_adapter" / "adapter_model.safetensors")
    for name, tensor in original.items():
        if "lora_B" in name:
            torch.testing.assert_close(scaled[name], tensor * (1 + alpha))
        elif "lora_A" in name:
            assert torch.equal(scaled[name], tensor)
    card = (tmp_path / "expo_adapter" / "README.md").read_text()
    assert 'library_name: "peft"' in card and "2404.16792" in card and "lora_B" in card
    assert json.loads((tmp_path / "expo_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(lora["theta0"])


def test_dora_another_base_and_a_taken_out_folder_are_refused(lora, tmp_path):
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((lora["adapter"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((lora["adapter"] / "adapter_model.safetensors").read_bytes())
    result = run_cli("mergekit-expo", "adapter", dora, "--alpha", 0.3, "--out", tmp_path / "o1", check=False)
    assert result.returncode != 0 and "DoRA" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o1").exists()

    other = build_family(str(tmp_path / "other"), aligned=(), dtype=torch.float32, seed=1)["sft"]
    result = run_cli("mergekit-expo", "adapter", lora["adapter"], "--alpha", 0.3, "--base", other, "--out", tmp_path / "o2",
                     check=False)
    assert result.returncode != 0 and "trained on" in result.stderr and str(other) in result.stderr
    assert not (tmp_path / "o2").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    result = run_cli("mergekit-expo", "adapter", lora["adapter"], "--alpha", 0.3, "--out", taken, check=False)
    assert result.returncode != 0 and "not an empty folder" in result.stderr
    assert (taken / "mine.txt").read_text() == "keep me"


def test_mergekit_yaml_takes_an_adapter_as_the_aligned_model(lora, tmp_path):
    """`models: - model: ADAPTER` is theta0 + the adapter; the merge equals the one from theta1's weights."""
    def recipe(aligned, name):
        return write_recipe(tmp_path / f"{name}.yaml", {
            "merge_method": "expo", "base_model": str(lora["theta0"]), "dtype": "float32",
            "parameters": {"alpha": 0.4}, "models": [{"model": str(aligned)}],
        })

    from_adapter = recipe(lora["adapter"], "adapter")
    result = run_cli("mergekit-yaml", from_adapter, tmp_path / "a", check=False)
    assert result.returncode != 0 and "--lora-merge-cache" in result.stderr and "Traceback" not in result.stderr
    run_cli("mergekit-yaml", from_adapter, tmp_path / "a", "--lora-merge-cache", tmp_path / "lora_cache")
    run_cli("mergekit-yaml", recipe(lora["theta1"], "weights"), tmp_path / "w")
    merged, weights = state(tmp_path / "a"), state(tmp_path / "w")
    for name in weights:
        torch.testing.assert_close(merged[name], weights[name], rtol=1e-5, atol=1e-6, msg=name)

    other = build_family(str(tmp_path / "other"), aligned=(), dtype=torch.float32, seed=1)["sft"]
    wrong = write_recipe(tmp_path / "wrong.yaml", {
        "merge_method": "expo", "base_model": other, "parameters": {"alpha": 0.4}, "models": [{"model": str(lora["adapter"])}],
    })
    result = run_cli("mergekit-yaml", wrong, tmp_path / "x", "--lora-merge-cache", tmp_path / "lora_cache", check=False)
    assert result.returncode != 0 and "trained on" in result.stderr and "Traceback" not in result.stderr
