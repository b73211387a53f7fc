"""Prompt sets: JSONL files, Hugging Face datasets, and the paper's two built-in sets."""

import hashlib
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from pydantic import BaseModel

from mergekit_expo.errors import ExpoError

SMOKE = Path(__file__).parent / "data" / "smoke_prompts.jsonl"
# The paper picks alpha on UltraFeedback's 1K held-out instructions and reports AlpacaEval 2.0.
ULTRAFEEDBACK = ("HuggingFaceH4/ultrafeedback_binarized", "test_gen")
ALPACA_EVAL = ("tatsu-lab/alpaca_eval", "alpaca_eval.json")


class PromptError(ExpoError, ValueError):
    """A prompt source gave no usable prompts, or held-out prompts that are select prompts."""


class Prompt(BaseModel):
    id: str
    messages: List[Dict[str, str]]

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def make_prompt(messages: List[Dict[str, str]]) -> Prompt:
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    return Prompt(id=digest[:16], messages=messages)


def _from_row(row: dict) -> Optional[Prompt]:
    if isinstance(row.get("messages"), list) and row["messages"]:
        users = [m for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user" and m.get("content")]
        if users and not isinstance(users[0]["content"], str):
            raise ValueError(
                f"a message's content must be a string, got {type(users[0]['content']).__name__} "
                "(multi-part content is not supported)"
            )
        # Dataset conversations end with the reference answer: keep the first user turn,
        # and a system turn before it.
        if not users:
            return None
        first = row["messages"][0]
        system = (
            [{"role": "system", "content": first["content"]}]
            if isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), str)
            else []
        )
        return make_prompt(system + [{"role": "user", "content": users[0]["content"]}])
    for field in ("prompt", "instruction"):
        if isinstance(row.get(field), str) and row[field].strip():
            return make_prompt([{"role": "user", "content": row[field]}])
    return None


def load_prompts(spec: str, limit: Optional[int] = None) -> List[Prompt]:
    """`smoke`, `ultrafeedback`, `alpaca_eval`, a JSONL file, or `hf:NAME[:SPLIT]`."""
    try:
        rows = list(_rows(spec))
    except PromptError:
        raise
    except Exception as error:  # the Hub unreachable, a dataset that does not exist ...
        raise PromptError(f"{spec}: cannot load the prompts ({type(error).__name__}: {error})") from None
    prompts, seen, skipped = [], set(), []
    for number, row in rows:
        try:
            prompt = _from_row(row) if isinstance(row, dict) else None
        except ValueError as error:
            raise PromptError(f"{spec}:{number}: {error}") from None
        if prompt is None:
            skipped.append(number)
        elif prompt.id not in seen:
            seen.add(prompt.id)
            prompts.append(prompt)
    if not prompts:
        raise PromptError(
            f"{spec}: no usable prompts in {len(rows)} rows (need a non-empty `prompt` "
            "or `instruction` string, or a `messages` list with a user turn)"
        )
    if skipped:
        logging.getLogger("expo_eval").warning(
            "%s: skipped %d row(s) without a usable prompt (rows %s)", spec, len(skipped),
            ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else ""),
        )
    return prompts[:limit] if limit else prompts


def _rows(spec: str):
    """(line or row number, row) of a prompt source."""
    if spec == "smoke":
        spec = str(SMOKE)
    if spec == "ultrafeedback":
        spec = "hf:{}:{}".format(*ULTRAFEEDBACK)
    if spec == "alpaca_eval":
        # Its loading script fails on datasets >= 4, so fetch the JSON file itself.
        from huggingface_hub import hf_hub_download

        repo, filename = ALPACA_EVAL
        with open(hf_hub_download(repo, filename, repo_type="dataset")) as handle:
            yield from enumerate(json.load(handle), 1)
        return
    if spec.startswith("hf:"):
        import datasets

        name, _, split = spec[3:].partition(":")
        yield from enumerate(datasets.load_dataset(name, split=split or "train"), 1)
        return
    path = Path(spec)
    if not path.is_file():
        raise PromptError(f"{spec}: no such prompt file or built-in set (smoke, ultrafeedback, alpaca_eval)")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise PromptError(f"{spec}:{number}: not UTF-8 text ({error})") from None
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise PromptError(f"{spec}:{number}: not JSON ({error})") from None


def _conversation(prompt: Prompt) -> str:
    """What a prompt asks, whatever its id: each turn's role and its words (runs of
    whitespace, leading and trailing ones too, do not make another prompt)."""
    return json.dumps([(m.get("role"), " ".join(str(m.get("content", "")).split())) for m in prompt.messages])


def shared_prompts(these: List[Prompt], those: List[Prompt]) -> int:
    """How many of `these` ask what one of `those` asks (the same conversation)."""
    asked = {_conversation(p) for p in those}
    return sum(_conversation(p) in asked for p in these)


def split_prompts(prompts: List[Prompt], fraction: float) -> Tuple[List[Prompt], List[Prompt]]:
    """Deterministic select/report split by prompt hash, so it survives reordering. Prompts that
    ask the same (shared_prompts' sense: only whitespace differs) stay on one side: held out."""
    asking: Dict[str, List[Prompt]] = {}
    for prompt in sorted(prompts, key=lambda p: p.id):
        asking.setdefault(_conversation(prompt), []).append(prompt)
    ranked = list(asking.values())  # by each one's first id: without variants, the ids' order
    cut = max(1, min(len(ranked) - 1, round(fraction * len(ranked))))
    select, report = ([p for group in groups for p in group] for groups in (ranked[:cut], ranked[cut:]))
    return sorted(select, key=lambda p: p.id), sorted(report, key=lambda p: p.id)
