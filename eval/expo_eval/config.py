"""Typed sweep configuration. `mergekit-expo sweep`'s flags are generated from these fields
(expo_eval.cli), so a YAML config and the command line cannot drift apart."""

import os
import re
from pathlib import Path
from typing import List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, FilePath, ValidationInfo, field_validator, model_validator

from expo_eval.capability import LmEvalConfig
from expo_eval.judge import JudgeConfig
from expo_eval.selection import DEFAULT_REWARD_ACCURACY, DEFAULT_RULE, Rule, Selection
from mergekit_expo.rules import check_alpha


class SamplingConfig(BaseModel):
    """The paper's sampling settings (section 3.1) as defaults.

    top_k: the paper's text says 40, its released code uses 50; we follow the text.
    Penalties are vLLM's: over generated tokens only.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # `--temperature inf` samples nothing

    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling share.")
    top_k: int = Field(40, ge=0, description="Top-k sampling (0: off).")
    presence_penalty: float = Field(0.1, ge=-2, le=2, description="vLLM's presence penalty, over generated tokens.")
    frequency_penalty: float = Field(0.1, ge=-2, le=2, description="vLLM's frequency penalty, over generated tokens.")
    max_new_tokens: int = Field(512, gt=0, description="Longest response, in tokens.")
    seed: int = Field(42, description="Sampling seed: every candidate sees the same random stream.")
    batch_size: int = Field(16, gt=0, description="Prompts per batch (transformers backend).")


class SearchConfig(BaseModel):
    """Coarse grid over [low, high], then bisection around the best alpha (paper, Appendix B)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    low: float = Field(0.1, description="Lowest alpha of the coarse grid.")
    high: float = Field(0.5, description="Highest alpha of the coarse grid.")
    coarse_points: int = Field(5, ge=2, description="Coarse grid size.")
    refine_rounds: int = Field(2, ge=0, description="Bisection rounds after the grid.")
    min_step: float = Field(0.05, gt=0, description="Smallest alpha spacing.")

    @model_validator(mode="after")
    def _an_interval(self) -> "SearchConfig":
        check_alpha(self.low)
        check_alpha(self.high)
        if self.low <= 0:
            raise ValueError(
                f"the search interval needs 0 < low < high, got [{self.low}, {self.high}]: a search extrapolates "
                "(alpha 0, theta1, is always evaluated); give alphas at or below 0 as a grid (alphas)"
            )
        if not self.low < self.high:
            raise ValueError(f"the search interval needs low < high, got [{self.low}, {self.high}]")
        return self


DEFAULT_CPU_KV_CACHE_GIB = 2.0
GPU_ID = re.compile(r"^(\d+|(GPU|MIG)-[\w-]+)$")
DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")


def device_count(kind: str) -> int:
    """How many `kind` devices (cuda, xpu, mps) torch sees in this process; 0 for a build without them."""
    import torch  # only when a device is named: building a config does not load torch otherwise

    if kind == "mps":
        return int(torch.backends.mps.is_available())
    module = getattr(torch, kind, None)
    return module.device_count() if module is not None and module.is_available() else 0


def unseen_device(device: str) -> Optional[str]:
    """Why torch cannot run on `device` here (a typo'd index, a CPU-only build); None when it can."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return None
    count = device_count(kind)
    if count == 0:
        return f"torch sees no {kind.upper()} device here (a torch build without {kind}, no driver, or none visible)"
    if index and int(index) >= count:
        return f"torch sees {count} {kind.upper()} device(s), {kind}:0 to {kind}:{count - 1}"
    return None


class EngineConfig(BaseModel):
    """vLLM engine settings; the transformers backend ignores them.

    On one GPU the policy and the reward models take turns: a grid sweep generates
    every candidate, releases the engine, then scores, so the engine may take vLLM's
    usual share of memory. A search alternates generating and scoring, so by default
    its engine leaves room for the reward models (see `backends.vllm.engine_options`).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    gpu_memory_utilization: Optional[float] = Field(
        None,
        gt=0,
        le=1,
        description="Share of GPU memory vLLM may take (default: 0.9 for a grid; for a search, what the reward models leave).",
    )
    kv_cache_gib: Optional[float] = Field(
        None,
        gt=0,
        description=f"KV-cache size in GiB (default on CPU: {DEFAULT_CPU_KV_CACHE_GIB:g}; vLLM's own CPU default reserves 92% of RAM).",
    )
    max_model_len: Optional[int] = Field(None, gt=0, description="Longest prompt + response vLLM plans for (default: the model's).")
    enforce_eager: Optional[bool] = Field(
        None, description="Skip CUDA graphs and torch.compile: faster start-up, slower generation (default: vLLM's)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine (tensor parallelism), for models that do not fit one.")


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipe: Path = Field(description="The `expo` recipe to sweep.")
    out: Path = Field(description="Output folder (results, generations, plots, cache).")
    prompts: str = Field("ultrafeedback", description="smoke, ultrafeedback, alpaca_eval, a JSONL file or hf:NAME[:SPLIT].")
    select_prompts: Optional[str] = Field(None, description="Prompts that choose alpha (default: a share of --prompts).")
    report_prompts: Optional[str] = Field(None, description="Held-out prompts the result is reported on.")
    select_fraction: float = Field(0.5, gt=0, lt=1, allow_inf_nan=False, description="Share of --prompts used to choose alpha.")
    limit: Optional[int] = Field(None, gt=0, description="Use at most N prompts.")
    alphas: Optional[List[float]] = Field(None, description="Explicit grid, e.g. 0,0.1,0.2,0.3 (0 is always evaluated).")
    search: Optional[SearchConfig] = Field(None, description="Automatic search (paper, Appendix B) instead of a grid.")
    reward_models: List[str] = Field(
        min_length=1, description="Reward model folder or Hub ID (MODEL#objective=K picks one objective of a multi-objective one), or module:function. Repeatable; all of them choose alpha unless --select-with names some."
    )
    select_with: Optional[List[str]] = Field(
        None,
        min_length=1,
        description="Reward models that choose alpha (repeatable; default: all of them). trust-region and agreement ask each of them; "
        "reward-max and kl-bound use the first.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the code a reward model ships (its config.json auto_map: ArmoRM, InternLM2-reward); "
        "it runs with your permissions, so read it first.",
    )
    select: Rule = Field(
        DEFAULT_RULE,
        description="How alpha is chosen: trust-region (the scorers' mean standardized gain, among candidates no further "
        "from theta0 than 1.5x theta1's distance sqrt(KL) and rated by no scorer clearly below alpha 0, less a worst-case error charge on the KL beyond first "
        "order), agreement (out from alpha 0 while every scorer keeps rising and the KL grows as a first-order step "
        "predicts), kl-bound (reward less what its errors could gain at the candidate's KL from theta0) or "
        "reward-max (the paper's highest mean reward).",
    )
    reward_accuracy: float = Field(
        DEFAULT_REWARD_ACCURACY,
        ge=0.5,
        le=1,
        allow_inf_nan=False,
        description="The choosing reward model's pairwise accuracy on held-out preferences: the share of its spread that is error (the error charge of trust-region and kl-bound).",
    )
    kl_prompts: int = Field(
        128,
        ge=2,
        description="Select prompts on which each candidate is also sampled plainly (temperature 1, no top-k/top-p, no "
        "penalties) to estimate KL(candidate || theta0), which trust-region, agreement and kl-bound use; the paper's settings "
        "sample another distribution, so an estimate from them is biased.",
    )
    include_sft: bool = Field(False, description="Also evaluate the SFT model (theta0).")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="Generation backend.")
    device: Optional[str] = Field(None, description="cpu, cuda, cuda:1 ... (default: cuda when available).")
    gpus: Optional[List[str]] = Field(
        None,
        description="GPUs to spread a grid over, e.g. 0,1,2,3: one engine per tensor_parallel_size GPUs, alphas dealt round robin "
        "(CUDA devices torch sees; with device cpu given, each group's engine runs on the CPU).",
    )
    generate_only: bool = Field(False, description="Generate and cache the responses of exactly the given alphas (0 is not added), score nothing; a later run scores.")
    chat_template: Optional[FilePath] = Field(None, description="Jinja chat template file for a tokenizer without one.")
    materialize: bool = Field(False, description="Write every candidate with mergekit and load it (slow; the paper's loop).")
    keep_models: bool = Field(False, description="Keep the checkpoints --materialize writes.")
    judge: Optional[JudgeConfig] = Field(
        None, description="An LLM judge (OpenAI-compatible endpoint) comparing each reported alpha with alpha 0."
    )
    lm_eval: Optional[LmEvalConfig] = Field(
        None, description="lm-evaluation-harness tasks on the in-place candidates: a capability guard for alpha 0 and the chosen alpha."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @field_validator("alphas", mode="before")
    @classmethod
    def _alphas_are_numbers(cls, alphas):
        if isinstance(alphas, list) and any(isinstance(a, bool) for a in alphas):
            raise ValueError(f"alphas must be numbers, got {alphas}")
        return alphas

    @field_validator("alphas")
    @classmethod
    def _alphas_extrapolate(cls, alphas: Optional[List[float]]) -> Optional[List[float]]:
        return None if alphas is None else [check_alpha(a) + 0.0 for a in alphas]  # -0.0 is 0

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_ids(cls, gpus):
        if isinstance(gpus, list):
            gpus = [str(g) for g in gpus]
            bad = [g for g in gpus if not GPU_ID.match(g)]
            if bad:
                raise ValueError(f"GPU ids are indices or UUIDs as CUDA_VISIBLE_DEVICES takes them, got {bad}")
            if len(set(gpus)) != len(gpus):
                raise ValueError(f"each GPU once, got {gpus}")
        return gpus

    @field_validator("device")
    @classmethod
    def _device(cls, device: Optional[str]) -> Optional[str]:
        if device is not None and not DEVICE.match(device):
            raise ValueError(f"expected cpu, cuda, cuda:N, xpu or mps, got {device!r}")
        problem = None if device is None else unseen_device(device)
        if problem:
            raise ValueError(f"{device}: {problem}; give cpu")
        return device

    @field_validator("gpus")
    @classmethod
    def _gpus_are_seen(cls, gpus: Optional[List[str]], info: ValidationInfo) -> Optional[List[str]]:
        """GPUs, not a silent run on the CPU: torch must see CUDA devices, unless the device is
        explicitly cpu (then each group's engine runs there, as asked)."""
        device = info.data.get("device")
        if not gpus or device == "cpu":
            return gpus
        if device not in (None, "cuda"):
            raise ValueError(
                f"each GPU group sees only its own GPUs (CUDA_VISIBLE_DEVICES), as cuda:0 on: "
                f"leave device unset or give cuda, not {device!r}"
            )
        problem = unseen_device("cuda")
        if problem:
            raise ValueError(f"{','.join(gpus)}: {problem}; leave gpus out to run on one device")
        count = device_count("cuda")
        beyond = [g for g in gpus if g.isdigit() and int(g) >= count]
        # CUDA_VISIBLE_DEVICES renumbers what torch sees here, not the physical indices each group gets
        if beyond and "CUDA_VISIBLE_DEVICES" not in os.environ:
            raise ValueError(f"GPU {','.join(beyond)}: torch sees {count} CUDA device(s), 0 to {count - 1}")
        return gpus

    @field_validator("select_with", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value):
        """`select_with: RM` (one name, as configs wrote it before it took a list) is a list of one."""
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_alpha_source(self) -> "SweepConfig":
        if (self.alphas is None) == (self.search is None):
            raise ValueError("give exactly one of `alphas` (a grid) or `search`")
        unknown = [name for name in self.select_with or [] if name not in self.reward_models]
        if unknown:
            raise ValueError(f"select_with {unknown[0]!r} is not one of the reward models {self.reward_models}")
        if self.select_with is not None and len(set(self.select_with)) != len(self.select_with):
            raise ValueError(f"select_with names a reward model twice: {self.select_with}")
        if self.materialize and self.backend != "transformers":
            raise ValueError("materialize writes checkpoints for the transformers backend; vLLM swaps weights in place")
        if self.generate_only and self.alphas is None:
            raise ValueError("generate_only needs a grid (alphas): a search chooses its next alpha from scores")
        if self.gpus is not None:
            if not self.gpus:
                raise ValueError("gpus: give at least one GPU")
            if self.search is not None:
                raise ValueError(
                    "gpus: a search is sequential and runs on one engine; spread a grid (alphas) "
                    "over GPUs, or choose a search's GPUs with CUDA_VISIBLE_DEVICES"
                )
            if len(self.gpus) % self.engine.tensor_parallel_size:
                raise ValueError(
                    f"gpus: {len(self.gpus)} GPUs do not split into engines of "
                    f"tensor_parallel_size {self.engine.tensor_parallel_size}"
                )
        return self

    @property
    def selectors(self) -> List[str]:
        """The scorers that choose alpha: `select_with`, else every reward model."""
        return list(self.select_with or self.reward_models)

    @property
    def selector(self) -> str:
        """The scorer single-scorer rules (reward-max, kl-bound) use: the first of `selectors`."""
        return self.selectors[0]

    @property
    def selection(self) -> Selection:
        return Selection(self.selector, self.select, self.reward_accuracy, tuple(self.selectors[1:]))
