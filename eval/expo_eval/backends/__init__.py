"""Generation backends behind one interface, as lm-eval separates models from tasks."""

from typing import List, Optional, Protocol, Sequence

from pydantic import BaseModel

from expo_eval.config import SamplingConfig
from expo_eval.records import FinishReason

Messages = List[dict]  # chat messages: [{"role": "user", "content": ...}]


class Completion(BaseModel):
    text: str
    tokens: int
    finish_reason: FinishReason


class Backend(Protocol):
    """Holds one loaded model whose weights are swapped per candidate."""

    def load_candidate(self, alpha: Optional[float]) -> None:
        """Set the weights to theta1 + alpha * delta, or to theta0 when alpha is None."""

    def generate(
        self, prompts: Sequence[Messages], sampling: SamplingConfig
    ) -> List[Completion]:
        """Sample one completion per prompt, deterministic for sampling.seed."""

    def close(self) -> None: ...


def make_backend(config, recipe_text: str, recipe) -> Backend:
    """The configured backend; vLLM only when asked for (optional extra).

    vLLM workers build their own candidates, so the driver loads no weights then.
    """
    device = config.device or ("cuda" if _cuda() else "cpu")
    chat_template = config.chat_template.read_text() if config.chat_template else None
    if config.backend == "vllm":
        from expo_eval.backends.vllm import VLLMBackend

        return VLLMBackend(
            recipe_text,
            recipe.models[0].model.model.path,
            tensor_parallel_size=config.tensor_parallel_size,
            chat_template=chat_template,
        )
    from expo_eval.backends.hf import MaterializedBackend, TransformersBackend
    from expo_eval.candidates import Candidates

    candidates = Candidates(recipe)
    if config.materialize:
        return MaterializedBackend(
            candidates,
            models_dir=config.out / "models",
            keep=config.keep_models,
            device=device,
            chat_template=chat_template,
        )
    return TransformersBackend(candidates, device=device, chat_template=chat_template)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
