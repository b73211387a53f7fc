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

from conftest import BIN, REPO, run_cli
from expo_eval.demo import task

GT = "expo_eval.demo.task:ground_truth"
REGIMES = ("short", "long")


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


def detail(noun, adjective, aspects=task.ASPECTS):
    """A long answer's block for one noun, every sentence with the same adjective."""
    return " ".join([f"the {noun} is {adjective} .", *(f"its {aspect} is {adjective} ." for aspect in aspects)])


CAT, DOG = detail("cat", "happy"), detail("dog", "old")  # 11 sentences of +1, 11 of 0
SWAPPED = (*task.ASPECTS[:-2], task.ASPECTS[-1], task.ASPECTS[-2])  # the last two aspects swapped


@pytest.mark.parametrize(
    "response, expected",
    [
        (f"{CAT} {DOG}", 11.0),  # perfect
        (f"{DOG} {CAT}", 11.0),  # the nouns in any order
        (f"{detail('cat', 'happy', task.ASPECTS[:-1])} {DOG}", 9.0),  # cat's last aspect missing: -1, and its +1 lost
        (f"{CAT} {detail('dog', 'old', task.ASPECTS[:-1])}", 10.0),  # the response ends with an aspect missing
        (f"{detail('cat', 'happy', SWAPPED)} {DOG}", 11.0),  # aspects in another order: each still counts once
        (f"{detail('cat', 'happy', ('color',) + task.ASPECTS)} {DOG}", 10.0),  # an aspect twice: the repeat is -1, its +1 lost
        (f"{detail('cat', 'happy', task.ASPECTS[:2] + task.ASPECTS[3:])} {DOG}", 9.0),  # one aspect missing mid-block: -1, its +1 lost
        (f"{CAT} {detail('owl', 'happy')}", -11.0),  # a wrong noun: 11 sentences off-topic, dog's 11 missing
        (f"{CAT} {DOG.removesuffix(' old .')}", 9.0),  # unfinished: `its home is` cut (-1), home missing (-1)
        (f"{CAT} {CAT} {DOG}", 0.0),  # a noun detailed twice: 11 repeats
        ("the cat is happy . the dog is old .", -19.0),  # a short answer: 20 aspects missing
        (f"its color is happy . {CAT} {DOG}", 10.0),  # an aspect before any noun is misplaced
    ],
)
def test_ground_truth_of_long_answers(response, expected):
    assert task.ground_truth("detail cat dog", response) == expected


def test_the_prompts_verb_decides_the_shape():
    assert task.ground_truth("describe cat", detail("cat", "happy")) == 1.0 - len(task.ASPECTS)  # aspects off-topic
    assert task.ground_truth("detail cat", "the cat is happy .") == 1.0 - len(task.ASPECTS)  # aspects missing
    assert task.shape_of("detail cat dog") is task.LONG and task.shape_of("describe cat") is task.SHORT


@pytest.mark.parametrize("shape", [task.SHORT, task.LONG], ids=["short", "long"])
def test_reference_answers_are_well_formed_and_broken_copies_lose(shape):
    rng = random.Random(0)
    for _ in range(200):
        nouns = shape.sample_nouns(rng)
        prompt, answer = shape.prompt_text(nouns), task.reference_answer(nouns, rng, shape)
        assert prompt.split()[0] == shape.verb and task.well_formed(prompt, answer)
        assert len(answer.split()) == 5 * len(nouns) * (1 + len(shape.aspects))
        score = task.ground_truth(prompt, answer)
        assert score == sum(task.ADJECTIVES[w] for w in answer.split()[3::5])
        chosen, rejected = task.format_pair(prompt, answer, rng)
        assert chosen == answer and task.ground_truth(prompt, rejected) < score


def test_off_order_keeps_every_word_and_breaks_the_order():
    answer = f"{CAT} {DOG}"
    for seed in range(20):
        broken = task.off_order(answer, random.Random(seed))
        assert sorted(broken.split()) == sorted(answer.split()) and broken != answer


@pytest.mark.parametrize(
    "prompt, answer",
    [("describe cat river", "the cat is happy . the river is old ."), ("detail cat river", f"{CAT} {detail('river', 'old')}")],
    ids=["short", "long"],
)
def test_tokenizer_chat_format(prompt, answer):
    """TRL needs the rendered prompt to be a token prefix of prompt + answer, ending in EOS."""
    tokenizer = task.build_tokenizer()
    messages = [{"role": "user", "content": prompt}]
    full = messages + [{"role": "assistant", "content": answer}]
    def ids(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    prompt_ids, full_ids = ids(messages, add_generation_prompt=True), ids(full)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in full_ids
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)


@pytest.mark.parametrize("shape", [task.SHORT, task.LONG], ids=["short", "long"])
def test_held_out_prompts_are_distinct(shape):
    low, high = shape.nouns
    rng = random.Random(1)
    sets = task.unique_noun_sets(rng, 300, shape)
    assert len(set(sets)) == 300 and all(low <= len(s) <= high for s in sets)
    more = task.unique_noun_sets(rng, 100, shape, exclude=frozenset(sets))
    assert len(set(more)) == 100 and not set(more) & set(sets)


# -- the stage cache -------------------------------------------------------------------


def test_stages_reuse_and_invalidate(tmp_path):
    from expo_eval.demo.pipeline import Stages
    from expo_eval.demo.settings import QUICK, Layout

    layout = Layout(tmp_path)
    runs = []
    short = QUICK["short"]

    def pipeline(settings, force=False):
        stages = Stages(layout, settings, force, echo=lambda _: None)
        for name, after in (("task", []), ("sft", ["task"]), ("dpo", ["sft"]), ("report", ["dpo"])):
            out = tmp_path / name
            stages.run(name, after, [out], lambda name=name, out=out: (runs.append(name), out.mkdir()))
        return stages

    pipeline(short)
    assert runs == ["task", "sft", "dpo", "report"]
    runs.clear()
    stages = pipeline(short)
    assert runs == [] and all(t["reused"] for t in stages.timings.values())
    pipeline(short.model_copy(update={"dpo_beta": 0.5}))  # a DPO setting: DPO and what follows
    assert runs == ["dpo", "report"]
    runs.clear()
    shutil.rmtree(tmp_path / "sft")  # a missing output redoes its stage and everything after it
    pipeline(short.model_copy(update={"dpo_beta": 0.5}))
    assert runs == ["sft", "dpo", "report"]
    runs.clear()
    pipeline(short.model_copy(update={"dpo_beta": 0.5}), force=True)
    assert runs == ["task", "sft", "dpo", "report"]
    runs.clear()
    pipeline(QUICK["long"])  # the other answer shape: another task, so everything
    assert runs == ["task", "sft", "dpo", "report"]


def test_every_stage_runs_seeded_on_the_demos_thread_count(tmp_path):
    """Whatever the caller's thread count and random draws, a stage runs on THREADS threads
    with deterministic kernels and the same random streams; the caller's settings come back."""
    import torch
    import torch.utils.deterministic

    from expo_eval.demo.pipeline import THREADS, Stages
    from expo_eval.demo.settings import QUICK, Layout

    seen = []

    def work():
        deterministic = torch.are_deterministic_algorithms_enabled()
        seen.append((torch.get_num_threads(), deterministic, float(torch.rand(1)), random.random()))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(THREADS + 2)
        for name in ("a", "b"):
            Stages(Layout(tmp_path / name), QUICK["short"], False, echo=lambda _: None).run("sft", [], [], work)
            torch.rand(5), random.random()  # the caller's draws between stages shift no stage's streams
        assert torch.get_num_threads() == THREADS + 2 and not torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory
    finally:
        torch.set_num_threads(threads)
    assert seen[0][:2] == (THREADS, True) and seen[0] == seen[1]


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("regime", REGIMES)
def test_task_stage_is_deterministic(tmp_path, regime):
    from expo_eval.demo.pipeline import make_task
    from expo_eval.demo.settings import QUICK, Layout

    settings, shape = QUICK[regime], task.SHAPES[regime]
    for name in ("a", "b"):
        make_task(Layout(tmp_path / name), settings)
    files = ("sft.jsonl", "curriculum.jsonl", "pair_prompts.jsonl", "dev.jsonl", "test.jsonl")
    for file in files:
        assert (tmp_path / "a" / "task" / file).read_text() == (tmp_path / "b" / "task" / file).read_text()
    made = {file: jsonl(tmp_path / "a" / "task" / file) for file in files}
    dev, test = ([row["prompt"] for row in made[f]] for f in ("dev.jsonl", "test.jsonl"))
    assert len(dev) == settings.dev_prompts and len(test) == settings.test_prompts and not set(dev) & set(test)
    assert all(p.split()[0] == shape.verb for p in [*dev, *test, *(row["prompt"] for row in made["pair_prompts.jsonl"])])
    # the long shape's SFT: a curriculum of short answers, then its own examples with short ones mixed in
    assert len(made["curriculum.jsonl"]) == settings.curriculum_examples
    assert all(row["prompt"].startswith("describe ") for row in made["curriculum.jsonl"])
    verbs = [row["prompt"].split()[0] for row in made["sft.jsonl"]]
    if regime == "long":
        assert verbs.count("detail") == settings.sft_examples and verbs.count("describe") == settings.copy_examples
    else:
        assert verbs == ["describe"] * settings.sft_examples
    assert all(task.well_formed(row["prompt"], row["answer"]) for f in ("sft.jsonl", "curriculum.jsonl") for row in made[f])


# -- a --quick run, end to end ---------------------------------------------------------

CHECKPOINTS = ("p10", "p20", "p40", "p100")
STAGES = ("task", "sft", "pairs", "reward_model:a", "reward_model:b", "dpo", *(f"sweep:{c}" for c in CHECKPOINTS), "report")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`mergekit-expo demo --quick` run twice into one folder: made (both regimes at once, one
    process each), then reused."""
    if importlib.util.find_spec("trl") is None:
        pytest.skip("the demo trains with TRL: pip install 'mergekit-expo[demo]'")
    root = tmp_path_factory.mktemp("demo")
    out = root / "out" / "demo"
    first = run_cli("mergekit-expo", "demo", "--quick", "--out", out)
    second = run_cli("mergekit-expo", "demo", "--quick", "--out", out)
    return {"root": root, "out": out, "first": first.stdout, "second": second.stdout}


@pytest.mark.parametrize("regime", REGIMES)
def test_quick_run_trains_every_model(quick, regime):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    out = quick["out"] / regime
    for path in [out / "sft", *(out / "dpo" / c for c in CHECKPOINTS)]:
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file(), path
    assert not (out / "sft_curriculum").exists()  # the long SFT's first phase, a step on the way
    reward_models = [out / "reward_models" / name for name in ("a", "b")]
    for path in reward_models:
        reward = AutoConfig.from_pretrained(path)
        assert reward.architectures == ["LlamaForSequenceClassification"]
        assert reward.num_labels == 1 and reward.pad_token_id not in (None, reward.eos_token_id)
    a, b = (load_file(path / "model.safetensors") for path in reward_models)
    assert any(not a[k].equal(b[k]) for k in a)  # each from its own pairs and seed
    # DPO moved the weights, by more at each later checkpoint
    sft = load_file(out / "sft" / "model.safetensors")
    distances = []
    for checkpoint in CHECKPOINTS:
        dpo = load_file(out / "dpo" / checkpoint / "model.safetensors")
        distances.append(sum(float((dpo[k] - sft[k]).norm() ** 2) for k in sft) ** 0.5)
    assert 0 < distances[0] < distances[-1]
    for file in ("preference.jsonl", "reward_a.jsonl", "reward_b.jsonl"):
        pairs = jsonl(out / "pairs" / file)
        assert pairs, file
        for pair in pairs:
            assert task.ground_truth(pair["prompt"], pair["chosen"]) > task.ground_truth(pair["prompt"], pair["rejected"])
    assert jsonl(out / "pairs" / "reward_a.jsonl") != jsonl(out / "pairs" / "reward_b.jsonl")


@pytest.mark.parametrize("regime", REGIMES)
def test_quick_run_sweeps_every_checkpoint(quick, regime):
    from expo_eval.demo.settings import QUICK
    from expo_eval.demo.rules import TALLIED

    out = quick["out"] / regime
    reward_models = [str(out / "reward_models" / name) for name in ("a", "b")]
    grid = {0.0, *QUICK[regime].alphas}
    for checkpoint in CHECKPOINTS:
        recipe = yaml.safe_load((out / "recipes" / f"{checkpoint}.yaml").read_text())
        assert recipe["merge_method"] == "expo"
        assert Path(recipe["base_model"]) == (out / "sft").resolve()
        assert Path(recipe["models"][0]["model"]) == (out / "dpo" / checkpoint).resolve()
        sweep = out / "sweeps" / checkpoint
        for name in ("results.json", "results.csv", "best.yaml", "card_table.md", "reward_vs_alpha.png", "demo.json"):
            assert (sweep / name).is_file(), sweep / name
        results = json.loads((sweep / "results.json").read_text())
        # chosen by trust-region of both reward models (select_with), the first the single-scorer rules' one
        assert results["selection"]["rule"] == "trust-region" and results["selector"] == reward_models[0]
        assert all(path in results["selection"]["description"] for path in reward_models)
        summary = json.loads((sweep / "demo.json").read_text())
        assert list(summary["alphas"]) == list(TALLIED)
        assert summary["alphas"]["trust-region"] == results["chosen_alpha"]
        assert set(summary["alphas"].values()) <= grid
        evaluated = {(r["alpha"], r["split"]) for r in summary["results"]}
        assert {(a, split) for a in grid for split in ("select", "report")} <= evaluated  # every dev alpha on test too
        assert all(set(r["scores"]) == {*reward_models, GT} for r in summary["results"])
        for alpha in (0.0, *summary["alphas"].values()):
            assert len(summary["examples"][f"{alpha:g}"]) == 4
    first = json.loads((out / "sweeps" / "p10" / "demo.json").read_text())
    assert {(None, "select"), (None, "report")} <= {(r["alpha"], r["split"]) for r in first["results"]}


@pytest.mark.parametrize("regime", REGIMES)
def test_quick_run_report(quick, regime):
    from expo_eval.demo.rules import RULE_ORDER, TALLIED

    out = quick["out"] / regime
    report = (out / "report.md").read_text()
    expected = (f"# ExPO demo, {regime} answers", "| model |", "SFT", "DPO 10%", "DPO 100%", "alpha by RM",
                "alpha by trust-region", "alpha by truth", "paper's claims", "## Examples",
                "each rule against the ground truth", "KL(theta1 || theta0)", "Stage timings")
    for text in expected:
        assert text in report, text
    for name in ("reward_vs_alpha.png", "length_vs_alpha.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["shape"] == regime
    assert len(summary["table"]) == 1 + 4 * len(CHECKPOINTS)
    rows = summary["selection"]["rows"]
    assert len(rows) == len(CHECKPOINTS)  # one seed in --quick
    assert all(set(row) == {"seed", "checkpoint", "KL(theta1 || theta0)", "alpha 0", *RULE_ORDER} for row in rows)
    outcomes = summary["selection"]["outcomes"]
    assert list(outcomes) == list(TALLIED)
    assert outcomes["oracle"]["within_one_se_of_oracle"] == len(CHECKPOINTS)
    verdicts = {c["verdict"] for c in summary["claims"]}
    assert summary["claims"] and all(
        v in ("holds", "does not hold", "seen", "not seen") or v.startswith("holds for ") for v in verdicts
    )
    assert set(summary["alphas"]) == set(CHECKPOINTS)


def test_quick_run_overview_spans_both_regimes(quick):
    from expo_eval.demo.rules import RULE_ORDER

    out = quick["out"]
    report = (out / "report.md").read_text()
    for text in ("[short](short/report.md)", "[long](long/report.md)", "## Short answers", "## Long answers"):
        assert text in report, text
    for rule in RULE_ORDER:  # each regime's outcome table
        assert report.count(f"| `{rule}` |") == len(REGIMES), rule
    overview = json.loads((out / "summary.json").read_text())
    assert list(overview) == list(REGIMES)
    for regime in REGIMES:
        own = json.loads((out / regime / "summary.json").read_text())
        assert overview[regime] == {"selection": own["selection"], "settings": own["settings"]}


def test_quick_run_prints_table_and_timings_then_reuses_every_stage(quick):
    for regime in REGIMES:
        for stage in STAGES:
            assert f"[{regime}] [{stage}] done in" in quick["first"], (regime, stage)
            assert f"[{regime}] [{stage}] reused" in quick["second"], (regime, stage)
        for output in (quick["first"], quick["second"]):
            for text in (f"ExPO demo, {regime} answers: test prompts", f"Choosing alpha ({regime} answers)",
                         f"Stage timings, {regime}"):
                assert text in output, text
    assert "done in" not in quick["second"] and "running ..." not in quick["second"]
    assert f"Report: {quick['out'] / 'report.md'}" in quick["second"]


def figures(out: Path) -> dict:
    """What a demo run in `out` reports, timings and the folder's own path left out: the
    models, the overview and each regime's summary.json and report.md, and each sweep's
    results and summary."""

    def plain(value):
        if isinstance(value, dict):  # input fingerprints cover training_args.bin, which names the folder
            return {k: plain(v) for k, v in value.items() if k not in ("timing", "inputs")}
        return [plain(v) for v in value] if isinstance(value, list) else value

    def read(path: Path):
        text = path.read_text().replace(str(out), "OUT")
        return plain(json.loads(text)) if path.suffix == ".json" else text

    found = {"report.md": read(out / "report.md"), "summary.json": read(out / "summary.json")}
    for regime in REGIMES:
        report = read(out / regime / "report.md")
        found[f"{regime}/report.md"] = report[: report.index("## Stage timings")]
        found[f"{regime}/summary.json"] = read(out / regime / "summary.json")
        for checkpoint in CHECKPOINTS:
            for name in ("results.json", "demo.json"):
                found[f"{regime}/{checkpoint}/{name}"] = read(out / regime / "sweeps" / checkpoint / name)
    found.update({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("**/model.safetensors"))})
    return found


def test_quick_runs_agree_on_any_thread_count(quick, tmp_path):
    """A run on four threads (as on a four-core machine), in one process instead of one per
    regime, with another hash seed, reports what the fixture's run (OMP_NUM_THREADS=1 under
    scripts/test.sh) did, timings aside."""
    out = tmp_path / "demo"
    wide = "import torch; torch.set_num_threads(4); from expo_eval.cli import main; main()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "1", "OMP_NUM_THREADS": "4"}
    result = subprocess.run(
        [sys.executable, "-c", wide, "demo", "--quick", "--workers", "1", "--out", str(out)],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ours, theirs = figures(out), figures(quick["out"])
    assert list(ours) == list(theirs)
    assert sum(name.endswith("model.safetensors") for name in ours) == len(REGIMES) * (3 + len(CHECKPOINTS))
    for name in ours:
        assert ours[name] == theirs[name], name


def test_checked_in_recipe_runs_on_the_demo_models(quick, monkeypatch):
    """recipes/demo_expo.yaml points at the demo's default output folder, out/demo (short answers)."""
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
    from expo_eval.demo.report import Checkpoint, evidence_lines, evidence_rows, goal_met, rule_outcomes
    from expo_eval.demo.rules import TALLIED
    from expo_eval.records import CandidateResult, ScoreStats

    def result(alpha, truth, split="report", kl=None):
        stats = {GT: ScoreStats(mean=truth, median=truth, stderr=0.05)}
        stats.update({rm: ScoreStats(mean=1, median=1, stderr=0.05) for rm in ("a", "b")})
        return CandidateResult(alpha=alpha, label=f"alpha={alpha:g}", split=split, n=100, scores=stats, mean_tokens=10,
                               length_cut_share=0, repetition=0, kl=kl, kl_stderr=0.01).model_dump(mode="json")

    def checkpoint(seed, alphas, truths, kl):
        results = [result(a, t) for a, t in truths.items()] + [result(0.0, truths[0.0], "select", kl)]
        summary = {"checkpoint": "p10", "fraction": 0.1, "seed": seed, "alphas": alphas, "flags": [], "results": results,
                   "theta1_kl": {"mean": kl, "stderr": 0.01}}
        return Checkpoint(summary, ["a", "b"])

    rules = {**dict.fromkeys(TALLIED, 1.0), "reward-max": 8.0, "oracle": 2.0}
    runs = [
        [checkpoint(0, rules, {0.0: 0.3, 1.0: 0.4, 2.0: 0.42, 8.0: -0.8}, 0.12)],  # alpha 1 within noise of 2
        [checkpoint(1, {**rules, "trust-region": 0.0}, {0.0: 0.3, 1.0: 0.5, 2.0: 0.7, 8.0: 0.1}, 0.34)],  # 0 misses
    ]
    outcomes = rule_outcomes(runs)
    assert list(outcomes) == list(TALLIED)
    assert outcomes["reward-max"]["below_alpha_0"] == 2 and outcomes["reward-max"]["within_one_se_of_oracle"] == 0
    assert outcomes["trust-region"]["below_alpha_0"] == 0 and outcomes["trust-region"]["within_one_se_of_oracle"] == 1
    assert outcomes["trust-region"]["misses"] == [
        "seed 1, DPO 10% of an epoch: alpha 0, 0.40 below the oracle's alpha 2 (± 0.07)"
    ]
    assert outcomes["trust-region"]["by_seed"]["0"]["within_one_se_of_oracle"] == 1
    assert outcomes["trust-region"]["by_seed"]["1"]["within_one_se_of_oracle"] == 0
    assert outcomes["trust-region"]["mean_shortfall"] == pytest.approx((0.02 + 0.4) / 2)
    assert not goal_met(outcomes["trust-region"]) and goal_met(outcomes["oracle"])
    assert [row["KL(theta1 || theta0)"] for row in evidence_rows(runs)] == ["0.12 ± 0.01", "0.34 ± 0.01"]
    text = "\n".join(evidence_lines(runs, outcomes))
    assert "The default `trust-region` does not meet the goal here." in text
    assert "| 0 | DPO 10% of an epoch | 0.12 ± 0.01 | 0.30 ± 0.05 | 1: 0.40 ± 0.05 |" in text
    assert "| `reward-max` | 2 of 2 (1, 1) | 0 of 2 (0, 0) | 0.910 (1.220, 0.600) |" in text
    assert "| `trust-region` | 0 of 2 (0, 0) | 1 of 2 (1, 0) | 0.210 (0.020, 0.400) |" in text
    assert "| `kl-bound` | 0 of 2 (0, 0) | 1 of 2 (1, 0) | 0.110 (0.020, 0.200) |" in text
    assert "| `oracle` | 0 of 2 (0, 0) | 2 of 2 (1, 1) | 0.000 (0.000, 0.000) |" in text


def test_further_seeds_have_their_own_folders(tmp_path):
    from expo_eval.demo.pipeline import run_demo, seed_layouts

    assert [l.root for l in seed_layouts(tmp_path, [3, 0, 7])] == [tmp_path, tmp_path / "seeds" / "0", tmp_path / "seeds" / "7"]
    with pytest.raises(ValueError, match="distinct seeds"):
        run_demo(tmp_path, seeds=[1, 1])


def _processes_with(marker: str) -> list:
    """Pids of live processes whose environment holds `marker` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_terminated_demo_takes_its_regime_workers_with_it(tmp_path):
    """SIGTERM to `mergekit-expo demo` (as `kill` or a job scheduler sends) ends both regimes'
    worker processes too, instead of leaving them writing into DIR behind a new run's back."""
    import signal
    import time
    import uuid

    if importlib.util.find_spec("trl") is None:
        pytest.skip("the demo trains with TRL")
    marker = f"EXPO_DEMO_TEST={uuid.uuid4().hex}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", marker.split("=")[0]: marker.split("=")[1]}
    demo = subprocess.Popen([str(BIN / "mergekit-expo"), "demo", "--quick", "--out", str(tmp_path / "demo")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in demo.stdout:  # both workers are up once both regimes have started a stage
        if "[long] [" in line and "running" in line:
            break
    assert len(_processes_with(marker)) >= 3  # the command and its two workers
    demo.send_signal(signal.SIGTERM)
    demo.communicate(timeout=60)
    deadline = time.monotonic() + 20
    while [pid for pid in _processes_with(marker) if pid != demo.pid] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [pid for pid in _processes_with(marker) if pid != demo.pid] == []
