"""The sweep's command line (generated from SweepConfig), its phases and its GPU sharding."""

import json

import pytest
import yaml
from pydantic import BaseModel
from click.testing import CliRunner
from conftest import expo_recipe, run_cli, write_recipe

from expo_eval.cli import build_config
from expo_eval.config import SweepConfig
from expo_eval.shards import gpu_groups, shard_alphas, shard_configs
from expo_eval.sweep import Sweep
from mergekit_expo.cli import main



def flags(**given):
    """Every generated flag unset (None), as click passes them, plus the given ones."""
    from expo_eval.cli import FLAGS

    return {**dict.fromkeys(FLAGS), **given}


def test_every_config_field_has_a_flag():
    """Every leaf of SweepConfig, nested models (optional ones too) included, has a flag."""
    from expo_eval.cli import FLAGS, _unwrap

    leaves = set(FLAGS.values())

    def expected(model, path=()):
        for name, info in model.model_fields.items():
            inner = _unwrap(info.annotation)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                yield from expected(inner, (*path, name))
            else:
                yield (*path, name)

    assert set(expected(SweepConfig)) - {("recipe",)} <= leaves
    assert {("judge", "model"), ("lm_eval", "tasks"), ("search", "low"), ("engine", "kv_cache_gib")} <= leaves


def test_zero_and_false_are_values_and_flags_override_yaml(tmp_path, recipe):
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text(yaml.safe_dump({
        "out": str(tmp_path / "o"), "alphas": [0.3], "reward_models": ["rewards:word_count"],
        "include_sft": True, "limit": 5, "engine": {"enforce_eager": True},
    }))
    config = build_config(recipe, str(config_file), flags(
        include_sft=False, enforce_eager=False, top_k=0, temperature=0.0, presence_penalty=0.0,
    ))
    assert config.include_sft is False and config.engine.enforce_eager is False
    assert (config.sampling.top_k, config.sampling.temperature, config.sampling.presence_penalty) == (0, 0.0, 0.0)
    assert config.limit == 5  # from the YAML, untouched by an unset flag
    with pytest.raises(Exception, match=r"--limit \(limit\)"):
        build_config(recipe, str(config_file), flags(limit=0))  # 0 is a value, and not a valid one


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alphas", "a,b"], "Invalid value for '--alphas'"),
        (["--alphas", "0.1,nan"], "--alphas (alphas): Value error, alpha must be a finite number"),
        (["--search", "0.1"], "Invalid value for '--search'"),
        (["--alphas", "0.1", "--select-fraction", "0"], "--select-fraction (select_fraction)"),
        (["--alphas", "0.1", "--kv-cache-gib", "-1"], "--kv-cache-gib (engine.kv_cache_gib)"),
        (["--alphas", "0.1", "--gpus", "0,1,2", "--tensor-parallel-size", "2", "--device", "cpu"], "do not split into engines"),
        (["--search", "0.1,0.5", "--gpus", "0,1", "--device", "cpu"], "a search is sequential"),
        (["--search", "0.5,0.1"], "needs low < high"),
        (["--search", "nan,0.5"], "finite number"),
        (["--search", "0.1,0.5", "--search-low", "0.2"], "give the search interval once"),
        (["--alphas", "0.1", "--select-with", "nosuch"], "not one of the reward models"),
        (["--alphas", "0.1", "--device", "foo"], "--device (device)"),
        (["--alphas", "0.1", "--chat-template", "/nonexistent"], "--chat-template (chat_template)"),
        (["--alphas", "0.1", "--presence-penalty", "5"], "--presence-penalty (sampling.presence_penalty)"),
        (["--alphas", "0.1", "--gpus", "0,0"], "each GPU once"),
        (["--alphas", "0.1", "--gpus", "a,b"], "GPU ids"),
        (["--alphas", "0.1", "--materialize", "--backend", "vllm"], "materialize writes checkpoints"),
        (["--search", "0.1,0.5", "--generate-only"], "generate_only needs a grid"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_flag(recipe, tmp_path, args, message):
    result = CliRunner().invoke(main, ["sweep", str(recipe), "--out", str(tmp_path / "o"),
                                       "--reward-model", "rewards:word_count", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_gpu_groups_and_round_robin_shards():
    assert gpu_groups(["0", "1", "2", "3"], 2) == [["0", "1"], ["2", "3"]]
    assert shard_alphas([0.0, 0.1, 0.2, 0.3, None], 2) == [[0.0, 0.2, None], [0.1, 0.3]]
    assert shard_alphas([0.1], 4) == [[0.1]]
    with pytest.raises(ValueError):
        gpu_groups(["0", "1", "2"], 2)


def test_shard_configs_carry_the_sft_model_as_include_sft(recipe, tmp_path):
    config = SweepConfig(recipe=recipe, out=tmp_path, alphas=[0.5, 1.0], include_sft=True,
                         reward_models=["rewards:word_count"], gpus=["0", "1"], device="cpu")
    shards = shard_configs(config, [None, 0.0, 0.5, 1.0])
    assert [(group, s.alphas, s.include_sft, s.generate_only, s.gpus) for group, s in shards] == [
        (["0"], [0.5], True, True, None),
        (["1"], [0.0, 1.0], False, True, None),
    ]


def test_sharded_sweep_equals_one_process(recipe, reward_model, tmp_path, monkeypatch):
    """--gpus runs one generate-only process per GPU over a share of the grid; the calling
    sweep finds every generation in the cache and scores: the same results as one process."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path.parent))
    common = ["--alphas", "0.5,2", "--include-sft", "--prompts", "smoke", "--limit", 4, "--max-new-tokens", 6,
              "--reward-model", reward_model, "--device", "cpu"]
    run_cli("mergekit-expo", "sweep", recipe, "--out", tmp_path / "one", *common)
    sharded = run_cli("mergekit-expo", "sweep", recipe, "--out", tmp_path / "two", "--gpus", "0,1", *common)
    chosen = json.loads((tmp_path / "two" / "results.json").read_text())["chosen_alpha"]
    # by the shards: 0, 0.5, 2 and SFT; by the caller: the chosen alpha's held-out prompts, unless 0
    # and the KL samples of 0, 0.5 and 2
    assert f"Generated {7 + (chosen != 0)} sample sets" in sharded.stdout
    shard_logs = sorted((tmp_path / "two" / "shards").glob("shard-*.yaml"))
    assert len(shard_logs) == 2
    assert [yaml.safe_load(p.read_text())["alphas"] for p in shard_logs] == [[0.0, 2.0], [0.5]]

    def candidates(out):
        document = json.loads((out / "results.json").read_text())
        return document["chosen_alpha"], [
            (c["label"], c["split"], c["scores"], c["mean_tokens"]) for c in document["candidates"]
        ]

    assert candidates(tmp_path / "one") == candidates(tmp_path / "two")


class Recorder:
    """A backend stand-in that records the order of events."""

    def __init__(self, events):
        self.events = events

    alpha = None

    def load_candidate(self, alpha):
        self.alpha = alpha
        self.events.append(("load", alpha))

    def generate(self, prompts, sampling):
        from expo_eval.backends import Completion

        self.events.append(("generate",))
        return [Completion(text="good dog", tokens=3, finish_reason="stop", token_ids=[5, 6, 2]) for _ in prompts]

    def response_logprobs(self, prompts, responses):
        self.events.append(("logprobs", self.alpha))
        return [-float(len(ids)) for ids in responses]

    def close(self):
        self.events.append(("close",))


class RecordingScorer:
    name = "rewards:word_count"

    def __init__(self, events):
        self.events = events

    def score(self, prompts, responses):
        self.events.append(("score",))
        return [float(len(r.split())) for r in responses]


def test_grid_generates_everything_then_releases_the_engine_then_scores(recipe, tmp_path, monkeypatch):
    events = []

    def make_backend(*args, **kwargs):
        events.append(("make",))
        return Recorder(events)

    monkeypatch.setattr("expo_eval.backends.make_backend", make_backend)
    config = SweepConfig(recipe=recipe, out=tmp_path / "o", alphas=[0.5, 1.0], prompts="smoke", limit=4,
                         reward_models=["rewards:word_count"])
    Sweep(config, scorers=[RecordingScorer(events)]).run()
    first_score = events.index(("score",))
    assert ("close",) in events[:first_score]
    # each candidate once, then theta0 once for every candidate's KL
    assert [e for e in events[:first_score] if e[0] == "load"] == [("load", 0.0), ("load", 0.5), ("load", 1.0), ("load", None)]
    assert events.count(("make",)) == events.count(("close",))  # every model built is released


def test_generate_only_scores_nothing_and_a_later_run_reuses_it(recipe, tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr("expo_eval.backends.make_backend", lambda *a, **k: Recorder(events))
    base = dict(recipe=recipe, out=tmp_path / "o", alphas=[0.0, 0.5], prompts="smoke", limit=4,
                reward_models=["rewards:word_count"])
    outcome = Sweep(SweepConfig(**base, generate_only=True), scorers=[RecordingScorer(events)]).run()
    assert outcome.chosen is None and ("score",) not in events
    assert outcome.generated == 5  # both alphas on the select prompts and their KL samples, alpha 0 on the report prompts
    assert not (tmp_path / "o" / "results.json").exists()
    events.clear()
    outcome = Sweep(SweepConfig(**base), scorers=[RecordingScorer(events)]).run()
    assert outcome.reused == 5 and outcome.generated <= 1  # at most the chosen alpha's report prompts
    assert outcome.chosen is not None and (tmp_path / "o" / "results.json").exists()


def test_labels_never_collide_and_minus_zero_is_zero(recipe, tmp_path):
    from expo_eval.sweep import label

    assert label(0.1) == "alpha=0.1" and label(2.0) == "alpha=2" and label(None) == "sft"
    assert label(0.1) != label(0.1000001) and label(0.3) != label(0.1 + 0.2)
    config = SweepConfig(recipe=recipe, out=tmp_path, alphas=[-0.0, 0.5], reward_models=["rewards:word_count"])
    assert config.alphas == [0.0, 0.5] and str(config.alphas[0]) == "0.0"


def test_yaml_gpu_indices_may_be_numbers(recipe, tmp_path):
    config = SweepConfig(recipe=recipe, out=tmp_path, alphas=[0.5], reward_models=["rewards:word_count"], gpus=[0, 1], device="cpu")
    assert config.gpus == ["0", "1"]


def test_one_gpu_group_runs_in_a_shard_process_on_those_gpus(recipe, tmp_path, monkeypatch):
    """--gpus 3 is not ignored: the generation runs with CUDA_VISIBLE_DEVICES=3."""
    import expo_eval.shards as shards

    launched = []

    class Done:
        def __init__(self, command, env, stdout, stderr):
            launched.append(env["CUDA_VISIBLE_DEVICES"])

        def wait(self):
            return 0

    monkeypatch.setattr(shards.subprocess, "Popen", Done)
    config = SweepConfig(recipe=recipe, out=tmp_path / "o", alphas=[0.5], reward_models=["rewards:word_count"],
                         gpus=["3"], generate_only=True, prompts="smoke", limit=2, device="cpu")
    monkeypatch.setattr("expo_eval.backends.make_backend", lambda *a, **k: Recorder([]))
    Sweep(config).run()
    assert launched == ["3"]


def test_an_interrupted_sharded_sweep_stops_its_shards(recipe, tmp_path, monkeypatch):
    import expo_eval.shards as shards

    stopped = []

    class Hanging:
        def __init__(self, *args, **kwargs):
            self.done = False

        def wait(self):
            if not self.done:
                raise KeyboardInterrupt
            return -15

        def terminate(self):
            stopped.append(self)
            self.done = True

    monkeypatch.setattr(shards.subprocess, "Popen", Hanging)
    config = SweepConfig(recipe=recipe, out=tmp_path / "o", alphas=[0.5, 1.0], reward_models=["rewards:word_count"],
                         gpus=["0", "1"], device="cpu")
    with pytest.raises(KeyboardInterrupt):
        shards.generate_sharded(config, [0.0, 0.5, 1.0], lock_token=None)
    assert len(stopped) == 2


def test_kl_column_is_zero_for_theta0_itself_and_grows_with_alpha(family, reward_model, tmp_path):
    """KL(candidate || theta0) from the candidates' own samples: 0 when the aligned model is
    theta0, positive and growing with alpha otherwise; in results.csv and a plot."""
    import shutil

    twin = shutil.copytree(family["sft"], tmp_path / "twin")  # theta0's weights as the "aligned" model
    same = write_recipe(tmp_path / "same.yaml", dict(expo_recipe(family), models=[{"model": str(twin)}]))
    from mergekit_expo.tiny import build_family

    far = build_family(str(tmp_path / "far"), aligned=("dpo",), scale=0.5)  # a change a tiny random model feels
    moved = write_recipe(tmp_path / "moved.yaml", dict(expo_recipe(far), dtype="float32"))
    common = dict(alphas=[2.0, 8.0], prompts="smoke", select_fraction=0.75, reward_models=["rewards:word_count"],
                  sampling={"max_new_tokens": 16}, device="cpu")
    flat = Sweep(SweepConfig(recipe=same, out=tmp_path / "same", **common)).run()
    assert all(r.kl == 0.0 for r in flat.results if r.split == "select")
    grows = Sweep(SweepConfig(recipe=moved, out=tmp_path / "moved", **common)).run()
    kl = {r.alpha: (r.kl, r.kl_stderr) for r in grows.results if r.split == "select"}
    # an unbiased estimate from 8 plain samples: alpha 0 (a small KL) may come out a little below zero
    assert kl[0.0][0] > -2 * kl[0.0][1]
    assert kl[0.0][0] < kl[2.0][0] < kl[8.0][0] and kl[8.0][0] > 3 * kl[8.0][1]
    assert "kl" in (tmp_path / "moved" / "results.csv").read_text().splitlines()[0].split(",")
    assert (tmp_path / "moved" / "reward_vs_kl.png").stat().st_size > 0
