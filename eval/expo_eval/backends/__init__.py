"""Generation backends behind one interface (backends.base); `make_backend` builds the configured one.

The backends are imported when asked for: vLLM is an optional extra, and neither
backend module imports this package's names (only backends.base), so there is no cycle.
"""

import logging
from typing import Optional

from expo_eval.backends.base import Backend, BackendError, Completion

LOG = logging.getLogger("expo_eval")

__all__ = ["Backend", "BackendError", "Completion", "make_backend"]


def make_backend(config, recipe_text: str, recipe, *, reward_bytes: Optional[int] = None) -> Backend:
    """The configured backend. `reward_bytes`: what the reward models need on the same
    device while the engine is up (None: they score after it is released)."""
    import torch

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    chat_template = config.chat_template.read_text() if config.chat_template else None
    if config.backend == "vllm":
        from expo_eval.backends.vllm import VLLMBackend, engine_options

        return VLLMBackend(
            recipe_text,
            recipe.models[0].model.model.path,
            chat_template=chat_template,
            trust_remote_code=config.trust_remote_code,
            **engine_options(config.engine, on_gpu=device.startswith("cuda"), reward_bytes=reward_bytes),
        )
    from expo_eval.backends.hf import MaterializedBackend, TransformersBackend
    from expo_eval.candidates import Candidates, merge_options

    candidates = Candidates(recipe, merge_options(config.trust_remote_code))
    if config.materialize:
        return MaterializedBackend(
            candidates,
            models_dir=config.out / "models",
            keep=config.keep_models,
            device=device,
            chat_template=chat_template,
        )
    return TransformersBackend(candidates, device=device, chat_template=chat_template)
