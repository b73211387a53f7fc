"""What every generation backend gives the sweep, as lm-eval separates models from tasks."""

import logging
from typing import List, Optional, Protocol, Sequence

from pydantic import BaseModel, Field

from expo_eval.chat import Messages
from expo_eval.config import SamplingConfig
from expo_eval.records import FinishReason
from mergekit_expo.errors import ExpoError


class BackendError(ExpoError, ValueError):
    """The model, tokenizer or engine cannot be used for chat generation."""


class Completion(BaseModel):
    text: str
    tokens: int  # generated tokens, the final EOS included
    finish_reason: FinishReason
    token_ids: List[int] = Field(default_factory=list)  # as sampled, the final EOS included


class Backend(Protocol):
    """Holds one loaded model whose weights are swapped per candidate."""

    startup_seconds: float  # building the model or engine, apart from any candidate

    def load_candidate(self, alpha: Optional[float]) -> None:
        """Set the weights to theta1 + alpha * delta, or to theta0 when alpha is None."""

    def generate(self, prompts: Sequence[Messages], sampling: SamplingConfig) -> List[Completion]:
        """Sample one completion per prompt, deterministic for sampling.seed."""

    def response_logprobs(self, prompts: Sequence[Messages], responses: Sequence[Sequence[int]]) -> List[float]:
        """log p(response | prompt) under the loaded weights, per response given as the token
        ids sampled (not its text again: decoding and re-encoding need not give them back)."""

    def close(self) -> None:
        """Release the model (and the engine's processes and GPU memory)."""


def check_context(
    prompt_ids: Sequence[List[int]], context: Optional[int], max_new_tokens: int, prompts: Sequence[Messages] = ()
) -> None:
    """A prompt that does not fit the model's context is refused (never silently cut);
    one that leaves less room than max_new_tokens gets a warning (its response is capped)."""
    if not context:
        return
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) >= context]
    if too_long:
        first = too_long[0]
        text = prompts[first][-1]["content"][:60] if len(prompts) > first else ""
        raise BackendError(
            f"{len(too_long)} prompt(s) do not fit the model's context of {context} tokens "
            f"(the first, {text!r}..., has {len(prompt_ids[first])}): shorten or drop them"
        )
    capped = sum(len(ids) + max_new_tokens > context for ids in prompt_ids)
    if capped:
        logging.getLogger("expo_eval").warning(
            "%d prompt(s) leave less than max_new_tokens=%d of the %d-token context: their responses are capped",
            capped, max_new_tokens, context,
        )
