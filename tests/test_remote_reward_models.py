"""Reward models that ship their own code (config.json auto_map), read as RewardBench reads
them: ArmoRM's `score` and per-objective `rewards`, InternLM2-reward's AutoModel with its
reward token, one column with `MODEL#objective=K`. Refused without --trust-remote-code, and
on outputs the scorer cannot read. Tiny local models only: the code is written here."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import expo_recipe, run_cli, write_recipe

from expo_eval.cli import sweep
from expo_eval.fingerprint import model_fingerprint
from expo_eval.prompts import load_prompts
from expo_eval.scoring import ScorerError, check_scorer, load_scorer, scorer_fingerprint
from mergekit_expo.tiny import WORDS, build_reward_model, build_tokenizer

GATED = '''
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class GatedOutput(ModelOutput):
    rewards: Optional[torch.FloatTensor] = None
    gating_output: Optional[torch.FloatTensor] = None
    score: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None


class TinyGatedRewardModel(LlamaPreTrainedModel):
    """ArmoRM's output: a reward per objective, mixed by a gate into `score` ([batch])."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.gating = nn.Linear(config.hidden_size, config.num_objectives)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.model(input_ids, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(input_ids)), mask.cumsum(1).argmax(1)]
        rewards = self.regression_layer(last)
        gate = torch.softmax(self.gating(last), dim=1)
        score = (gate * rewards).sum(1)
        return GatedOutput(rewards=rewards, gating_output=gate, score=score, logits=score)
'''

LM_CONFIG = '''
from transformers import LlamaConfig


class TinyLMRewardConfig(LlamaConfig):
    model_type = "tiny_lm_reward"
'''

LM_MODEL = '''
import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from .configuration_tinylm import TinyLMRewardConfig


class TinyLMRewardModel(LlamaPreTrainedModel):
    """InternLM2-reward's: loaded by AutoModel; a v_head read at the reward token, [batch, 1]."""

    config_class = TinyLMRewardConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.reward_token_id = config.reward_token_id
        self.post_init()

    def forward(self, input_ids, attention_mask, **kwargs):
        ends = attention_mask.cumsum(1).argmax(1, keepdim=True)
        if not input_ids.gather(1, ends).eq(self.reward_token_id).all():
            raise ValueError("the last token of every sequence must be the reward token")
        values = self.v_head(self.model(input_ids, attention_mask=attention_mask).last_hidden_state)
        return SequenceClassifierOutputWithPast(logits=values.squeeze(-1).gather(1, ends))

    @torch.no_grad()
    def get_score(self, tokenizer, conversation):
        """As InternLM2-reward's: the conversation in the chat template, then the reward token."""
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([ids, torch.tensor([[self.reward_token_id]])], dim=1)
        return self.forward(input_ids=ids, attention_mask=torch.ones_like(ids))[0].item()
'''

ODD = '''
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast


class TinyOddRewardModel(LlamaPreTrainedModel):
    """Outputs the scorer must not guess at: three labels, per-token values, a tuple."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.head = nn.Linear(config.hidden_size, 3, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        values = self.head(self.model(input_ids, attention_mask=attention_mask).last_hidden_state)
        kind = self.config.output_kind
        if kind == "tuple":
            return (values[:, -1],)
        return SequenceClassifierOutputWithPast(logits=values if kind == "per_token" else values[:, -1])
'''

RESPONSES = ["good dog", "the cat is on a small red house .", "yes"]


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    """transformers copies a model's code into HF_MODULES_CACHE: a private one (subprocesses too)."""
    import transformers.dynamic_module_utils as dynamic

    cache = str(tmp_path_factory.mktemp("hf_modules"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic, "HF_MODULES_CACHE", cache)
        patch.setenv("HF_MODULES_CACHE", cache)
        yield cache


def tiny_llama_dict(tokenizer) -> dict:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ).to_dict()


def remote_model(folder, code: dict, auto_class: str, tokenizer=None, seed=0, **config) -> str:
    """A folder as the Hub holds a remote-code reward model: its .py files, a config.json whose
    auto_map names them, random float32 weights (saved by the class itself), a tokenizer."""
    import transformers

    folder.mkdir(parents=True)
    tokenizer = tokenizer or build_tokenizer()
    for name, source in code.items():
        (folder / name).write_text(source)
    (folder / "config.json").write_text(json.dumps({**tiny_llama_dict(tokenizer), **config}))
    loaded = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(seed)
    model = getattr(transformers, auto_class).from_config(loaded, trust_remote_code=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"]
    return str(folder)


@pytest.fixture(scope="module")
def models(modules_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_rms")
    seq = "AutoModelForSequenceClassification"
    lm_tokenizer = build_tokenizer(WORDS + ["<reward>"])
    paths = {
        "gated": remote_model(  # ArmoRM: a llama config, its own sequence classifier
            root / "gated", {"modeling_gated.py": GATED}, seq, num_objectives=4,
            auto_map={seq: "modeling_gated.TinyGatedRewardModel"},
        ),
        "lm": remote_model(  # InternLM2-reward: its own config class, loaded by AutoModel
            root / "tinylm", {"configuration_tinylm.py": LM_CONFIG, "modeling_tinylm.py": LM_MODEL}, "AutoModel",
            lm_tokenizer, model_type="tiny_lm_reward",
            reward_token_id=lm_tokenizer.convert_tokens_to_ids("<reward>"),
            auto_map={"AutoConfig": "configuration_tinylm.TinyLMRewardConfig", "AutoModel": "modeling_tinylm.TinyLMRewardModel"},
        ),
    }
    for kind in ("columns", "per_token", "tuple"):
        paths[kind] = remote_model(
            root / f"odd_{kind}", {"modeling_odd.py": ODD}, seq, output_kind=kind,
            auto_map={seq: "modeling_odd.TinyOddRewardModel"},
        )
    return paths


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("smoke", limit=len(RESPONSES))


def conversation(prompt, response):
    return prompt.messages + [{"role": "assistant", "content": response}]


def unpadded_outputs(path, auto_class, prompts, append=()):
    """The model's own forward on each rendered conversation alone: no batch, no padding.
    The chat template writes the BOS, so the text is tokenized without special tokens."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = getattr(transformers, auto_class).from_pretrained(path, trust_remote_code=True).eval()
    outputs = []
    for prompt, response in zip(prompts, RESPONSES):
        text = tokenizer.apply_chat_template(conversation(prompt, response), tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] + list(append)])
        with torch.no_grad():
            outputs.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)))
    return outputs


@pytest.mark.parametrize("kind", ["gated", "lm"])
def test_a_model_with_its_own_code_is_refused_without_the_flag(models, kind):
    for refuse in (check_scorer, load_scorer):
        with pytest.raises(ScorerError, match="--trust-remote-code") as error:
            refuse(models[kind])
        assert models[kind] in str(error.value) and "modeling_" in str(error.value)


def test_code_the_scorer_cannot_use_is_refused_before_generating(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["gated"], broken)
    code = broken / "modeling_gated.py"
    code.write_text("import not_a_package_for_expo_tests\n" + code.read_text())
    with pytest.raises(ScorerError, match="its code does not import .*not_a_package_for_expo_tests"):
        check_scorer(str(broken), trust_remote_code=True)

    causal = tmp_path / "causal"
    shutil.copytree(models["gated"], causal)
    config = json.loads((causal / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_gated.TinyGatedRewardModel"}
    (causal / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScorerError, match="maps AutoModelForCausalLM but no reward model"):
        check_scorer(str(causal), trust_remote_code=True)


def test_armorm_style_scores_by_its_gated_score(models, prompts):
    check_scorer(models["gated"], trust_remote_code=True)
    scores = load_scorer(models["gated"], trust_remote_code=True).score(prompts, RESPONSES)
    expected = [o.score.item() for o in unpadded_outputs(models["gated"], "AutoModelForSequenceClassification", prompts)]
    assert scores == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert len(set(scores)) == len(RESPONSES)


def test_internlm2_style_scores_at_its_reward_token(models, prompts):
    import transformers

    check_scorer(models["lm"], trust_remote_code=True)
    scorer = load_scorer(models["lm"], trust_remote_code=True)
    scores = scorer.score(prompts, RESPONSES)  # the model raises unless the reward token ends each sequence
    model = transformers.AutoModel.from_pretrained(models["lm"], trust_remote_code=True).eval()
    expected = [model.get_score(scorer.tokenizer, conversation(p, r)) for p, r in zip(prompts, RESPONSES)]
    assert scores == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert len(set(scores)) == len(RESPONSES)


def test_an_objective_scores_with_its_column(models, prompts):
    gated = load_scorer(f"{models['gated']}#objective=2", trust_remote_code=True).score(prompts, RESPONSES)
    outputs = unpadded_outputs(models["gated"], "AutoModelForSequenceClassification", prompts)
    assert gated == pytest.approx([o.rewards[0, 2].item() for o in outputs], rel=1e-4, abs=1e-6)
    columns = load_scorer(f"{models['columns']}#objective=1", trust_remote_code=True).score(prompts, RESPONSES)
    outputs = unpadded_outputs(models["columns"], "AutoModelForSequenceClassification", prompts)
    assert columns == pytest.approx([o.logits[0, 1].item() for o in outputs], rel=1e-4, abs=1e-6)
    with pytest.raises(ScorerError, match=r"no objective 9: its `rewards` has 4 columns \(0\.\.3\)"):
        load_scorer(f"{models['gated']}#objective=9", trust_remote_code=True).score(prompts, RESPONSES)


def test_a_labelled_classifier_scores_one_label_by_index_or_name(tmp_path, prompts):
    """A built-in classifier (no code of its own) with named labels."""
    rm = build_reward_model(str(tmp_path / "rm"), num_labels=3)
    config_path = tmp_path / "rm" / "config.json"
    names = ["helpful", "honest", "harmless"]
    config = json.loads(config_path.read_text())
    config.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    config_path.write_text(json.dumps(config))

    with pytest.raises(ScorerError, match=r"3 labels; need 1\): score one label with .*#objective=K"):
        check_scorer(rm)
    with pytest.raises(ScorerError, match="no objective 3: the classifier has 3 labels"):
        check_scorer(f"{rm}#objective=3")
    with pytest.raises(ScorerError, match="no objective named 'kind'.*helpful, honest, harmless"):
        check_scorer(f"{rm}#objective=kind")
    check_scorer(f"{rm}#objective=honest")
    by_name = load_scorer(f"{rm}#objective=honest").score(prompts, RESPONSES)
    assert load_scorer(f"{rm}#objective=1").score(prompts, RESPONSES) == by_name
    outputs = unpadded_outputs(rm, "AutoModelForSequenceClassification", prompts)
    assert by_name == pytest.approx([o.logits[0, 1].item() for o in outputs], rel=1e-4, abs=1e-6)


def test_a_plain_classifier_is_scored_as_before(reward_model, prompts):
    plain = load_scorer(reward_model).score(prompts, RESPONSES)
    assert load_scorer(reward_model, trust_remote_code=True).score(prompts, RESPONSES) == plain
    outputs = unpadded_outputs(reward_model, "AutoModelForSequenceClassification", prompts)
    assert plain == pytest.approx([o.logits[0, 0].item() for o in outputs], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "kind, found",
    [
        ("columns", r"`logits` of shape \[3, 3\]"),
        ("per_token", r"`logits` of shape \[3, \d+, 3\]"),
        ("tuple", r"a tuple without `logits`"),
    ],
)
def test_an_output_the_scorer_cannot_read_is_refused(models, prompts, kind, found):
    scorer = load_scorer(models[kind], trust_remote_code=True)
    with pytest.raises(ScorerError, match=found) as error:
        scorer.score(prompts, RESPONSES)
    message = str(error.value)
    assert message.startswith(models[kind]) and f"{models[kind]}#objective=K" in message


def test_the_fingerprint_covers_the_model_code(models, tmp_path):
    """Editing the modeling file must invalidate cached scores; an objective names the same files."""
    folder = tmp_path / "gated"
    shutil.copytree(models["gated"], folder)
    before = model_fingerprint(str(folder))
    assert not before.startswith("name:") and scorer_fingerprint(f"{folder}#objective=2") == before
    code = folder / "modeling_gated.py"
    code.write_text(code.read_text().replace("dim=1)", "dim=1) * 2"))
    assert model_fingerprint(str(folder)) != before


def test_the_sweep_cli_refuses_then_runs_a_remote_code_model(models, family, tmp_path):
    assert "--trust-remote-code" in CliRunner().invoke(sweep, ["--help"]).output
    recipe = write_recipe(tmp_path / "recipe.yaml", expo_recipe(family))
    args = ["mergekit-expo", "sweep", recipe, "--out", tmp_path / "out", "--alphas", "0.5", "--prompts", "smoke",
            "--limit", "4", "--max-new-tokens", "4", "--reward-model", models["gated"]]
    refused = run_cli(*args, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "--trust-remote-code" in refused.stderr and models["gated"] in refused.stderr
    assert not (tmp_path / "out" / "generations").exists()  # refused before generating

    result = run_cli(*args, "--trust-remote-code")
    assert "Chosen alpha" in result.stdout
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(set(c["scores"]) == {models["gated"]} for c in summary["candidates"])
