"""The offline end-to-end demo (`mergekit-expo demo`): its task, its stage cache, and a
--quick run checked artifact by artifact. The full run's shape is checked by
benchmarks/demo_full.py, not here.
"""

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from expo_eval.demo import task

GT = "expo_eval.demo.task:ground_truth"


# -- the task ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        ("the cat is happy . the dog is sad .", 0.0),
        ("the cat is happy . the dog is kind .", 2.0),
        ("the dog is old . the cat is brave .", 1.0),  # any order
        ("the cat is happy .", 0.0),  # dog missing
        ("the cat is happy . the dog", -1.0),  # unfinished sentence, dog missing
        ("the cat is happy . the cat is kind . the dog is kind .", 1.0),  # repeat
        ("the cat is happy . the owl is kind . the dog is kind .", 1.0),  # off-topic
        ("happy the is cat .", -3.0),
        ("", -2.0),
    ],
)
def test_ground_truth(response, expected):
    assert task.ground_truth("describe cat dog", response) == expected


def test_reference_answers_are_well_formed_and_broken_copies_lose():
    rng = random.Random(0)
    for _ in range(200):
        nouns = task.sample_nouns(rng)
        prompt, answer = task.prompt_text(nouns), task.reference_answer(nouns, rng)
        score = task.ground_truth(prompt, answer)
        assert score == sum(task.ADJECTIVES[w] for w in answer.split()[3::5])
        chosen, rejected = task.format_pair(prompt, answer, rng)
        assert chosen == answer and task.ground_truth(prompt, rejected) < score


def test_tokenizer_chat_format():
    """TRL needs the rendered prompt to be a token prefix of prompt + answer, ending in EOS."""
    tokenizer = task.build_tokenizer()
    prompt = [{"role": "user", "content": "describe cat river"}]
    full = prompt + [{"role": "assistant", "content": "the cat is happy . the river is old ."}]
    def ids(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    prompt_ids, full_ids = ids(prompt, add_generation_prompt=True), ids(full)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in full_ids
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)


def test_held_out_prompts_are_distinct():
    sets = task.unique_noun_sets(random.Random(1), 300)
    assert len(set(sets)) == 300 and all(1 <= len(s) <= task.MAX_NOUNS for s in sets)


# -- the stage cache -------------------------------------------------------------------


def test_stages_reuse_and_invalidate(tmp_path):
    from expo_eval.demo.pipeline import QUICK, Layout, Stages

    layout = Layout(tmp_path)
    runs = []

    def pipeline(settings, force=False):
        stages = Stages(layout, settings, force, echo=lambda _: None)
        for name, after in (("task", []), ("sft", ["task"]), ("dpo", ["sft"]), ("report", ["dpo"])):
            out = tmp_path / name
            stages.run(name, after, [out], lambda name=name, out=out: (runs.append(name), out.mkdir()))
        return stages

    pipeline(QUICK)
    assert runs == ["task", "sft", "dpo", "report"]
    runs.clear()
    stages = pipeline(QUICK)
    assert runs == [] and all(t["reused"] for t in stages.timings.values())
    pipeline(QUICK.model_copy(update={"dpo_beta": 0.5}))  # a DPO setting: DPO and what follows
    assert runs == ["dpo", "report"]
    runs.clear()
    shutil.rmtree(tmp_path / "sft")  # a missing output redoes its stage and everything after it
    pipeline(QUICK.model_copy(update={"dpo_beta": 0.5}))
    assert runs == ["sft", "dpo", "report"]
    runs.clear()
    pipeline(QUICK.model_copy(update={"dpo_beta": 0.5}), force=True)
    assert runs == ["task", "sft", "dpo", "report"]


def test_every_stage_runs_seeded_on_the_demos_thread_count(tmp_path):
    """Whatever the caller's thread count and random draws, a stage runs on THREADS threads
    with deterministic kernels and the same random streams; the caller's settings come back."""
    import torch
    import torch.utils.deterministic

    from expo_eval.demo.pipeline import QUICK, THREADS, Layout, Stages

    seen = []

    def work():
        deterministic = torch.are_deterministic_algorithms_enabled()
        seen.append((torch.get_num_threads(), deterministic, float(torch.rand(1)), random.random()))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(THREADS + 2)
        for name in ("a", "b"):
            Stages(Layout(tmp_path / name), QUICK, False, echo=lambda _: None).run("sft", [], [], work)
            torch.rand(5), random.random()  # the caller's draws between stages shift no stage's streams
        assert torch.get_num_threads() == THREADS + 2 and not torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory
    finally:
        torch.set_num_threads(threads)
    assert seen[0][:2] == (THREADS, True) and seen[0] == seen[1]


def test_task_stage_is_deterministic(tmp_path):
    from expo_eval.demo.pipeline import QUICK, Layout, make_task

    for name in ("a", "b"):
        make_task(Layout(tmp_path / name), QUICK)
    for file in ("sft.jsonl", "pair_prompts.jsonl", "dev.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / "task" / file).read_text() == (tmp_path / "b" / "task" / file).read_text()
    dev = (tmp_path / "a" / "task" / "dev.jsonl").read_text().splitlines()
    test = (tmp_path / "a" / "task" / "test.jsonl").read_text().splitlines()
    assert len(dev) == QUICK.dev_prompts and len(test) == QUICK.test_prompts and not set(dev) & set(test)


# -- a --quick run, end to end ---------------------------------------------------------

CHECKPOINTS = ("p10", "p20", "p40", "p100")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`mergekit-expo demo --quick` run twice into one folder: made, then reused."""
    if importlib.util.find_spec("trl") is None:
        pytest.skip("the demo trains with TRL: pip install 'mergekit-expo[demo]'")
    root = tmp_path_factory.mktemp("demo")
    out = root / "out" / "demo"
    first = run_cli("mergekit-expo", "demo", "--quick", "--out", out)
    second = run_cli("mergekit-expo", "demo", "--quick", "--out", out)
    return {"root": root, "out": out, "first": first.stdout, "second": second.stdout}


def test_quick_run_trains_every_model(quick):
    from transformers import AutoConfig

    out = quick["out"]
    for path in [out / "sft", *(out / "dpo" / c for c in CHECKPOINTS)]:
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file(), path
    reward = AutoConfig.from_pretrained(out / "reward_model")
    assert reward.architectures == ["LlamaForSequenceClassification"]
    assert reward.num_labels == 1 and reward.pad_token_id not in (None, reward.eos_token_id)
    # DPO moved the weights, by more at each later checkpoint
    from safetensors.torch import load_file

    sft = load_file(out / "sft" / "model.safetensors")
    distances = []
    for checkpoint in CHECKPOINTS:
        dpo = load_file(out / "dpo" / checkpoint / "model.safetensors")
        distances.append(sum(float((dpo[k] - sft[k]).norm() ** 2) for k in sft) ** 0.5)
    assert 0 < distances[0] < distances[-1]
    pairs = [json.loads(line) for line in (out / "pairs" / "preference.jsonl").read_text().splitlines()]
    assert pairs
    for pair in pairs:
        assert task.ground_truth(pair["prompt"], pair["chosen"]) > task.ground_truth(pair["prompt"], pair["rejected"])


def test_quick_run_sweeps_every_checkpoint(quick):
    out = quick["out"]
    for checkpoint in CHECKPOINTS:
        recipe = yaml.safe_load((out / "recipes" / f"{checkpoint}.yaml").read_text())
        assert recipe["merge_method"] == "expo"
        assert Path(recipe["base_model"]) == (out / "sft").resolve()
        assert Path(recipe["models"][0]["model"]) == (out / "dpo" / checkpoint).resolve()
        sweep = out / "sweeps" / checkpoint
        for name in ("results.json", "results.csv", "best.yaml", "card_table.md", "reward_vs_alpha.png", "demo.json"):
            assert (sweep / name).is_file(), sweep / name
        results = json.loads((sweep / "results.json").read_text())
        assert results["selector"] == str(out / "reward_model")
        summary = json.loads((sweep / "demo.json").read_text())
        assert results["selection"]["rule"] == "kl-bound"
        assert summary["alphas"]["kl-bound"] == results["chosen_alpha"]
        assert set(summary["alphas"]) == {"kl-bound", "reward-max", "kl-penalty", "one-se", "oracle"}
        evaluated = {(r["alpha"], r["split"]) for r in summary["results"]}
        alphas = {0.0, 0.5, 2.0, 8.0}
        assert {(a, "select") for a in alphas} <= evaluated
        for alpha in (0.0, *summary["alphas"].values()):
            assert (alpha, "report") in evaluated
        assert all(set(r["scores"]) == {str(out / "reward_model"), GT} for r in summary["results"])
        for alpha in (0.0, *summary["alphas"].values()):
            assert len(summary["examples"][f"{alpha:g}"]) == 4
    first = json.loads((out / "sweeps" / "p10" / "demo.json").read_text())
    assert {(None, "select"), (None, "report")} <= {(r["alpha"], r["split"]) for r in first["results"]}


def test_quick_run_report(quick):
    out = quick["out"]
    report = (out / "report.md").read_text()
    expected = ("| model |", "SFT", "DPO 10%", "DPO 100%", "alpha by RM", "alpha by kl-bound", "alpha by truth",
                "paper's claims", "## Examples", "each rule against the ground truth")
    for text in (*expected, "Stage timings"):
        assert text in report, text
    for name in ("reward_vs_alpha.png", "length_vs_alpha.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}" in report
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["table"]) == 1 + 4 * len(CHECKPOINTS)
    assert len(summary["selection"]["rows"]) == len(CHECKPOINTS)  # one seed in --quick
    assert summary["selection"]["outcomes"]["oracle"]["within_one_se_of_oracle"] == len(CHECKPOINTS)
    verdicts = {c["verdict"] for c in summary["claims"]}
    assert summary["claims"] and all(
        v in ("holds", "does not hold", "seen", "not seen") or v.startswith("holds for ") for v in verdicts
    )
    assert set(summary["alphas"]) == set(CHECKPOINTS)


def test_quick_run_prints_table_and_timings_then_reuses_every_stage(quick):
    stages = ["task", "sft", "pairs", "reward_model", "dpo", *(f"sweep:{c}" for c in CHECKPOINTS), "report"]
    for stage in stages:
        assert f"[{stage}] done in" in quick["first"], stage
        assert f"[{stage}] reused" in quick["second"], stage
    for output in (quick["first"], quick["second"]):
        assert "ExPO demo: test prompts" in output and "Stage timings" in output
    assert "This run: 0 s of stages." in quick["second"]


def figures(out: Path) -> dict:
    """What a demo run in `out` reports, timings and the folder's own path left out: the
    models, summary.json, report.md, and each sweep's results and summary."""

    def plain(value):
        if isinstance(value, dict):  # input fingerprints cover training_args.bin, which names the folder
            return {k: plain(v) for k, v in value.items() if k not in ("timing", "inputs")}
        return [plain(v) for v in value] if isinstance(value, list) else value

    def read(path: Path):
        text = path.read_text().replace(str(out), "OUT")
        return plain(json.loads(text)) if path.suffix == ".json" else text

    report = read(out / "report.md")
    found = {
        "report.md": report[: report.index("## Stage timings")],
        "summary.json": read(out / "summary.json"),
        **{str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("**/model.safetensors"))},
    }
    for checkpoint in CHECKPOINTS:
        for name in ("results.json", "demo.json"):
            found[f"{checkpoint}/{name}"] = read(out / "sweeps" / checkpoint / name)
    return found


def test_quick_runs_agree_on_any_thread_count(quick, tmp_path):
    """A run on four threads (as on a four-core machine), with another hash seed, reports what
    the fixture's run (OMP_NUM_THREADS=1 under scripts/test.sh) did, timings aside."""
    out = tmp_path / "demo"
    wide = "import torch; torch.set_num_threads(4); from expo_eval.cli import main; main()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "1", "OMP_NUM_THREADS": "4"}
    result = subprocess.run(
        [sys.executable, "-c", wide, "demo", "--quick", "--out", str(out)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ours, theirs = figures(out), figures(quick["out"])
    assert list(ours) == list(theirs) and len(ours) > 2 + len(CHECKPOINTS)
    for name in ours:
        assert ours[name] == theirs[name], name


def test_checked_in_recipe_runs_on_the_demo_models(quick, monkeypatch):
    """recipes/demo_expo.yaml points at the demo's default output folder, out/demo."""
    from click.testing import CliRunner
    from mergekit.scripts import run_yaml

    import mergekit_expo  # noqa: F401  (registers `expo` in this process)

    monkeypatch.chdir(quick["root"])
    recipe = REPO / "recipes" / "demo_expo.yaml"
    result = CliRunner().invoke(run_yaml.main, [str(recipe), "merged"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (quick["root"] / "merged" / "model.safetensors").is_file()


def test_a_claim_true_for_some_checkpoints_says_for_which():
    from expo_eval.demo.report import verdict

    assert verdict([True, True], ["10%", "20%"]) == "holds"
    assert verdict([False, True, False], ["10%", "20%", "40%"]) == "holds for 20% only (1 of 3)"
    assert verdict([False, None], ["10%", "20%"]) == "does not hold"


def test_rule_evidence_over_seeds_counts_misses_and_falls():
    """The evidence table's verdicts from hand-made checkpoints: two seeds, one checkpoint each."""
    from expo_eval.demo.report import Checkpoint, evidence_lines, rule_outcomes
    from expo_eval.records import CandidateResult, ScoreStats

    def result(alpha, truth):
        stats = {GT: ScoreStats(mean=truth, median=truth, stderr=0.05), "rm": ScoreStats(mean=1, median=1, stderr=0.05)}
        return CandidateResult(alpha=alpha, label=f"alpha={alpha:g}", split="report", n=100, scores=stats,
                               mean_tokens=10, length_cut_share=0, repetition=0).model_dump(mode="json")

    def checkpoint(seed, alphas, truths):
        summary = {"checkpoint": "p10", "fraction": 0.1, "seed": seed, "alphas": alphas, "flags": [],
                   "results": [result(a, t) for a, t in truths.items()]}
        return Checkpoint(summary, "rm")

    rules = {"kl-bound": 1.0, "reward-max": 8.0, "kl-penalty": 8.0, "one-se": 1.0, "oracle": 2.0}
    runs = [
        [checkpoint(0, rules, {0.0: 0.3, 1.0: 0.4, 2.0: 0.42, 8.0: -0.8})],  # kl-bound within noise of 2
        [checkpoint(1, {**rules, "kl-bound": 0.0}, {0.0: 0.3, 1.0: 0.5, 2.0: 0.7, 8.0: 0.1})],  # kl-bound misses
    ]
    outcomes = rule_outcomes(runs)
    assert outcomes["reward-max"]["below_alpha_0"] == 2 and outcomes["reward-max"]["within_one_se_of_oracle"] == 0
    assert outcomes["kl-bound"]["below_alpha_0"] == 0 and outcomes["kl-bound"]["within_one_se_of_oracle"] == 1
    assert outcomes["kl-bound"]["misses"] == [
        "seed 1, DPO 10% of an epoch: alpha 0, 0.40 below the oracle's alpha 2 (± 0.07)"
    ]
    assert outcomes["kl-bound"]["by_seed"]["0"]["within_one_se_of_oracle"] == 1
    assert outcomes["kl-bound"]["by_seed"]["1"]["within_one_se_of_oracle"] == 0
    text = "\n".join(evidence_lines(runs, outcomes))
    assert "does not meet the goal" in text and "| `reward-max` | 2 of 2 (1, 1) | 0 of 2 (0, 0) |" in text
    assert "| `kl-bound` | 0 of 2 (0, 0) | 1 of 2 (1, 0) |" in text


def test_further_seeds_have_their_own_folders(tmp_path):
    from expo_eval.demo.pipeline import run_demo, seed_layouts

    assert [l.root for l in seed_layouts(tmp_path, [3, 0, 7])] == [tmp_path, tmp_path / "seeds" / "0", tmp_path / "seeds" / "7"]
    with pytest.raises(ValueError, match="distinct seeds"):
        run_demo(tmp_path, seeds=[1, 1])
