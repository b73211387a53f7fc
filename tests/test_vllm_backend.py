"""The vLLM backend's pure parts and its worker extension without vLLM; a real engine on a GPU."""

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import expo_recipe
from expo_eval.backends.vllm import (
    ExpoWorkerExtension,
    completion,
    engine_dtype,
    render_prompt,
    run_sharded,
    sampling_params_kwargs,
    shard_alphas,
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
    }


def test_top_k_zero_disables_top_k():
    assert sampling_params_kwargs(SamplingConfig(top_k=0, max_new_tokens=7))["top_k"] == -1


def test_shard_alphas_round_robin():
    assert shard_alphas([0.1, 0.2, 0.3, 0.4, 0.5], 2) == [[0.1, 0.3, 0.5], [0.2, 0.4]]
    assert shard_alphas([0.1, 0.2], 4) == [[0.1], [0.2]]
    assert shard_alphas([0.1, 0.2], 1) == [[0.1, 0.2]]
    with pytest.raises(ValueError):
        shard_alphas([0.1], 0)


def test_run_sharded_gives_each_process_one_gpu(tmp_path):
    def command(shard):
        script = "import os, sys; open(sys.argv[1], 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])"
        return [sys.executable, "-c", script, str(tmp_path / ",".join(map(str, shard)))]

    run_sharded(command, [0.1, 0.2, 0.3], gpus=["3", "5"])
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"0.1,0.3": "3", "0.2": "5"}
    with pytest.raises(RuntimeError, match="GPU 5"):
        run_sharded(
            lambda shard: [sys.executable, "-c", f"exit({int(shard == [0.2])})"],
            [0.1, 0.2],
            ["3", "5"],
        )


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


def fake_output(finish_reason, text="a b", token_ids=(5, 6, 2)):
    sample = SimpleNamespace(text=text, token_ids=list(token_ids), finish_reason=finish_reason)
    return SimpleNamespace(request_id="0", outputs=[sample])


def test_completion_from_request_output():
    done = completion(fake_output("stop"))
    assert (done.text, done.tokens, done.finish_reason) == ("a b", 3, "stop")
    assert completion(fake_output("length")).finish_reason == "length"
    with pytest.raises(RuntimeError, match="abort"):
        completion(fake_output("abort"))


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
        def __init__(self, recipe):
            built.append(recipe)
            super().__init__(recipe)

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
    with pytest.raises(ImportError, match=r"mergekit-expo\[vllm\]"):
        backend.VLLMBackend("recipe", "model")


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """A tiny family with 64-wide attention heads, a size vLLM's attention kernels support."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    config = tiny_config(
        len(build_tokenizer()), hidden_size=256, intermediate_size=512, num_heads=4
    )
    root = tmp_path_factory.mktemp("wide")
    return {k: Path(v) for k, v in build_family(str(root / "tiny"), config=config).items()}


def test_real_engine_swaps_weights_and_resets_the_prefix_cache(wide_family, monkeypatch):
    from expo_eval.backends.vllm import VLLMBackend

    recipe = yaml.safe_dump(expo_recipe(wide_family), sort_keys=False)
    backend = VLLMBackend(
        recipe,
        str(wide_family["dpo"]),
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        max_model_len=256,
        enforce_eager=True,
    )
    resets = []
    reset = backend.llm.reset_prefix_cache

    def counted_reset():
        resets.append(reset())
        return resets[-1]

    monkeypatch.setattr(backend.llm, "reset_prefix_cache", counted_reset)
    # Longer than one KV block (16 tokens), so that the prefix cache would serve it.
    content = "describe " + " ".join(["the red bird and the blue river"] * 6)
    prompts = [[{"role": "user", "content": content}]] * 4
    sampling = SamplingConfig(max_new_tokens=24)
    try:
        texts = {}
        for alpha in (0.0, 30.0, 0.0):
            backend.load_candidate(alpha)
            outputs = backend.generate(prompts, sampling)
            assert all(o.tokens > 0 and o.finish_reason in ("stop", "length") for o in outputs)
            texts.setdefault(alpha, []).append([o.text for o in outputs])
    finally:
        backend.close()
    assert resets == [True, True, True]
    assert texts[0.0][0] != texts[30.0][0]
    assert texts[0.0][0] == texts[0.0][1]  # back at alpha = 0, no stale KV blocks from alpha = 30
