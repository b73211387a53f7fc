"""Scorers: Hugging Face reward models (scalar sequence classifiers) and Python functions."""

import importlib
import math
import os
import re
from typing import Callable, List, Optional, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from expo_eval.chat import render_ids
from expo_eval.prompts import Prompt

FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ScorerError(ValueError):
    """A scorer that cannot give one scalar per (prompt, response)."""


class Scorer(Protocol):
    name: str

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> List[float]: ...


def check_scores(name: str, values, prompts: Sequence[Prompt]) -> List[float]:
    """The scores as floats, or ScorerError naming the scorer and the first bad prompt:
    NaN, an infinity, None, a string, or a count that does not match."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # numpy array, tensor
        values = values.tolist()
    values = list(values) if isinstance(values, (list, tuple)) else values
    if not isinstance(values, list) or len(values) != len(prompts):
        count = len(values) if isinstance(values, list) else type(values).__name__
        raise ScorerError(f"scorer {name} returned {count} scores for {len(prompts)} responses")
    result = []
    for value, prompt in zip(values, prompts):
        number = value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ScorerError(
                f"scorer {name} gave {value!r} for prompt {prompt.id} ({prompt.text[:60]!r}): "
                "scores must be finite numbers; nothing of this candidate was cached"
            )
        result.append(float(number))
    return result


def check_scorer(spec: str) -> None:
    """Raise ScorerError now if `spec` cannot become a scorer: a function that does not
    import, a reward model that does not resolve or is not a scalar reward model."""
    if FUNCTION_SPEC.match(spec):
        FunctionScorer(spec)
        return
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(spec)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as error:
        where = "no such folder, and not a Hub ID that resolves" if not os.path.exists(spec) else str(error).splitlines()[0]
        raise ScorerError(f"reward model {spec}: cannot be loaded ({where})") from None
    if tokenizer.chat_template is None:
        raise ScorerError(f"{spec}: the reward model's tokenizer has no chat template")
    if getattr(config, "num_labels", None) != 1:
        raise ScorerError(
            f"{spec}: not a scalar reward model (sequence classifier with {config.num_labels} labels; need 1)"
        )
    missing = missing_head_tensors(spec, config)
    if missing:
        raise ScorerError(_missing_head_message(spec, missing))


def missing_head_tensors(spec: str, config) -> List[str]:
    """Score-head tensors the class expects that the checkpoint lacks (from the files'
    tensor names; nothing is loaded). A causal-LM checkpoint saved with num_labels 1
    would otherwise get a randomly initialized head."""
    from transformers import AutoModelForSequenceClassification

    from expo_eval.fingerprint import local_folder

    folder = local_folder(spec)
    if folder is None:
        return []  # checked when it loads (RewardModelScorer)
    names = _checkpoint_tensor_names(folder)
    if names is None:
        return []
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    prefix = model.base_model_prefix
    head = [key for key in model.state_dict() if not key.startswith(prefix + ".")]
    return [key for key in head if key not in names and not any(n.endswith("." + key) for n in names)]


def _checkpoint_tensor_names(folder: str):
    import json as json_module
    import struct

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            return set(json_module.load(handle)["weight_map"])
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        return None  # .bin checkpoints: checked when it loads
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return {key for key in json_module.loads(handle.read(size)) if key != "__metadata__"}


def _missing_head_message(spec: str, missing: Sequence[str]) -> str:
    return (
        f"{spec}: the checkpoint has no trained score head ({', '.join(missing)} missing): "
        "transformers would initialize it randomly. Is this a causal language model rather than a reward model?"
    )


class FunctionScorer:
    """A rule-based reward `module:function(prompt: str, response: str) -> float`."""

    def __init__(self, spec: str):
        module, _, attribute = spec.partition(":")
        self.name = spec
        try:
            self.function: Callable[[str, str], float] = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise ScorerError(f"scorer {spec}: {error}") from None

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list:
        """The function's values as it returns them (check_scores decides what is a number)."""
        return [self.function(p.text, r) for p, r in zip(prompts, responses)]


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
        self.model, info = AutoModelForSequenceClassification.from_pretrained(
            spec, dtype="auto", output_loading_info=True
        )
        head = [key for key in info.get("missing_keys", []) if not key.startswith(self.model.base_model_prefix + ".")]
        if head:
            raise ScorerError(_missing_head_message(spec, head))
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
    if FUNCTION_SPEC.match(spec):
        return FunctionScorer(spec)
    return RewardModelScorer(spec, device=device)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def reward_model_bytes(specs: Sequence[str]) -> Optional[int]:
    """Bytes of the reward models' weight files (local folders), to size what shares a GPU.

    None when one of them is not a local folder (a Hub ID not known offline).
    """
    total = 0
    for spec in specs:
        if FUNCTION_SPEC.match(spec):
            continue
        if not os.path.isdir(spec):
            return None
        total += sum(
            entry.stat().st_size for entry in os.scandir(spec) if entry.name.endswith(WEIGHT_SUFFIXES)
        )
    return total
