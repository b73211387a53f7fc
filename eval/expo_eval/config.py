"""Typed sweep configuration; the `mergekit-expo sweep` flags mirror these fields."""

from pathlib import Path
from typing import List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SamplingConfig(BaseModel):
    """The paper's sampling settings (section 3.1) as defaults.

    top_k: the paper's text says 40, its released code uses 50; we follow the text.
    Penalties are vLLM's: over generated tokens only.
    """

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(40, ge=0)
    presence_penalty: float = 0.1
    frequency_penalty: float = 0.1
    max_new_tokens: int = Field(512, gt=0)
    seed: int = 42
    batch_size: int = Field(16, gt=0)


class SearchConfig(BaseModel):
    """Coarse grid over [low, high], then bisection around the best alpha (paper, Appendix B)."""

    model_config = ConfigDict(extra="forbid")

    low: float = 0.1
    high: float = 0.5
    coarse_points: int = Field(5, ge=2)
    refine_rounds: int = Field(2, ge=0)
    min_step: float = Field(0.05, gt=0)


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipe: Path
    out: Path
    prompts: str = "ultrafeedback"
    select_prompts: Optional[str] = None
    report_prompts: Optional[str] = None
    select_fraction: float = Field(0.5, gt=0, lt=1)
    limit: Optional[int] = Field(None, gt=0)
    alphas: Optional[List[float]] = None
    search: Optional[SearchConfig] = None
    reward_models: List[str] = Field(min_length=1)
    select_with: Optional[str] = None
    include_sft: bool = False
    backend: Literal["transformers", "vllm"] = "transformers"
    device: Optional[str] = None
    tensor_parallel_size: int = Field(1, ge=1)
    chat_template: Optional[Path] = None
    materialize: bool = False
    keep_models: bool = False
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @model_validator(mode="after")
    def _one_alpha_source(self) -> "SweepConfig":
        if (self.alphas is None) == (self.search is None):
            raise ValueError("give exactly one of `alphas` (a grid) or `search`")
        if self.alphas is not None and any(a <= -1 for a in self.alphas):
            raise ValueError(f"every alpha must be > -1, got {self.alphas}")
        return self

    @property
    def selector(self) -> str:
        """The scorer that chooses alpha: `select_with`, else the first reward model."""
        return self.select_with or self.reward_models[0]
