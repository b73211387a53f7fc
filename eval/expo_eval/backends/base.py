"""What every generation backend gives the sweep, as lm-eval separates models from tasks."""

from typing import List, Optional, Protocol, Sequence

from pydantic import BaseModel

from expo_eval.chat import Messages
from expo_eval.config import SamplingConfig
from expo_eval.records import FinishReason


class BackendError(ValueError):
    """The model, tokenizer or engine cannot be used for chat generation."""


class Completion(BaseModel):
    text: str
    tokens: int  # generated tokens, the final EOS included
    finish_reason: FinishReason


class Backend(Protocol):
    """Holds one loaded model whose weights are swapped per candidate."""

    startup_seconds: float  # building the model or engine, apart from any candidate

    def load_candidate(self, alpha: Optional[float]) -> None:
        """Set the weights to theta1 + alpha * delta, or to theta0 when alpha is None."""

    def generate(self, prompts: Sequence[Messages], sampling: SamplingConfig) -> List[Completion]:
        """Sample one completion per prompt, deterministic for sampling.seed."""

    def close(self) -> None:
        """Release the model (and the engine's processes and GPU memory)."""
