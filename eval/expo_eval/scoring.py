"""Scorers: Hugging Face reward models (scalar sequence classifiers) and Python functions."""

import importlib
import os
import re
from typing import Callable, List, Optional, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from expo_eval.chat import render_ids
from expo_eval.prompts import Prompt

_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ScorerError(ValueError):
    """A scorer that cannot give one scalar per (prompt, response)."""


class Scorer(Protocol):
    name: str

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> List[float]: ...


class FunctionScorer:
    """A rule-based reward `module:function(prompt: str, response: str) -> float`."""

    def __init__(self, spec: str):
        module, _, attribute = spec.partition(":")
        self.name = spec
        self.function: Callable[[str, str], float] = getattr(importlib.import_module(module), attribute)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> List[float]:
        return [float(self.function(p.text, r)) for p, r in zip(prompts, responses)]


class RewardModelScorer:
    """A reward model such as RM-Mistral-7B or FsfairX-LLaMA3-RM: one logit per sequence.

    The conversation is rendered with the reward model's own chat template, with
    one BOS (expo_eval.chat).
    """

    def __init__(self, spec: str, device: str = "cpu", batch_size: int = 8):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = spec
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(spec)
        if self.tokenizer.chat_template is None:
            raise ScorerError(f"{spec}: the reward model's tokenizer has no chat template")
        self.model = AutoModelForSequenceClassification.from_pretrained(spec, dtype="auto")
        if self.model.config.num_labels != 1:
            raise ScorerError(
                f"{spec}: not a scalar reward model (sequence classifier with "
                f"{self.model.config.num_labels} labels; need 1)"
            )
        self.model.to(device).eval()
        # Without a pad token the classifier cannot find each sequence's last token.
        self.batch_size = batch_size if self.model.config.pad_token_id is not None else 1
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _encode(self, prompt: Prompt, response: str) -> List[int]:
        messages = prompt.messages + [{"role": "assistant", "content": response}]
        return render_ids(self.tokenizer, messages, add_generation_prompt=False)

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> List[float]:
        encoded = [self._encode(p, r) for p, r in zip(prompts, responses)]
        scores: List[float] = []
        for start in tqdm(range(0, len(encoded), self.batch_size), desc=f"scoring ({self.name})", unit="batch", leave=False):
            batch = self.tokenizer.pad(
                {"input_ids": encoded[start : start + self.batch_size]}, return_tensors="pt"
            ).to(self.device)
            logits = self.model(**batch).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores


def load_scorer(spec: str, device: str = "cpu") -> Scorer:
    """`module:function` for a Python reward, anything else is a reward model (folder or Hub ID)."""
    if _FUNCTION_SPEC.match(spec):
        return FunctionScorer(spec)
    return RewardModelScorer(spec, device=device)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def reward_model_bytes(specs: Sequence[str]) -> Optional[int]:
    """Bytes of the reward models' weight files (local folders), to size what shares a GPU.

    None when one of them is not a local folder (a Hub ID not known offline).
    """
    total = 0
    for spec in specs:
        if _FUNCTION_SPEC.match(spec):
            continue
        if not os.path.isdir(spec):
            return None
        total += sum(
            entry.stat().st_size for entry in os.scandir(spec) if entry.name.endswith(WEIGHT_SUFFIXES)
        )
    return total
