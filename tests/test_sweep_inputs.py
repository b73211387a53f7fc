"""What a sweep is given: held-out prompts that are held out, and prompts rendered in the
format the merged model gets (the recipe's `chat_template:` and tokenizer settings)."""

import json

import pytest
import yaml
from conftest import expo_recipe, merge, write_recipe
from transformers import AutoTokenizer

from expo_eval.backends import BackendError
from expo_eval.chat import render_ids
from expo_eval.config import SweepConfig
from expo_eval.prompts import PromptError, load_prompts
from expo_eval.sweep import Sweep

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "tell me about the cat"}]
LITERAL = (
    "{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def sweep_config(recipe, tmp_path, **extra):
    data = dict(recipe=recipe, out=tmp_path / "out", alphas=[0.5], prompts="smoke", limit=8,
                reward_models=["rewards:word_count"])
    return SweepConfig(**{**data, **extra})


def test_report_prompts_equal_to_the_select_prompts_are_refused(recipe, tmp_path):
    with pytest.raises(PromptError) as error:
        Sweep(sweep_config(recipe, tmp_path, report_prompts="smoke"))
    assert str(error.value).startswith(
        "--report-prompts smoke shares 8 of its 8 prompts with the select prompts (--prompts smoke): "
        "held-out prompts must be disjoint"
    )


def test_report_prompts_sharing_some_conversations_are_refused_with_the_count(recipe, tmp_path):
    """Judged by what the prompts ask: another field name, a messages list or other
    whitespace around the same words is the same prompt."""
    smoke = [p.text for p in load_prompts("smoke")]
    rows = [
        {"instruction": smoke[0]},
        {"messages": [{"role": "user", "content": smoke[1]}, {"role": "assistant", "content": "an answer"}]},
        {"prompt": "  " + smoke[2].replace(" ", "  ") + "\n"},
        {"prompt": "a prompt of its own"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": smoke[3]}]},  # asks more
    ]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(PromptError, match=rf"^--report-prompts {held_out} shares 3 of its 5 prompts with the "
                                          r"select prompts \(--select-prompts smoke\)"):
        Sweep(sweep_config(recipe, tmp_path, select_prompts="smoke", report_prompts=str(held_out), limit=None))
    # the same file as select prompts against --prompts smoke: --prompts is named as the report source
    with pytest.raises(PromptError, match=r"^--prompts smoke shares 3 of its 16 prompts"):
        Sweep(sweep_config(recipe, tmp_path, select_prompts=str(held_out), limit=None))


def test_disjoint_report_prompts_are_accepted(recipe, tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"prompt": "a prompt of its own"}) + "\n")
    sweep = Sweep(sweep_config(recipe, tmp_path, report_prompts=str(held_out)))
    assert len(sweep.splits["select"]) == 8 and len(sweep.splits["report"]) == 1


def test_the_split_is_in_the_generation_key(recipe, tmp_path):
    """Two splits of the same prompts never share a cache entry: its rows record their split."""
    sweep = Sweep(sweep_config(recipe, tmp_path))
    sweep.splits["report"] = list(sweep.splits["select"])
    assert sweep.generation_key(0.5, "select") != sweep.generation_key(0.5, "report")


@pytest.mark.parametrize("template", ["chatml", LITERAL], ids=["named", "literal"])
def test_prompts_are_rendered_with_the_template_the_merge_writes(family, tmp_path, template):
    recipe = expo_recipe(family, chat_template=template)
    merged = AutoTokenizer.from_pretrained(merge(recipe, tmp_path))
    sweep = Sweep(sweep_config(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path))
    tokenizer = sweep.backend.tokenizer
    expected = merged.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == expected
    assert sweep.backend.render(MESSAGES) == render_ids(merged, MESSAGES, add_generation_prompt=True)
    assert sweep.generation_template == merged.chat_template


def test_the_chat_template_flag_overrides_the_recipes(family, tmp_path):
    flag = tmp_path / "template.jinja"
    flag.write_text(LITERAL)
    recipe = write_recipe(tmp_path / "recipe.yaml", expo_recipe(family, chat_template="chatml"))
    sweep = Sweep(sweep_config(recipe, tmp_path, chat_template=flag))
    assert sweep.generation_template == LITERAL == sweep.backend.tokenizer.chat_template
    chatml = Sweep(sweep_config(recipe, tmp_path))
    assert chatml.generation_key(0.5, "select") != sweep.generation_key(0.5, "select")


def test_a_union_of_one_shared_tokenizer_is_the_models_tokenizer(family, tmp_path):
    recipe = expo_recipe(family, tokenizer_source="union", chat_template="alpaca")
    merged = AutoTokenizer.from_pretrained(merge(recipe, tmp_path))
    sweep = Sweep(sweep_config(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path))
    assert sweep.backend.render(MESSAGES) == render_ids(merged, MESSAGES, add_generation_prompt=True)


def test_tokenizer_settings_that_resize_the_vocabulary_are_refused(family, tmp_path):
    recipe = expo_recipe(family, tokenizer={"source": "union", "tokens": {"<|extra|>": {"source": {"kind": "zero"}}}})
    vocabulary = len(AutoTokenizer.from_pretrained(family["sft"]).get_vocab())
    with pytest.raises(BackendError, match=rf"`tokenizer:` gives the merged model a vocabulary of {vocabulary + 1} "
                                           rf"tokens where .* has {vocabulary}: .*drop the tokenizer settings"):
        Sweep(sweep_config(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path))


def test_a_chat_template_mergekit_refuses_is_named(family, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", expo_recipe(family, chat_template="templates/chat.jinja"))
    with pytest.raises(BackendError, match=r"chat_template: 'templates/chat.jinja' is neither a template mergekit "
                                           r"ships \(alpaca, chatml, .*\), `auto`, nor a Jinja template"):
        Sweep(sweep_config(recipe, tmp_path))
