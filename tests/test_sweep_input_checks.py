"""The sweep runs the merge's own input checks before it generates anything: the up-front ones
(files, adapters, code, architectures: mergekit_expo.run.check_inputs, the same function the merge
calls) and the per-tensor ones (NaN or Inf inputs, a candidate its dtype cannot hold: the kernel's,
raised as the merge's MergeError naming the alpha). Recipes the merge takes but the sweep cannot
build are refused saying what to do; models that ship their own code run with --trust-remote-code."""

import json
import os
import shutil

import pytest
import yaml
from conftest import expo_recipe, run_cli, slices_recipe, write_recipe
from safetensors.torch import load_file, save_file

from expo_eval.backends import BackendError
from expo_eval.backends.vllm import ExpoWorkerExtension, VLLMBackend
from expo_eval.config import SweepConfig
from expo_eval.sweep import Sweep
from mergekit_expo.run import MergeError

TESTS = os.path.dirname(__file__)

REMOTE_CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote_lm"
'''
REMOTE_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tinyremote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path):
    """`rewards:word_count` importable by the CLI; transformers copies model code into a private folder."""
    monkeypatch.setenv("PYTHONPATH", TESTS)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def copy_with(family, tmp_path, name, tensor, value):
    """The family's model `name`, one element of `tensor` set to `value`."""
    broken = shutil.copytree(family[name], tmp_path / f"{name}_broken")
    state = load_file(broken / "model.safetensors")
    state[tensor][0, 0] = value
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


def with_config(family, tmp_path, name, folder, **changes):
    """The family's model `name` with config.json changed (and any code files written)."""
    copy = shutil.copytree(family[name], tmp_path / folder)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


def remote_code(family, tmp_path, name):
    """The family's model `name` as a model that ships its own code (config.json auto_map)."""
    folder = with_config(
        family, tmp_path, name, f"remote_{name}", model_type="tiny_remote_lm", architectures=["TinyRemoteForCausalLM"],
        auto_map={"AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
                  "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"},
    )
    (folder / "configuration_tinyremote.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tinyremote.py").write_text(REMOTE_MODEL)
    return folder


def sweep(recipe: dict, tmp_path, *flags, alphas="0.5"):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    return run_cli("mergekit-expo", "sweep", path, "--out", tmp_path / "out", "--alphas", alphas, "--prompts", "smoke",
                   "--limit", "2", "--max-new-tokens", "4", "--reward-model", "rewards:word_count", *flags, check=False)


def refused(result, *named) -> str:
    """A non-zero exit with one `Error:` line naming every name, and no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "Error: " in line]
    assert len(errors) == 1 and all(name in errors[0] for name in named), result.stderr[-3000:]
    return errors[0]


def nothing_generated(tmp_path) -> bool:
    return not list((tmp_path / "out" / "cache").glob("*.jsonl"))


# ------------------------------------------------------------------ per tensor, before generating


def test_a_nan_in_the_aligned_model_stops_the_sweep_before_generating(family, tmp_path):
    name = "model.layers.1.self_attn.v_proj.weight"
    broken = copy_with(family, tmp_path, "dpo", name, float("nan"))
    result = sweep(expo_recipe(family, models=()) | {"models": [{"model": str(broken)}]}, tmp_path)
    refused(result, "alpha=0", f"{name}: 1 NaN or Inf value(s) in {broken}", "theta1")
    assert nothing_generated(tmp_path)


def test_a_grid_alpha_whose_candidate_overflows_stops_the_sweep_before_generating(family, tmp_path):
    """Only the ends of the grid are built (each element is linear in alpha); 1e9 is one."""
    recipe = expo_recipe(family, out_dtype="float16")
    del recipe["dtype"]
    result = sweep(recipe, tmp_path, alphas="0.5,1e9,2")
    refused(result, "alpha=1e+09: ", "theta2 overflows float16 at alpha 1e+09", "use a smaller alpha")
    assert nothing_generated(tmp_path)


def test_huge_finite_weights_that_overflow_at_a_grid_alpha_stop_before_generating(family, tmp_path):
    """theta1 itself (alpha 0) holds 3e38, which bfloat16 holds; alpha 0.5 does not."""
    name = "model.layers.0.mlp.up_proj.weight"
    huge = copy_with(family, tmp_path, "dpo", name, 3e38)
    result = sweep(expo_recipe(family, models=()) | {"models": [{"model": str(huge)}]}, tmp_path)
    refused(result, f"alpha=0.5: {name}: theta2 overflows bfloat16")
    assert nothing_generated(tmp_path)


def test_a_candidate_whose_activations_overflow_float16_is_named(family, tmp_path):
    """At alpha 1e6 every weight fits float16, but the forward pass overflows: known only by running it."""
    recipe = expo_recipe(family, out_dtype="float16")
    del recipe["dtype"]
    result = sweep(recipe, tmp_path, alphas="1e6")
    refused(result, "alpha=1e+06: the model's logits are NaN or infinite", "float16", "out_dtype: float32")


def test_a_search_whose_high_end_overflows_stops_before_generating(family, tmp_path):
    recipe = expo_recipe(family, out_dtype="float16")
    del recipe["dtype"]
    config = SweepConfig(recipe=write_recipe(tmp_path / "r.yaml", recipe), out=tmp_path / "out", prompts="smoke",
                         limit=2, search={"low": 0.5, "high": 1e9}, reward_models=["rewards:word_count"])
    with pytest.raises(MergeError, match=r"alpha=1e\+09: .*overflows float16"):
        Sweep(config, backend=object())


def test_a_rerun_whose_ends_are_generated_builds_no_candidate_to_check(family, tmp_path, monkeypatch):
    import expo_eval.inputs as inputs_module
    from test_sweep_trust import FakeBackend

    config = SweepConfig(recipe=write_recipe(tmp_path / "r.yaml", expo_recipe(family)), out=tmp_path / "out",
                         prompts="smoke", limit=2, alphas=[0.5], reward_models=["rewards:word_count"])
    checked = []

    class Recording(inputs_module.Candidates):
        def check(self, alphas):
            checked.append(list(alphas))
            super().check(alphas)

    monkeypatch.setattr(inputs_module, "Candidates", Recording)
    Sweep(config, backend=FakeBackend()).run()
    assert checked == [[0.0, 0.5]]
    Sweep(config, backend=FakeBackend())
    assert checked == [[0.0, 0.5]]


# ------------------------------------------------------------------ up front: the merge's own checks


def other_architecture(family, tmp_path):
    return with_config(family, tmp_path, "dpo", "mistral_dpo", architectures=["MistralForCausalLM"], model_type="mistral")


UP_FRONT = {
    "a missing model folder": (lambda family, tmp_path: tmp_path / "no_such_model",
                               lambda aligned: [f"{aligned}: no such model folder (nor a Hub ID owner/name)"]),
    "another architecture": (other_architecture,
                             lambda aligned: ["different architectures", f"{aligned} is MistralForCausalLM", "is LlamaForCausalLM"]),
    "remote code without --trust-remote-code": (lambda family, tmp_path: remote_code(family, tmp_path, "dpo"),
                                                lambda aligned: [f"{aligned} runs its own code", "--trust-remote-code"]),
}


@pytest.mark.parametrize("case", UP_FRONT, ids=list(UP_FRONT))
@pytest.mark.parametrize("command", ["sweep", "mergekit-yaml"])
def test_the_sweep_and_the_merge_refuse_bad_models_up_front(family, tmp_path, case, command):
    make, messages = UP_FRONT[case]
    aligned = make(family, tmp_path)
    recipe = expo_recipe(family, models=()) | {"models": [{"model": str(aligned)}]}
    if command == "sweep":
        result = sweep(recipe, tmp_path)
        assert nothing_generated(tmp_path)
    else:
        result = run_cli("mergekit-yaml", write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path / "merged", check=False)
        assert not (tmp_path / "merged").exists()
    refused(result, *messages(aligned))


def test_policy_models_with_their_own_code_are_swept_with_trust_remote_code(family, tmp_path):
    """The internlm2 recipes' case: the flag reaches mergekit's planner, transformers' loaders and the merge's tokenizer."""
    models = {name: remote_code(family, tmp_path, name) for name in ("sft", "dpo")}
    result = sweep(expo_recipe(models), tmp_path, "--trust-remote-code")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Chosen alpha" in result.stdout


def test_a_lora_adapter_without_a_merge_cache_is_named_by_the_merge(family, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    recipe = expo_recipe(family, models=()) | {"models": [{"model": f"{family['dpo']}+{adapter}"}]}
    result = run_cli("mergekit-yaml", write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path / "merged", check=False)
    refused(result, f"{family['dpo']}+{adapter}", "--lora-merge-cache DIR")


# ------------------------------------------------------------------ recipes the merge takes, the sweep cannot build


def test_a_lora_adapter_is_refused_saying_how_to_merge_it_first(family, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    model = f"{family['dpo']}+{adapter}"
    result = sweep(expo_recipe(family, models=()) | {"models": [{"model": model}]}, tmp_path)
    refused(result, model, "LoRA", "merge_method: passthrough", "--lora-merge-cache")
    assert nothing_generated(tmp_path)


def test_a_slices_recipe_is_refused_saying_what_to_sweep(family, tmp_path):
    recipe = slices_recipe(family)
    result = sweep(recipe, tmp_path)
    refused(result, "`slices:` recipe cannot be swept", "`base_model:` and `models:`")
    assert nothing_generated(tmp_path)


# ------------------------------------------------------------------ through the vLLM backend (no engine)


class Runner:
    def __init__(self):
        self.model = self

    def load_weights(self, weights):
        for _ in weights:
            pass


class Worker(ExpoWorkerExtension):
    def __init__(self):
        self.model_runner = Runner()
        self.device = "cpu"


class OneWorkerLLM:
    """vLLM's `LLM.collective_rpc` as far as the backend sees it: each worker's return value."""

    def __init__(self):
        self.worker = Worker()

    def collective_rpc(self, method, args=()):
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self):
        return True


def test_a_nan_reaching_a_vllm_worker_comes_back_as_the_merges_message(family, tmp_path):
    """Raised in a worker, vLLM would log its traceback and re-raise only its text in its own error."""
    name = "model.layers.1.self_attn.v_proj.weight"
    broken = copy_with(family, tmp_path, "dpo", name, float("nan"))
    backend = object.__new__(VLLMBackend)
    backend.recipe_text = yaml.safe_dump(expo_recipe(family, models=()) | {"models": [{"model": str(broken)}]})
    backend.trust_remote_code = False
    backend.llm = OneWorkerLLM()
    with pytest.raises(BackendError, match=rf"^alpha=0.5: {name}: 1 NaN or Inf value\(s\) in {broken} \(theta1"):
        backend.load_candidate(0.5)
