"""Candidates, the transformers backend, prompts and scorers, on tiny local models."""

import json

import pytest
import torch
import yaml
from conftest import expo_recipe, load, run_cli, write_recipe

from expo_eval.backends.hf import BackendError, PresenceFrequencyPenalty, TransformersBackend
from expo_eval.candidates import Candidates, RecipeError, load_recipe
from expo_eval.config import SamplingConfig
from expo_eval.prompts import PromptError, load_prompts, split_prompts
from expo_eval.scoring import ScorerError, load_scorer
from mergekit_expo.tiny import build_reward_model


@pytest.fixture(scope="module")
def filtered_recipe(family):
    recipe = expo_recipe(family, models=("dpo", "dpo_b"))
    recipe["parameters"]["alpha"] = [{"filter": "mlp", "value": 0.1}, {"value": 0.3}]
    return recipe


@pytest.fixture(scope="module")
def backend(filtered_recipe):
    return TransformersBackend(Candidates(load_recipe(yaml.safe_dump(filtered_recipe))))


def test_stochastic_rounding_in_place_equals_mergekit_yaml(filtered_recipe, tmp_path):
    recipe = dict(filtered_recipe, parameters={"alpha": 0.3, "rounding": "stochastic", "rounding_seed": 7})
    run_cli("mergekit-yaml", write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")
    weights = dict(Candidates(load_recipe(yaml.safe_dump(recipe))).weights(0.3))
    assert all(torch.equal(weights[k], v) for k, v in load(tmp_path / "out").items())


@pytest.mark.parametrize("alpha", [0.0, 0.4, 2.0])
def test_in_place_weights_equal_mergekit_yaml_bitwise(filtered_recipe, backend, tmp_path, alpha):
    recipe = dict(filtered_recipe, parameters={"alpha": alpha})
    run_cli("mergekit-yaml", write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")
    written = load(tmp_path / "out")
    backend.load_candidate(alpha)
    state = backend.model.state_dict()
    for name, tensor in written.items():
        assert state[name].dtype == tensor.dtype
        assert torch.equal(state[name], tensor), name


def test_sft_candidate_is_theta0(backend, family):
    backend.load_candidate(None)
    theta0 = load(family["sft"])
    assert all(torch.equal(backend.model.state_dict()[k], v) for k, v in theta0.items())


def test_generation_is_deterministic_and_records_finish_reasons(backend):
    prompts = [p.messages for p in load_prompts("smoke", limit=5)]
    sampling = SamplingConfig(max_new_tokens=6, batch_size=2)
    backend.load_candidate(0.3)
    first = backend.generate(prompts, sampling)
    assert first == backend.generate(prompts, sampling)
    assert len(first) == 5
    assert all(c.finish_reason in ("stop", "length") and 0 < c.tokens <= 6 for c in first)
    assert any(c.finish_reason == "length" for c in first)


def test_left_padding_does_not_change_a_prompts_completion(backend):
    short, long = (p.messages for p in load_prompts("smoke", limit=2))
    greedy = SamplingConfig(temperature=0, max_new_tokens=5, batch_size=2)
    alone = backend.generate([short], greedy)[0]
    batched = backend.generate([long, short], greedy)[1]
    assert alone.text == batched.text


def test_penalties_count_generated_tokens_only():
    penalty = PresenceFrequencyPenalty(prompt_length=3, presence=0.5, frequency=0.25)
    ids = torch.tensor([[7, 7, 7, 1, 1, 2]])
    out = penalty(ids, torch.zeros(1, 8))
    assert out[0, 1] == -(0.5 + 2 * 0.25)
    assert out[0, 2] == -(0.5 + 0.25)
    assert out[0, 7] == 0


def test_tokenizer_without_chat_template_needs_the_flag(family, tmp_path):
    """The merge copies theta0's tokenizer: without a template there, one must be given."""
    config_path = family["sft"] / "tokenizer_config.json"
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(family["sft"], bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = expo_recipe(family)
    recipe["base_model"] = str(bare)
    candidates = Candidates(load_recipe(yaml.safe_dump(recipe)))
    with pytest.raises(BackendError, match="--chat-template"):
        TransformersBackend(candidates)
    TransformersBackend(candidates, chat_template="{{ messages[0]['content'] }}")


def test_recipe_must_be_expo(family):
    with pytest.raises(RecipeError, match="merge_method: linear"):
        load_recipe(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(family["dpo"])}]}))


def test_prompt_sources(tmp_path):
    smoke = load_prompts("smoke")
    assert len(smoke) >= 10 and len({p.id for p in smoke}) == len(smoke)
    select, report = split_prompts(smoke, 0.5)
    assert not {p.id for p in select} & {p.id for p in report}
    assert split_prompts(list(reversed(smoke)), 0.5) == (select, report)
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "x"}]}\n')
    assert [p.text for p in load_prompts(str(rows))] == ["hi", "yo"]
    assert len(load_prompts(str(rows), limit=1)) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(PromptError, match="no usable prompts in 1 rows"):
        load_prompts(str(empty))


def test_reward_model_scores_one_scalar_per_response(tmp_path):
    rm = load_scorer(build_reward_model(str(tmp_path / "rm")))
    prompts = load_prompts("smoke", limit=3)
    scores = rm.score(prompts, ["good dog", "bad cat .", "hello"])
    assert len(scores) == 3 and len(set(scores)) == 3
    assert rm.score(prompts[:1], ["good dog"])[0] == pytest.approx(scores[0], abs=1e-5)
    ids = rm._encode(prompts[0], "good dog")
    assert ids.count(rm.tokenizer.bos_token_id) == 1


def test_classifier_with_several_labels_is_rejected(tmp_path):
    with pytest.raises(ScorerError, match="not a scalar reward model"):
        load_scorer(build_reward_model(str(tmp_path / "rm"), num_labels=3))


def test_function_scorer():
    scorer = load_scorer("rewards:word_count")
    assert scorer.score(load_prompts("smoke", limit=2), ["a b c", ""]) == [3.0, 0.0]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1000 elements: every tiny-model matrix is computed in several pieces."""
    import expo_eval.candidates as module

    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 1000)


@pytest.mark.parametrize(
    "extra",
    [{}, {"dtype": "float32"}, {"out_dtype": "float16"}],
    ids=["bf16", "dtype-float32", "out-float16"],
)
def test_chunked_candidates_equal_mergekit_yaml_bitwise(filtered_recipe, small_chunks, tmp_path, extra):
    recipe = dict(filtered_recipe, parameters={"alpha": 0.7}, **extra)
    run_cli("mergekit-yaml", write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")
    written = load(tmp_path / "out")
    candidates = Candidates(load_recipe(yaml.safe_dump(recipe)))
    pieces = [name for name, _, rows, _ in candidates.chunks(0.7) if rows is not Ellipsis]
    assert len(pieces) > len(set(pieces)) > 0  # some tensors really came in several chunks
    weights = dict(candidates.weights(0.7))
    assert weights.keys() == written.keys()
    for name, tensor in written.items():
        assert weights[name].dtype == tensor.dtype and torch.equal(weights[name], tensor), name
    filled = {name: torch.empty_like(tensor) for name, tensor in written.items()}
    assert candidates.fill(0.7, filled) == len(written)
    assert all(torch.equal(filled[k], v) for k, v in written.items())


def test_inputs_stay_as_stored(filtered_recipe):
    """A float32 recipe dtype does not hold float32 copies of both bf16 models for the sweep."""
    candidates = Candidates(load_recipe(yaml.safe_dump(dict(filtered_recipe, dtype="float32"))))
    dtypes = {t.dtype for _, _, tensors, _ in candidates._tasks for t in tensors.values()}
    assert dtypes == {torch.bfloat16}
    assert candidates.dtype == torch.float32


def test_fill_names_a_missing_or_misshapen_tensor(filtered_recipe):
    candidates = Candidates(load_recipe(yaml.safe_dump(filtered_recipe)))
    shapes = {name: shape for name, shape, _, _ in candidates.chunks(None)}
    with pytest.raises(KeyError):
        candidates.fill(0.3, {})
    name = next(iter(shapes))
    wrong = {n: torch.empty(s, dtype=torch.bfloat16) for n, s in shapes.items()}
    wrong[name] = torch.empty(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=name):
        candidates.fill(0.3, wrong)


@pytest.fixture(scope="module")
def float32_family(tmp_path_factory):
    from pathlib import Path

    from mergekit_expo.tiny import build_family

    root = tmp_path_factory.mktemp("family32")
    return {k: Path(v) for k, v in build_family(str(root / "tiny"), dtype=torch.float32).items()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_narrowing_recipe_dtype_is_applied_as_mergekit_applies_it(float32_family, small_chunks, tmp_path, dtype):
    """float32 checkpoints, recipe `dtype: bfloat16`: mergekit rounds the inputs first."""
    recipe = dict(expo_recipe(float32_family, alpha=0.5, models=("dpo", "dpo_b")), dtype=dtype)
    run_cli("mergekit-yaml", write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")
    written = load(tmp_path / "out")
    weights = dict(Candidates(load_recipe(yaml.safe_dump(recipe))).weights(0.5))
    for name, tensor in written.items():
        assert weights[name].dtype == tensor.dtype and torch.equal(weights[name], tensor), name
