"""Optional vLLM backend: one engine for the whole sweep, weights swapped inside its workers.

Only vLLM's public API is used: `LLM(worker_extension_cls=...)` adds our methods to
every worker, `LLM.collective_rpc` calls them by name. That works under vLLM's default
multiprocessing executor and with tensor parallelism, where the driver process has no
model to reach into. vLLM itself is imported lazily: `pip install 'mergekit-expo[vllm]'`.
"""

import gc
import inspect
import os
import subprocess
from typing import Any, Callable, List, Optional, Sequence

import torch
from mergekit.options import MergeOptions

from expo_eval.backends import Completion, Messages
from expo_eval.candidates import Candidates, load_recipe
from expo_eval.config import SamplingConfig
from mergekit_expo.registration import output_dtype

WORKER_EXTENSION = f"{__name__}.ExpoWorkerExtension"
# vLLM's "consider every token"; top_k = 0 is how SamplingConfig (and transformers) say it.
VLLM_TOP_K_DISABLED = -1


def _vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "the vllm backend needs vLLM on a GPU machine: pip install 'mergekit-expo[vllm]'"
        ) from error
    return vllm


def sampling_params_kwargs(sampling: SamplingConfig) -> dict:
    """`vllm.SamplingParams` arguments for the sweep's sampling settings.

    The per-request seed makes each prompt's sample independent of what else is in
    the batch, and gives every alpha the same random stream. `batch_size` does not
    apply: vLLM schedules its own batches.
    """
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k or VLLM_TOP_K_DISABLED,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "max_tokens": sampling.max_new_tokens,
        "seed": sampling.seed,
    }


def render_prompt(tokenizer, messages: Messages, chat_template: Optional[str] = None) -> dict:
    """A chat prompt as a vLLM token prompt, with exactly one BOS token.

    Many chat templates write the BOS token themselves; vLLM tokenizing that text
    with special tokens would start the prompt with two. Templates that do not
    (zephyr's) still get the tokenizer's own BOS.
    """
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=chat_template
    )
    has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    return {"prompt_token_ids": tokenizer(text, add_special_tokens=not has_bos)["input_ids"]}


def engine_dtype(recipe_text: str, dtype: str = "auto") -> str:
    """The dtype for vLLM: `dtype` when given, else the one mergekit-yaml would write.

    vLLM's own "auto" takes the checkpoint's dtype: a recipe that writes float32 to keep
    alpha * delta (DESIGN.md section 5) would be measured rounded back to bfloat16.
    """
    if dtype != "auto":
        return dtype
    return output_dtype(load_recipe(recipe_text), MergeOptions()) or "auto"


def completion(output) -> Completion:
    """The sweep's record of the single sample in a `vllm.RequestOutput`."""
    sample = output.outputs[0]
    if sample.finish_reason not in ("stop", "length"):
        raise RuntimeError(
            f"vLLM request {output.request_id} ended with {sample.finish_reason!r}, not stop/length"
        )
    return Completion(
        text=sample.text, tokens=len(sample.token_ids), finish_reason=sample.finish_reason
    )


def _takes_weights(reload_weights) -> bool:
    """Whether the runner's `reload_weights` accepts tensors; before that it reread the disk."""
    return (
        reload_weights is not None
        and "weights_iterator" in inspect.signature(reload_weights).parameters
    )


class ExpoWorkerExtension:
    """Mixed into every vLLM worker through `worker_extension_cls`.

    Only the recipe text and alpha cross the process boundary: each worker builds
    the candidates itself, once, and keeps theta0 and theta1 in host memory for the
    sweep (one copy per worker, so tensor parallelism multiplies host memory).
    Methods carry an `expo_` prefix so they can never shadow the worker's own.
    """

    def expo_load_candidate(self, recipe_text: str, alpha: Optional[float]) -> int:
        """Load theta1 + alpha * delta (theta0 when alpha is None); returns the tensor count."""
        device = self._expo_device()
        loaded = 0

        def weights():
            nonlocal loaded
            for name, tensor in self._expo_candidates(recipe_text).weights(alpha):
                loaded += 1
                yield name, tensor.to(device)

        runner = self.model_runner
        if _takes_weights(getattr(runner, "reload_weights", None)):
            runner.reload_weights(weights_iterator=weights())
        else:
            runner.model.load_weights(weights=weights())
        return loaded

    def _expo_candidates(self, recipe_text: str) -> Candidates:
        cached = getattr(self, "_expo_cached", None)
        if cached is None or cached[0] != recipe_text:
            self._expo_cached = None  # let the old inputs go before loading new ones
            self._expo_cached = (recipe_text, Candidates(load_recipe(recipe_text)))
        return self._expo_cached[1]

    def _expo_device(self) -> torch.device:
        device = getattr(self, "device", None)
        return device if device is not None else next(self.model_runner.model.parameters()).device


class VLLMBackend:
    """One `vllm.LLM` for the whole sweep; each candidate is a weight swap in its workers.

    model_path gives the architecture, tokenizer and starting weights (the aligned
    model will do); dtype "auto" means the recipe's output dtype. `llm_options` go
    to `vllm.LLM` as they are (gpu_memory_utilization, max_model_len, enforce_eager).
    """

    def __init__(
        self,
        recipe_text: str,
        model_path: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        chat_template: Optional[str] = None,
        **llm_options: Any,
    ):
        vllm = _vllm()
        self.recipe_text = recipe_text
        self.chat_template = chat_template
        self.llm = vllm.LLM(
            model=model_path,
            tensor_parallel_size=tensor_parallel_size,
            dtype=engine_dtype(recipe_text, dtype),
            worker_extension_cls=WORKER_EXTENSION,
            **llm_options,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def load_candidate(self, alpha: Optional[float]) -> None:
        counts = self.llm.collective_rpc("expo_load_candidate", args=(self.recipe_text, alpha))
        if not counts or not counts[0] or len(set(counts)) != 1:
            raise RuntimeError(f"vLLM workers loaded {counts} tensors for alpha={alpha}")
        # Prefix caching is on by default: without a reset, prompts already seen would
        # reuse KV blocks computed with the previous candidate's weights.
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM could not reset its prefix cache after a weight swap")

    def generate(self, prompts: Sequence[Messages], sampling: SamplingConfig) -> List[Completion]:
        params = _vllm().SamplingParams(**sampling_params_kwargs(sampling))
        requests = [
            render_prompt(self.tokenizer, messages, self.chat_template) for messages in prompts
        ]
        return [
            completion(output) for output in self.llm.generate(requests, params, use_tqdm=False)
        ]

    def close(self) -> None:
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def shard_alphas(alphas: List[float], num_gpus: int) -> List[List[float]]:
    """The alpha grid dealt round-robin to `num_gpus` processes; empty shards are dropped.

    Several GPUs run several sweeps, one engine per GPU, rather than one engine with
    tensor parallelism when the model fits on one GPU. Round robin, not contiguous
    blocks: large alphas are the slow ones (collapsed responses run to the length
    limit), and blocks would give them all to one GPU. A search is sequential and
    is not sharded.
    """
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, got {num_gpus}")
    shards = [alphas[i::num_gpus] for i in range(num_gpus)]
    return [shard for shard in shards if shard]


def run_sharded(
    command: Callable[[List[float]], Sequence[str]], alphas: List[float], gpus: Sequence[str]
) -> None:
    """Run `command(shard)` for each shard at once, each process seeing only its GPU.

    `command` builds the argv of one grid sweep over the given alphas (the sweep CLI
    with that shard's alphas and a shared output folder). The shards only generate and
    score; a final run over the whole grid reuses what they cached and writes the report.
    """
    shards = shard_alphas(alphas, len(gpus))
    processes = [
        (
            gpu,
            shard,
            subprocess.Popen(
                list(command(shard)), env={**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
            ),
        )
        for gpu, shard in zip(gpus, shards)
    ]
    failed = [
        f"GPU {gpu} (alphas {shard})" for gpu, shard, process in processes if process.wait() != 0
    ]
    if failed:
        raise RuntimeError(f"sharded sweeps failed on {', '.join(failed)}")
