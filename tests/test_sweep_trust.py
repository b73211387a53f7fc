"""Sweep results that can be trusted: content-keyed and verified cache, one sweep per folder,
scores checked, reward models checked before generating, clear prompt errors."""

import json
import math
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import expo_recipe, write_recipe
from safetensors.torch import load_file, save_file

from expo_eval.backends import BackendError, Completion
from expo_eval.config import SweepConfig
from expo_eval.lock import SweepLock, SweepLockedError
from expo_eval.prompts import PromptError, load_prompts
from expo_eval.scoring import ScorerError
from expo_eval.sweep import Sweep
from mergekit_expo.tiny import build_reward_model


class FakeBackend:
    """Generates `good dog` plus the alpha, counting calls (no model)."""

    def __init__(self):
        self.generated = []

    def load_candidate(self, alpha):
        self.alpha = alpha

    def generate(self, prompts, sampling):
        self.generated.append(self.alpha)
        return [Completion(text=f"good dog {self.alpha}", tokens=3, finish_reason="stop") for _ in prompts]

    def response_logprobs(self, prompts, responses):
        return [-1.0 for _ in responses]

    def close(self):
        pass


class Scorer:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def score(self, prompts, responses):
        if isinstance(self.value, Exception):
            raise self.value
        return [self.value for _ in responses]


@pytest.fixture
def folder(family, tmp_path):
    """A private copy of the family (tests change its files)."""
    root = tmp_path / "models"
    for name in ("sft", "dpo"):
        shutil.copytree(family[name], root / name)
    return root


def sweep_config(folder, tmp_path, **extra):
    recipe = write_recipe(tmp_path / "recipe.yaml", expo_recipe({"sft": folder / "sft", "dpo": folder / "dpo"}))
    data = dict(recipe=recipe, out=tmp_path / "out", alphas=[0.5], prompts="smoke", limit=4,
                reward_models=["rewards:word_count"])
    return SweepConfig(**{**data, **extra})


def run(config, backend=None, scorers=None):
    backend = backend or FakeBackend()
    return Sweep(config, backend=backend, scorers=scorers).run(), backend


def test_a_checkpoint_changed_in_place_is_regenerated_and_named(folder, tmp_path, caplog):
    config = sweep_config(folder, tmp_path)
    first, backend = run(config)
    assert first.generated == 5  # alpha 0 and 0.5 on both splits' worth, plus their KL samples
    weights = folder / "dpo" / "model.safetensors"
    state = load_file(weights)
    state = {k: v + 1e-2 if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, weights, metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="expo_eval"):
        again, backend = run(config)
    assert again.generated == 5 and again.reused == 0
    assert any("aligned model" in r.message and "changed since the last sweep" in r.message for r in caplog.records)
    untouched, _ = run(config)
    assert untouched.generated == 0


def test_a_changed_chat_template_file_regenerates(folder, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    config = sweep_config(folder, tmp_path, chat_template=template)
    run(config)
    template.write_text("{{ messages[0]['content'] }} please")
    again, _ = run(config)
    assert again.generated == 5


def test_a_retrained_reward_model_is_rescored_not_regenerated(folder, tmp_path):
    rm = build_reward_model(str(tmp_path / "rm"), seed=0)
    config = sweep_config(folder, tmp_path, reward_models=[rm])
    first, _ = run(config)
    build_reward_model(rm, seed=1)  # retrained in place
    again, backend = run(config)
    assert again.generated == 0 and backend.generated == []
    assert again.chosen.scores[rm].mean != first.chosen.scores[rm].mean or any(
        a.scores[rm].mean != b.scores[rm].mean for a, b in zip(first.results, again.results)
    )


EDITS = {
    "the function itself": ("def score(prompt, response):\n    return 1.0\n", "return 1.0", "return 2.0", 2.0),
    "its helper's constant": (
        "SCALE = 1.0\ndef helper(r):\n    return len(r)\ndef score(prompt, response):\n    return SCALE * helper(response)\n",
        "SCALE = 1.0", "SCALE = -100.0", -100.0,
    ),
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_an_edited_scorer_module_is_rescored_not_regenerated(folder, tmp_path, monkeypatch, edit):
    source, old, new, factor = EDITS[edit]
    module = tmp_path / "edited_rewards.py"
    module.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "edited_rewards", raising=False)  # another case's module
    config = sweep_config(folder, tmp_path, reward_models=["edited_rewards:score"])
    first, _ = run(config)
    module.write_text(source.replace(old, new))
    sys.modules.pop("edited_rewards", None)
    again, _ = run(config)
    assert again.generated == 0
    name = "edited_rewards:score"
    assert again.chosen.scores[name].mean == factor * first.chosen.scores[name].mean


def damage_jsonl_missing_line(path):
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def damage_jsonl_cut(path):
    text = path.read_text()
    path.write_text(text[: len(text) - 20])


def damage_empty(path):
    path.write_text("")


@pytest.mark.parametrize("damage", [damage_jsonl_missing_line, damage_jsonl_cut, damage_empty])
def test_a_damaged_generation_entry_is_discarded_and_redone(folder, tmp_path, caplog, damage):
    config = sweep_config(folder, tmp_path)
    first, _ = run(config)
    entry = sorted((tmp_path / "out" / "cache").glob("*.jsonl"))[0]
    damage(entry)
    with caplog.at_level("WARNING", logger="expo_eval"):
        again, backend = run(config)
    assert again.generated == 1
    assert any(str(entry) in r.message and "Discarding damaged cache entry" in r.message for r in caplog.records)
    assert [r.model_dump() for r in again.results] != [] and all(r.n == first.results[i].n for i, r in enumerate(again.results))


@pytest.mark.parametrize("content", ["[1.0, 2.0", "", "[1.0]", '["a", 1, 2]', "[NaN, 1, 1]"])
def test_a_damaged_score_entry_is_discarded_and_rescored(folder, tmp_path, caplog, content):
    config = sweep_config(folder, tmp_path)
    first, _ = run(config)
    entry = sorted((tmp_path / "out" / "cache").glob("*.scores.json"))[0]
    entry.write_text(content)
    with caplog.at_level("WARNING", logger="expo_eval"):
        again, _ = run(config)
    assert again.generated == 0
    assert any(str(entry) in r.message for r in caplog.records)
    assert [r.scores for r in again.results] == [r.scores for r in first.results]


@pytest.mark.parametrize("value", [math.nan, math.inf, None, "high", RuntimeError("cuda error")])
def test_a_bad_score_stops_the_sweep_naming_the_scorer_and_caches_nothing(folder, tmp_path, value):
    config = sweep_config(folder, tmp_path, reward_models=["rewards:word_count"])
    with pytest.raises(ScorerError, match="rewards:word_count") as error:
        run(config, scorers=[Scorer("rewards:word_count", value)])
    if not isinstance(value, Exception):
        assert "prompt" in str(error.value)
    assert not list((tmp_path / "out" / "cache").glob("*.scores.json"))


def test_reward_models_are_checked_before_anything_is_generated(folder, tmp_path):
    backend = FakeBackend()
    with pytest.raises(ScorerError, match="cannot be loaded"):
        run(sweep_config(folder, tmp_path, reward_models=[str(tmp_path / "no-such-rm")]), backend)
    assert backend.generated == []


def test_a_causal_lm_saved_as_a_one_label_classifier_is_refused(folder, tmp_path):
    """Its score head would be initialized randomly (and chose alpha 2 once)."""
    fake_rm = tmp_path / "fake-rm"
    shutil.copytree(folder / "dpo", fake_rm)
    config = json.loads((fake_rm / "config.json").read_text())
    config.update(num_labels=1, architectures=["LlamaForSequenceClassification"])
    (fake_rm / "config.json").write_text(json.dumps(config))
    backend = FakeBackend()
    with pytest.raises(ScorerError, match="no trained score head"):
        run(sweep_config(folder, tmp_path, reward_models=[str(fake_rm)]), backend)
    assert backend.generated == []


def test_one_sweep_per_folder(folder, tmp_path):
    config = sweep_config(folder, tmp_path)
    with SweepLock(config.out):
        with pytest.raises(SweepLockedError, match=r"pid \d+"):
            run(config)
    run(config)  # released


def test_a_dead_holder_does_not_block(folder, tmp_path):
    config = sweep_config(folder, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from expo_eval.lock import SweepLock\n"
        "with SweepLock(sys.argv[2]):\n    print('held', flush=True); time.sleep(60)"
    ), str(tmp_path), str(config.out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SweepLockedError):
        run(config)
    holder.kill()
    holder.wait()
    run(config)  # the kernel released the dead holder's lock


def test_prompt_files_report_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "hi"}\n\n{"prompt": "\xff"}\n')
    with pytest.raises(PromptError, match=r"bad.jsonl:3: not UTF-8"):
        load_prompts(str(bad))
    parts = tmp_path / "parts.jsonl"
    parts.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": [{"type": "text"}]}]}\n')
    with pytest.raises(PromptError, match=r"parts.jsonl:2: a message's content must be a string"):
        load_prompts(str(parts))


def test_a_prompt_longer_than_the_context_is_refused(folder, tmp_path):
    from expo_eval.backends.hf import TransformersBackend
    from expo_eval.candidates import Candidates, load_recipe
    from expo_eval.config import SamplingConfig

    config = sweep_config(folder, tmp_path)
    backend = TransformersBackend(Candidates(load_recipe(config.recipe.read_text())))
    long = [{"role": "user", "content": " ".join(["the"] * 300)}]  # the tiny model has 256 positions
    with pytest.raises(BackendError, match="do not fit the model's context of 256 tokens"):
        backend.generate([long], SamplingConfig(max_new_tokens=4))


@pytest.mark.parametrize("value", ["0.5", True])
def test_a_function_returning_a_string_or_bool_is_refused(folder, tmp_path, monkeypatch, value):
    (tmp_path / "odd.py").write_text(f"def score(prompt, response):\n    return {value!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ScorerError, match="odd:score gave"):
        run(sweep_config(folder, tmp_path, reward_models=["odd:score"]))


def test_scorer_objects_without_a_fingerprint_are_never_cached(folder, tmp_path):
    config = sweep_config(folder, tmp_path, reward_models=["judge"])
    first, _ = run(config, scorers=[Scorer("judge", 1.0)])
    again, _ = run(config, scorers=[Scorer("judge", -1.0)])
    assert (first.chosen.scores["judge"].mean, again.chosen.scores["judge"].mean) == (1.0, -1.0)


def test_a_killed_rerun_leaves_the_previous_report_whole_and_records_inputs_last(folder, tmp_path):
    config = sweep_config(folder, tmp_path)
    run(config)
    report = {name: (config.out / name).read_bytes() for name in ("results.json", "best.yaml", "card_table.md")}

    class Dies(FakeBackend):
        def generate(self, prompts, sampling):
            raise KeyboardInterrupt

    weights = folder / "dpo" / "model.safetensors"
    state = {k: v + 1e-2 if v.is_floating_point() else v for k, v in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(KeyboardInterrupt):
        run(config, Dies())
    assert {name: (config.out / name).read_bytes() for name in report} == report  # until a new one is complete
    manifest = json.loads((config.out / "cache" / "inputs.json").read_text())
    assert manifest != Sweep(config, backend=FakeBackend()).inputs  # still the finished run's inputs
    assert json.loads(report["results.json"])["inputs"] == manifest  # the report says which run it is


def test_a_reward_model_without_a_chat_template_is_refused_before_generating(folder, tmp_path):
    rm = build_reward_model(str(tmp_path / "rm"))
    config_path = tmp_path / "rm" / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("chat_template", None)
    config_path.write_text(json.dumps(tokenizer_config))
    (tmp_path / "rm" / "chat_template.jinja").unlink(missing_ok=True)
    backend = FakeBackend()
    with pytest.raises(ScorerError, match="no chat template"):
        run(sweep_config(folder, tmp_path, reward_models=[rm]), backend)
    assert backend.generated == []
