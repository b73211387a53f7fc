"""Scorers: Hugging Face reward models (sequence classifiers, and ArmoRM / InternLM2-reward
style models with their own code) and Python functions."""

import hashlib
import importlib
import inspect
import math
import os
import re
from typing import Callable, List, NamedTuple, Optional, Protocol, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from expo_eval.chat import render_ids
from expo_eval.fingerprint import folder_fingerprint, local_folder
from expo_eval.prompts import Prompt
from mergekit_expo.errors import ExpoError

FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ScorerError(ExpoError, ValueError):
    """A scorer that cannot give one scalar per (prompt, response)."""


class Scorer(Protocol):
    name: str

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> List[float]: ...


def given_scorer_name(scorer) -> str:
    """The name of a scorer object passed to Sweep, or ScorerError: it needs a `name` (str)
    and a `score(prompts, responses)` method."""
    name = getattr(scorer, "name", None)
    if not isinstance(name, str) or not callable(getattr(scorer, "score", None)):
        raise ScorerError(
            f"scorer object {scorer!r} ({type(scorer).__name__}): a scorer object needs a `name` (str) and a "
            "`score(prompts, responses)` method; name a `module:function` scorer in reward_models instead"
        )
    return name


def given_scorer_fingerprint(scorer) -> Optional[str]:
    """A scorer object's `fingerprint` (None: not cached), or ScorerError naming it if reading it raises."""
    try:
        return getattr(scorer, "fingerprint", None)
    except Exception as error:  # a property: the caller's code may raise anything
        raise ScorerError(f"scorer {scorer.name}: reading its `fingerprint` raised {type(error).__name__}: {error}") from None


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


OBJECTIVE = re.compile(r"^(?P<model>.+)#objective=(?P<objective>[^#]+)$")
SEQUENCE_CLASSIFIER = "AutoModelForSequenceClassification"


def split_objective(spec: str) -> Tuple[str, Optional[Union[int, str]]]:
    """`MODEL#objective=K`: the reward model and the output column K (an index, or a label
    of its config's id2label) that scores; a bare MODEL scores with its one reward."""
    match = OBJECTIVE.match(spec)
    if match is None:
        return spec, None
    objective = match["objective"]
    return match["model"], int(objective) if objective.isdigit() else objective


class _RewardModel(NamedTuple):
    path: str
    objective: Optional[int]  # a column of a multi-objective output
    config: object
    tokenizer: object
    auto_class: str  # the transformers Auto class that loads it
    remote: bool  # the model class is the model's own code: its output is known when it runs


def _remote_code(path: str, config_dict: dict) -> List[str]:
    """The code a model brings: what config.json's and tokenizer_config.json's auto_map name."""
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    tokenizer_map = get_tokenizer_config(path).get("auto_map") or {}
    values = [
        *(config_dict.get("auto_map") or {}).values(),
        tokenizer_map if isinstance(tokenizer_map, (list, tuple)) else tokenizer_map.get("AutoTokenizer"),
    ]
    return sorted({ref for value in values for ref in (value if isinstance(value, (list, tuple)) else [value]) if ref})


def _cannot_load(path: str, error: Exception) -> ScorerError:
    where = "no such folder, and not a Hub ID that resolves" if not os.path.exists(path) else str(error).splitlines()[0]
    return ScorerError(f"reward model {path}: cannot be loaded ({where})")


def _open(spec: str, trust_remote_code: bool) -> _RewardModel:
    """Config and tokenizer of a reward model spec, or ScorerError: a model that does not
    resolve, remote code without --trust-remote-code, no chat template, an objective that
    does not exist, a built-in classifier without one scalar and no objective named."""
    from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig

    path, objective = split_objective(spec)
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(path)
        remote_code = _remote_code(path, config_dict)
    except (OSError, ValueError) as error:
        raise _cannot_load(path, error) from None
    if remote_code and not trust_remote_code:
        raise ScorerError(
            f"reward model {path} runs its own code ({', '.join(remote_code)}): pass --trust-remote-code "
            "to run it (it runs with your permissions; read it first)"
        )
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as error:  # ImportError: its code needs a package
        raise _cannot_load(path, error) from None
    if tokenizer.chat_template is None:
        raise ScorerError(f"{path}: the reward model's tokenizer has no chat template")
    if isinstance(objective, str):
        if objective not in config.label2id:
            raise ScorerError(
                f"{spec}: no objective named {objective!r} (its config names {', '.join(map(str, config.label2id))}); "
                f"give a column index instead, e.g. {path}#objective=0"
            )
        objective = config.label2id[objective]
    auto_map = getattr(config, "auto_map", None) or {}
    auto_class = "AutoModel" if "AutoModel" in auto_map and SEQUENCE_CLASSIFIER not in auto_map else SEQUENCE_CLASSIFIER
    remote = auto_class in auto_map
    if not remote and ("AutoConfig" in auto_map or any(key.startswith("AutoModel") for key in auto_map)):
        raise ScorerError(
            f"reward model {path}: its code maps {', '.join(sorted(auto_map))} but no reward model "
            f"({SEQUENCE_CLASSIFIER}, or AutoModel as InternLM2-reward's does)"
        )
    labels = config.num_labels
    if not remote and objective is None and labels != 1:
        raise ScorerError(
            f"{spec}: not a scalar reward model (sequence classifier with {labels} labels; need 1): "
            f"score one label with {path}#objective=K (K in 0..{labels - 1})"
        )
    if not remote and objective is not None and objective >= labels:
        raise ScorerError(f"{spec}: no objective {objective}: the classifier has {labels} labels (0..{labels - 1})")
    return _RewardModel(path, objective, config, tokenizer, auto_class, remote)


def check_scorer(spec: str, trust_remote_code: bool = False) -> None:
    """Raise ScorerError now if `spec` cannot become a scorer: a function that does not
    import, a reward model that does not resolve, needs code it may not run or whose code
    does not import, or (a built-in classifier) cannot give one scalar. What a model's own
    code outputs is known only when it runs: RewardModelScorer checks that on every batch."""
    if FUNCTION_SPEC.match(spec):
        FunctionScorer(spec)
        return
    model = _open(spec, trust_remote_code)
    if model.remote:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        try:  # its modeling file imports (a package it needs, a syntax error); no weights load
            get_class_from_dynamic_module(model.config.auto_map[model.auto_class], model.path)
        except Exception as error:  # the model's own code may raise anything
            first_line = (str(error).splitlines() or [""])[0]
            raise ScorerError(f"reward model {model.path}: its code does not import ({type(error).__name__}: {first_line})") from None
        return
    missing = missing_head_tensors(model.path, model.config)
    if missing:
        raise ScorerError(_missing_head_message(model.path, missing))


def missing_head_tensors(spec: str, config) -> List[str]:
    """Score-head tensors the class expects that the checkpoint lacks (from the files'
    tensor names; nothing is loaded). A causal-LM checkpoint saved with num_labels 1
    would otherwise get a randomly initialized head."""
    from transformers import AutoModelForSequenceClassification

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


def import_scorer_module(spec: str):
    """The module of a `module:function` scorer, or ScorerError naming it and why it does not
    import (not found, a syntax error, or anything its own code raises)."""
    module = spec.partition(":")[0]
    try:
        return importlib.import_module(module)
    except Exception as error:  # the module's own code may raise anything
        first_line = (str(error).splitlines() or [""])[0]
        raise ScorerError(f"scorer {spec}: cannot import module {module} ({type(error).__name__}: {first_line})") from None


def scorer_fingerprint(spec: str) -> str:
    """What a named scorer's scores depend on: a `module:function` scorer's whole module source
    (its helpers and constants too; modules it imports are not followed), a reward model's files
    (`#objective=K` names a column, not files); a Hub ID not downloaded yet by name only."""
    if FUNCTION_SPEC.match(spec):
        module = import_scorer_module(spec)
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):  # a compiled or built-in module
            source = f"{module.__name__} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}"
        return hashlib.sha256(source.encode()).hexdigest()[:24]
    folder = local_folder(split_objective(spec)[0])
    return folder_fingerprint(folder) if folder else f"name:{spec}"


class FunctionScorer:
    """A rule-based reward `module:function(prompt: str, response: str) -> float`."""

    def __init__(self, spec: str):
        attribute = spec.partition(":")[2]
        self.name = spec
        try:
            self.function: Callable[[str, str], float] = getattr(import_scorer_module(spec), attribute)
        except AttributeError as error:
            raise ScorerError(f"scorer {spec}: {error}") from None
        if not callable(self.function):
            raise ScorerError(f"scorer {spec}: {attribute} = {self.function!r:.60} is not a function")
        try:
            signature = inspect.signature(self.function)
        except (TypeError, ValueError):  # some built-ins have none: checked when called
            return
        try:
            signature.bind("prompt", "response")
        except TypeError as error:
            raise ScorerError(
                f"scorer {spec}: {attribute}{signature} cannot be called as {attribute}(prompt, response) ({error})"
            ) from None

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list:
        """The function's values as it returns them (check_scores decides what is a number)."""
        return [self.function(p.text, r) for p, r in zip(prompts, responses)]


class RewardModelScorer:
    """A reward model, read the way RewardBench reads its families: a scalar sequence
    classifier (RM-Mistral-7B, FsfairX-LLaMA3-RM), ArmoRM's `score` (its own code), an
    InternLM2-reward `AutoModel` whose `v_head` reads a reward token appended to the
    conversation (its config's reward_token_id, as its get_score does), or one column
    of a multi-objective output (`MODEL#objective=K`).

    The conversation is rendered with the reward model's own chat template, with
    one BOS (expo_eval.chat).
    """

    def __init__(self, spec: str, device: str = "cpu", batch_size: int = 8, trust_remote_code: bool = False):
        import transformers

        self.name = spec
        self.device = device
        opened = _open(spec, trust_remote_code)
        self.path, self.objective, self.tokenizer = opened.path, opened.objective, opened.tokenizer
        self.model, info = getattr(transformers, opened.auto_class).from_pretrained(
            self.path, dtype="auto", output_loading_info=True, trust_remote_code=trust_remote_code
        )
        head = [key for key in info.get("missing_keys", []) if not key.startswith(self.model.base_model_prefix + ".")]
        if head:
            raise ScorerError(_missing_head_message(self.path, head))
        self.model.to(device).eval()
        self.reward_token_id = getattr(self.model.config, "reward_token_id", None)
        # Without a pad token the classifier cannot find each sequence's last token.
        self.batch_size = batch_size if self.model.config.pad_token_id is not None else 1
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _encode(self, prompt: Prompt, response: str) -> List[int]:
        messages = prompt.messages + [{"role": "assistant", "content": response}]
        ids = render_ids(self.tokenizer, messages, add_generation_prompt=False)
        if self.reward_token_id is not None and ids[-1:] != [self.reward_token_id]:
            ids.append(self.reward_token_id)
        return ids

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> List[float]:
        encoded = [self._encode(p, r) for p, r in zip(prompts, responses)]
        scores: List[float] = []
        for start in tqdm(range(0, len(encoded), self.batch_size), desc=f"scoring ({self.name})", unit="batch", leave=False):
            batch = self.tokenizer.pad(
                {"input_ids": encoded[start : start + self.batch_size]}, return_tensors="pt"
            ).to(self.device)
            output = self.model(**batch)
            scores.extend(self._rewards(output, len(batch["input_ids"])).float().tolist())
        return scores

    def _rewards(self, output, batch: int) -> torch.Tensor:
        """One reward per sequence: `score` (ArmoRM), else `logits` of one label (classifiers,
        InternLM2-reward); with an objective, that column of `rewards` (ArmoRM's objectives) or
        `logits`. Any other output is refused: guessing would score with the wrong number."""
        if self.objective is None:
            field = "score" if getattr(output, "score", None) is not None else "logits"
            values = getattr(output, field, None)
            if isinstance(values, torch.Tensor) and tuple(values.shape) in ((batch,), (batch, 1)):
                return values.reshape(batch)
        else:
            field = "rewards" if getattr(output, "rewards", None) is not None else "logits"
            values = getattr(output, field, None)
            if isinstance(values, torch.Tensor) and values.dim() == 2 and values.shape[0] == batch:
                if self.objective < values.shape[1]:
                    return values[:, self.objective]
                raise ScorerError(
                    f"{self.name}: no objective {self.objective}: its `{field}` has {values.shape[1]} "
                    f"columns (0..{values.shape[1] - 1})"
                )
        if values is None:
            found = f"a {type(output).__name__} without `{field}`"
        elif isinstance(values, torch.Tensor):
            found = f"`{field}` of shape {list(values.shape)}"
        else:
            found = f"`{field}` of type {type(values).__name__}"
        raise ScorerError(
            f"{self.name}: cannot read one reward per response from the model's output ({found}, "
            f"for {batch} responses). Readable: `score` or `logits` of shape [batch] or [batch, 1]; "
            f"or, with {self.path}#objective=K, column K of [batch, N] `rewards` or `logits`"
        )


def load_scorer(spec: str, device: str = "cpu", trust_remote_code: bool = False) -> Scorer:
    """`module:function` for a Python reward, anything else is a reward model (folder or
    Hub ID, with `#objective=K` for one column of a multi-objective output)."""
    if FUNCTION_SPEC.match(spec):
        return FunctionScorer(spec)
    return RewardModelScorer(spec, device=device, trust_remote_code=trust_remote_code)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def reward_model_bytes(specs: Sequence[str]) -> Optional[int]:
    """Bytes of the reward models' weight files (local folders), to size what shares a GPU.

    None when one of them is not a local folder (a Hub ID not known offline).
    """
    total = 0
    for spec in specs:
        if FUNCTION_SPEC.match(spec):
            continue
        path, _ = split_objective(spec)
        if not os.path.isdir(path):
            return None
        total += sum(
            entry.stat().st_size for entry in os.scandir(path) if entry.name.endswith(WEIGHT_SUFFIXES)
        )
    return total
