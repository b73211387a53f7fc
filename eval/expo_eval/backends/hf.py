"""The transformers backend: one loaded model, weights swapped in place per candidate."""

import shutil
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from expo_eval.backends.base import BackendError, Completion, check_context
from expo_eval.candidates import Candidates, merge_options, return_freed_memory
from expo_eval.chat import Messages, render_ids, response_text
from expo_eval.config import SamplingConfig
from mergekit_expo.merged_tokenizer import merged_tokenizer, merged_vocab_size


class PresenceFrequencyPenalty(LogitsProcessor):
    """vLLM's presence and frequency penalties, over generated tokens only.

    transformers has no such processor (its repetition penalty is multiplicative
    and counts the prompt too).
    """

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length = prompt_length
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class FiniteLogits(LogitsProcessor):
    """Stop on NaN or +inf logits, naming the candidate. Its weights passed the merge's checks,
    so its activations overflow their dtype (float16 at a large alpha, say): it has no
    distribution to sample, and transformers would fail inside torch.multinomial (or greedy
    decoding pick token 0). -inf is a masked token, not a failure."""

    def __init__(self, candidate: str, dtype: torch.dtype):
        self.candidate, self.dtype = candidate, str(dtype).removeprefix("torch.")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if bool(torch.isnan(scores).any() or torch.isposinf(scores).any()):
            raise BackendError(
                f"{self.candidate}: the model's logits are NaN or infinite (its {self.dtype} activations "
                "overflow), so it cannot generate: leave this alpha out, or sweep a wider dtype "
                "(out_dtype: float32 in the recipe)"
            )
        return scores


def sampling_processors(prompt_length: int, sampling: SamplingConfig) -> LogitsProcessorList:
    """Penalties, then temperature, top-k and top-p: vLLM's order."""
    processors = [
        PresenceFrequencyPenalty(prompt_length, sampling.presence_penalty, sampling.frequency_penalty)
    ]
    if sampling.temperature > 0:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        processors.append(TopPLogitsWarper(sampling.top_p))
    return LogitsProcessorList(processors)


def load_tokenizer(recipe, chat_template: Optional[str] = None, options=None):
    """The tokenizer the merged model gets (mergekit_expo.merged_tokenizer: the recipe's
    tokenizer settings and `chat_template:`), so alpha is chosen on the prompt format the
    merge writes; `chat_template` (--chat-template's text) overrides its template.

    Refuses tokenizer settings that resize the embeddings: the sweep fills the candidates
    into a model of the aligned model's shape. `options`: mergekit's MergeOptions the
    sweep loads the models with (trust_remote_code).
    """
    options = options or merge_options()
    try:
        tokenizer = merged_tokenizer(recipe, options)
    except ValueError as error:
        raise BackendError(str(error)) from None
    rows = merged_vocab_size(recipe, tokenizer)
    model = recipe.models[0].model
    model_rows = getattr(model.config(trust_remote_code=options.trust_remote_code), "vocab_size", None)
    if rows is not None and model_rows is not None and rows != model_rows:
        setting = "tokenizer:" if recipe.tokenizer is not None else f"tokenizer_source: {recipe.tokenizer_source}"
        raise BackendError(
            f"the recipe's `{setting}` gives the merged model a vocabulary of {rows} tokens where "
            f"{model} has {model_rows}: the sweep generates with the models' own embeddings and "
            "cannot reproduce that merge; drop the tokenizer settings from the recipe when the "
            "models share one tokenizer, or merge the tokenizers into the models first and sweep those"
        )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise BackendError(
            f"{tokenizer.name_or_path}: the tokenizer the merge writes has no chat template; set "
            "`chat_template:` in the recipe (e.g. chatml) or pass one with --chat-template FILE"
        )
    # padding_side is not saved with a tokenizer, and right padding ruins batched generation.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_chat_template(tokenizer, messages: Messages, source: str) -> None:
    """Render one prompt now, so a template that cannot render it (bad Jinja, its own
    raise_exception, an undefined name) is refused naming `source`, before any generation."""
    try:
        render_ids(tokenizer, messages, add_generation_prompt=True)
    except Exception as error:  # jinja2's errors, and anything the template's code raises
        first_line = (str(error).splitlines() or [""])[0]
        raise BackendError(f"{source}: cannot render a prompt ({type(error).__name__}: {first_line})") from None


class TransformersBackend:
    """Loads the aligned model once; each candidate overwrites its weights in place."""

    def __init__(
        self,
        candidates: Candidates,
        device: str = "cpu",
        chat_template: Optional[str] = None,
    ):
        self.candidates = candidates
        self.device = device
        self.alpha: Optional[float] = 0.0  # the aligned model as loaded is the alpha-0 candidate
        path = candidates.aligned_models[0].model.path
        started = time.perf_counter()
        self.tokenizer = load_tokenizer(candidates.recipe, chat_template, candidates.options)
        self.model = self._load_model(path)
        self.startup_seconds = time.perf_counter() - started

    def _load_model(self, path: str):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=self.candidates.dtype, trust_remote_code=self.candidates.options.trust_remote_code
        )
        return model.to(self.device).eval()

    @torch.no_grad()
    def load_candidate(self, alpha: Optional[float]) -> None:
        """Overwrite the weights chunk by chunk: no tensor-sized temporary."""
        try:
            self.candidates.fill(alpha, self.model.state_dict(keep_vars=True))
        except KeyError as error:
            raise BackendError(f"the recipe produces tensor {error.args[0]}, which the model lacks") from None
        self.alpha = alpha
        return_freed_memory()

    def render(self, messages: Messages) -> List[int]:
        return render_ids(self.tokenizer, messages, add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Messages], sampling: SamplingConfig) -> List[Completion]:
        # Re-seeded per call: every candidate sees the same random stream.
        generator_seed = sampling.seed
        eos = self.tokenizer.eos_token_id
        config = GenerationConfig(
            do_sample=sampling.temperature > 0,
            max_new_tokens=sampling.max_new_tokens,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        completions: List[Completion] = []
        rendered = [self.render(m) for m in prompts]
        check_context(rendered, getattr(self.model.config, "max_position_embeddings", None), sampling.max_new_tokens, prompts)
        for start in tqdm(range(0, len(prompts), sampling.batch_size), desc="generating", unit="batch", leave=False):
            torch.manual_seed(generator_seed + start)
            encoded = rendered[start : start + sampling.batch_size]
            batch = self.tokenizer.pad({"input_ids": encoded}, return_tensors="pt").to(self.device)
            length = batch["input_ids"].shape[1]
            output = self.model.generate(
                **batch,
                generation_config=config,
                logits_processor=LogitsProcessorList(
                    [FiniteLogits(self._candidate(), self.model.dtype), *sampling_processors(length, sampling)]
                ),
            )
            for row in output[:, length:].tolist():
                completions.append(self._completion(row, eos))
        return completions

    def _candidate(self) -> str:
        return "the SFT model" if self.alpha is None else f"alpha={self.alpha:g}"

    @torch.no_grad()
    def response_logprobs(
        self, prompts: Sequence[Messages], responses: Sequence[Sequence[int]], batch_size: int = 8
    ) -> List[float]:
        """log p(response | prompt) under the loaded weights, summed over the response's
        sampled tokens (EOS included when it stopped): the model's own distribution, before
        any temperature, top-k/p or penalty."""
        pairs = [(self.render(m), list(ids)) for m, ids in zip(prompts, responses)]
        totals: List[float] = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = self.tokenizer.pad({"input_ids": [p + r for p, r in chunk]}, return_tensors="pt").to(self.device)
            mask = batch["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding must not shift positions
            logits = self.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            taken = logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
            for row, (_, response) in enumerate(chunk):
                totals.append(float(taken[row, taken.shape[1] - len(response) :].sum()) if response else 0.0)
        return totals

    def _completion(self, row: List[int], eos: int) -> Completion:
        if eos in row:
            ids = row[: row.index(eos) + 1]
            return Completion(text=response_text(self.tokenizer, ids, [eos]), tokens=len(ids), finish_reason="stop",
                              token_ids=ids)
        return Completion(text=response_text(self.tokenizer, row, []), tokens=len(row), finish_reason="length",
                          token_ids=list(row))

    def close(self) -> None:
        self.model = None


class MaterializedBackend(TransformersBackend):
    """The paper's loop: write each candidate with the real mergekit merge, then load it."""

    def __init__(self, candidates: Candidates, models_dir: Path, keep: bool, **kwargs):
        self.models_dir = models_dir
        self.keep = keep
        super().__init__(candidates, **kwargs)

    def load_candidate(self, alpha: Optional[float]) -> None:
        import mergekit.merge

        self.alpha = alpha
        if alpha is None:
            self.model = self._load_model(self.candidates.recipe.base_model.model.path)
            return
        recipe = self.candidates.recipe.model_copy(
            update={"parameters": {**(self.candidates.recipe.parameters or {}), "alpha": alpha}}
        )
        out = self.models_dir / f"alpha={alpha:g}"
        mergekit.merge.run_merge(recipe, str(out), options=self.candidates.options)
        self.model = self._load_model(str(out))
        if not self.keep:
            shutil.rmtree(out)
