"""The lm-eval capability guard on a tiny local model and a tiny local multiple-choice task."""

import json
import math
import sys

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("lm_eval")

from expo_eval.capability import CapabilityError, LmEvalConfig, check_tasks, run_lm_eval  # noqa: E402

TASK = "tiny_mc"
QUESTIONS = [
    ("what is the cat", ["cat", "the dog", "a red bird"]),
    ("where is the dog", ["house", "river", "tree"]),
    ("who is this bird", ["you", "they", "the model"]),
    ("how is the tree", ["good", "bad", "nice and green"]),
    ("why is the river blue", ["yes", "no", "thanks"]),
    ("which house is red", ["this", "that", "the small house"]),
]
# Gold labels are set against the model's own preference, so the expected accuracy is
# known and is neither 0 nor 1: 4/6 over all, 2/3 over the first three.
AGREES = [True, True, False, True, True, False]


def context(question: str) -> str:
    return f"{question} answer"


@torch.no_grad()
def choice_logliks(model, tokenizer, question: str, choices) -> list:
    """sum log p(choice tokens | context), each choice after a space: lm-eval's loglikelihood by hand."""
    prefix = tokenizer(context(question)).input_ids
    scores = []
    for choice in choices:
        continuation = tokenizer(" " + choice).input_ids
        ids = torch.tensor([prefix + continuation])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        positions = range(len(prefix) - 1, ids.shape[1] - 1)
        scores.append(sum(logp[p, ids[0, p + 1]].item() for p in positions))
    return scores


@pytest.fixture(scope="module")
def tiny(family):
    """The tiny SFT model in float32 (bf16 weights upcast exactly) and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(family["sft"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(family["sft"])


@pytest.fixture(scope="module")
def task_dir(tiny, tmp_path_factory):
    """A folder with `tiny_mc` (local JSON data) and `tiny_missing` (its data file absent)."""
    model, tokenizer = tiny
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    docs = []
    for (question, choices), agrees in zip(QUESTIONS, AGREES):
        scores = choice_logliks(model, tokenizer, question, choices)
        ranked = sorted(range(len(choices)), key=scores.__getitem__, reverse=True)
        assert scores[ranked[0]] - scores[ranked[1]] > 1e-4, f"{question!r}: choices too close to call"
        docs.append({"question": question, "choices": choices, "label": ranked[0] if agrees else ranked[1]})
    data = root / "data.json"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, data_file in [(TASK, data), ("tiny_missing", root / "absent.json")]:
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n  cache_dir: {root / 'datasets_cache'}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{question}} answer"\n'
            "doc_to_choice: choices\n"
            "doc_to_target: label\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        )
    return tasks


def test_accuracy_matches_loglikelihoods(tiny, task_dir):
    model, tokenizer = tiny
    config = LmEvalConfig(tasks=[TASK], include_path=task_dir)
    check_tasks(config)
    results = run_lm_eval(model, tokenizer, config, "cpu")
    assert set(results) == {TASK}
    metrics = results[TASK]
    assert 0 <= metrics["acc"] <= 1
    assert metrics["acc"] == pytest.approx(4 / 6)
    assert metrics.get("sample_len", len(QUESTIONS)) == len(QUESTIONS)  # reported from lm-eval 0.4.12 on
    assert all(math.isfinite(v) for v in metrics.values())
    assert not any("," in name for name in metrics)


def test_limit_is_honoured(tiny, task_dir):
    model, tokenizer = tiny
    metrics = run_lm_eval(model, tokenizer, LmEvalConfig(tasks=[TASK], include_path=task_dir, limit=3), "cpu")[TASK]
    assert metrics.get("sample_len", 3) == 3  # reported from lm-eval 0.4.12 on
    assert metrics["acc"] == pytest.approx(2 / 3)
    # the standard error of a mean of [1, 1, 0]: sample std (n - 1) / sqrt(n) = 1/3
    assert metrics["acc_stderr"] == pytest.approx(1 / 3)


def test_deterministic_and_leaves_global_rng_alone(tiny, task_dir):
    model, tokenizer = tiny
    config = LmEvalConfig(tasks=[TASK], include_path=task_dir, batch_size=2)
    torch.manual_seed(7)
    first = run_lm_eval(model, tokenizer, config, "cpu")
    after = torch.rand(3)
    torch.manual_seed(7)
    expected = torch.rand(3)
    assert torch.equal(after, expected), "run_lm_eval changed the caller's torch random stream"
    torch.manual_seed(99)
    assert run_lm_eval(model, tokenizer, config, "cpu") == first


def test_unknown_task_is_named_before_model_work(task_dir):
    config = LmEvalConfig(tasks=[TASK, "no_such_task_xyz"], include_path=task_dir)
    with pytest.raises(CapabilityError, match="no_such_task_xyz") as caught:
        check_tasks(config)
    assert "include_path" in str(caught.value)
    assert TASK not in str(caught.value)
    with pytest.raises(CapabilityError, match="no_such_task_xyz"):
        run_lm_eval(None, None, config, "cpu")  # fails before it touches the model


def test_task_whose_data_cannot_be_loaded(task_dir):
    with pytest.raises(CapabilityError, match="tiny_missing") as caught:
        check_tasks(LmEvalConfig(tasks=["tiny_missing"], include_path=task_dir))
    assert "data_files" in str(caught.value)


def test_more_few_shot_examples_than_the_task_has_are_refused_before_model_work(task_dir):
    check_tasks(LmEvalConfig(tasks=[TASK], include_path=task_dir, num_fewshot=len(QUESTIONS)))  # all of them: fine
    with pytest.raises(CapabilityError, match=rf"{TASK}'?: num_fewshot 7 \(from --lm-eval-num-fewshot\).* the 6 documents"):
        check_tasks(LmEvalConfig(tasks=[TASK], include_path=task_dir, num_fewshot=7))


def test_a_task_yaml_with_a_syntax_error_is_named_with_its_line(tmp_path):
    broken = tmp_path / "tiny_broken.yaml"
    broken.write_text("task: tiny_broken\ndataset_path: json\n  test_split: [test\n")
    with pytest.raises(CapabilityError, match=rf"{broken}, line 3: YAML syntax error .*task 'tiny_broken' is unknown"):
        check_tasks(LmEvalConfig(tasks=["tiny_broken"], include_path=tmp_path))


def test_lm_eval_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(CapabilityError, match=r"mergekit-expo\[lm-eval\]"):
        check_tasks(LmEvalConfig(tasks=[TASK], include_path=tmp_path))


def test_config_validation(tmp_path):
    with pytest.raises(ValidationError):
        LmEvalConfig(tasks=[])
    with pytest.raises(ValidationError, match="not a folder"):
        LmEvalConfig(tasks=[TASK], include_path=tmp_path / "nowhere")
    with pytest.raises(ValidationError):
        LmEvalConfig(tasks=[TASK], limit=0)
    with pytest.raises(ValidationError):
        LmEvalConfig(tasks=[TASK], typo=1)
    assert LmEvalConfig(tasks=[TASK]).every_alpha is False


# -- in the sweep -------------------------------------------------------------------------


def test_the_sweep_guards_alpha_zero_and_the_choice_and_caches_it(recipe, reward_model, task_dir, tmp_path, monkeypatch, family):
    """alpha 0 evaluated in place equals the aligned checkpoint evaluated from disk; a second sweep
    evaluates nothing; the guard's figures reach results.csv and best.yaml's record."""
    import yaml
    from test_sweep import config

    import expo_eval.capability
    from expo_eval.sweep import Sweep

    out = tmp_path / "out"
    settings = dict(lm_eval={"tasks": [TASK], "include_path": str(task_dir)}, alphas=[0.5, 2.0])
    outcome = Sweep(config(recipe, out, reward_model, **settings)).run()
    document = json.loads((out / "results.json").read_text())
    guarded = {c["alpha"]: c["capability"] for c in document["candidates"] if c["capability"]}
    assert set(guarded) == {0.0, outcome.chosen.alpha}
    aligned = AutoModelForCausalLM.from_pretrained(family["dpo"], dtype=torch.bfloat16).eval()
    from_disk = run_lm_eval(aligned, AutoTokenizer.from_pretrained(family["dpo"]), LmEvalConfig(tasks=[TASK], include_path=task_dir), "cpu")
    assert guarded[0.0] == from_disk
    assert f"lm_eval:{TASK}:acc" in (out / "results.csv").read_text().splitlines()[0]
    record = yaml.safe_load((out / "best.yaml").read_text())["expo_sweep"]
    assert any(row.get("lm_eval", {}).get(TASK) for row in record["select"])

    def refuse(*args, **kwargs):
        raise AssertionError("lm-eval ran again instead of reading the cache")

    monkeypatch.setattr(expo_eval.capability, "run_lm_eval", refuse)
    again = Sweep(config(recipe, out, reward_model, **settings)).run()
    assert {r.alpha: r.capability for r in again.results if r.capability} == guarded


def test_cli_names_an_unknown_task_before_generating(recipe, reward_model, task_dir, tmp_path):
    import os

    from conftest import run_cli

    os.environ["PYTHONPATH"] = os.path.dirname(__file__)
    out = tmp_path / "out"
    result = run_cli("mergekit-expo", "sweep", recipe, "--out", out, "--alphas", "0.5", "--prompts", "smoke", "--limit", "2",
                     "--reward-model", reward_model, "--lm-eval-task", "no_such_task_xyz", "--lm-eval-include-path", task_dir, check=False)
    assert result.returncode != 0 and "no_such_task_xyz" in result.stderr and "Traceback" not in result.stderr
    assert not list(out.glob("cache/*.jsonl"))


def test_lower_is_better_metrics_are_named_and_judged_that_way():
    from expo_eval.capability import LOWER_IS_BETTER
    from expo_eval.records import CandidateResult
    from expo_eval.search import capability_flags

    ppl = "word_perplexity" + LOWER_IS_BETTER
    stderr = "word_perplexity_stderr" + LOWER_IS_BETTER

    def result(alpha, perplexity, acc):
        metrics = {"acc": acc, "acc_stderr": 0.01, ppl: perplexity, stderr: 0.5}
        return CandidateResult(alpha=alpha, label=f"alpha={alpha:g}", split="select", n=10, scores={},
                               mean_tokens=1, length_cut_share=0, repetition=0, capability={"t": metrics})

    base = result(0.0, 20.0, 0.5)
    better = result(0.5, 10.0, 0.5)
    worse = result(0.5, 40.0, 0.4)
    assert capability_flags([base, better], better) == []
    flags = capability_flags([base, worse], worse)
    assert len(flags) == 2 and any(ppl in f for f in flags) and any(f.startswith("t acc ") for f in flags)


def test_an_edited_data_file_outside_the_task_folder_changes_the_fingerprint(tmp_path):
    from expo_eval.capability import task_fingerprint

    data, tasks = tmp_path / "data.json", tmp_path / "tasks"
    tasks.mkdir()
    data.write_text('{"q": 1}\n')
    (tasks / "t.yaml").write_text(f"task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\nprocess_docs: !function utils.process\n")
    config = LmEvalConfig(tasks=["t"], include_path=tasks)
    before = task_fingerprint(config)
    data.write_text('{"q": 2}\n')
    assert task_fingerprint(config) != before
