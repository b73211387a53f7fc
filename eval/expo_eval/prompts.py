"""Prompt sets: JSONL files, Hugging Face datasets, and the paper's two built-in sets."""

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from pydantic import BaseModel

SMOKE = Path(__file__).parent / "data" / "smoke_prompts.jsonl"
# The paper picks alpha on UltraFeedback's 1K held-out instructions and reports AlpacaEval 2.0.
ULTRAFEEDBACK = ("HuggingFaceH4/ultrafeedback_binarized", "test_gen")
ALPACA_EVAL = ("tatsu-lab/alpaca_eval", "alpaca_eval.json")


class PromptError(ValueError):
    """A prompt source gave no usable prompts."""


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
        users = [m for m in row["messages"] if m.get("role") == "user" and m.get("content")]
        # Dataset conversations end with the reference answer: keep the first user turn.
        return make_prompt([{"role": "user", "content": users[0]["content"]}]) if users else None
    for field in ("prompt", "instruction"):
        if isinstance(row.get(field), str) and row[field].strip():
            return make_prompt([{"role": "user", "content": row[field]}])
    return None


def load_prompts(spec: str, limit: Optional[int] = None) -> List[Prompt]:
    """`smoke`, `ultrafeedback`, `alpaca_eval`, a JSONL file, or `hf:NAME[:SPLIT]`."""
    rows = list(_rows(spec))
    prompts, seen = [], set()
    for row in rows:
        prompt = _from_row(row) if isinstance(row, dict) else None
        if prompt is not None and prompt.id not in seen:
            seen.add(prompt.id)
            prompts.append(prompt)
    if not prompts:
        raise PromptError(
            f"{spec}: no usable prompts in {len(rows)} rows (need a non-empty `prompt` "
            "or `instruction` string, or a `messages` list with a user turn)"
        )
    return prompts[:limit] if limit else prompts


def _rows(spec: str):
    if spec == "smoke":
        spec = str(SMOKE)
    if spec == "ultrafeedback":
        spec = "hf:{}:{}".format(*ULTRAFEEDBACK)
    if spec == "alpaca_eval":
        # Its loading script fails on datasets >= 4, so fetch the JSON file itself.
        from huggingface_hub import hf_hub_download

        repo, filename = ALPACA_EVAL
        with open(hf_hub_download(repo, filename, repo_type="dataset")) as handle:
            yield from json.load(handle)
        return
    if spec.startswith("hf:"):
        import datasets

        name, _, split = spec[3:].partition(":")
        yield from datasets.load_dataset(name, split=split or "train")
        return
    path = Path(spec)
    if not path.is_file():
        raise PromptError(f"{spec}: no such prompt file or built-in set (smoke, ultrafeedback, alpaca_eval)")
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise PromptError(f"{spec}:{number}: not JSON ({error})") from None


def split_prompts(prompts: List[Prompt], fraction: float) -> Tuple[List[Prompt], List[Prompt]]:
    """Deterministic select/report split by prompt hash, so it survives reordering."""
    ranked = sorted(prompts, key=lambda p: p.id)
    cut = max(1, min(len(ranked) - 1, round(fraction * len(ranked))))
    return ranked[:cut], ranked[cut:]
