"""What a sweep produces: one Generation per prompt, one CandidateResult per alpha and split."""

from typing import Dict, List, Literal, Optional

from pydantic import BaseModel, Field

from expo_eval.judge import JudgeStats

FinishReason = Literal["stop", "length"]
Split = Literal["select", "report"]


class Generation(BaseModel):
    """One sampled response, as written to generations/alpha=<a>.jsonl."""

    prompt_id: str
    split: Split
    prompt: str
    response: str
    tokens: int
    finish_reason: FinishReason
    scores: Dict[str, float] = Field(default_factory=dict)
    # the plain samples KL is measured on: their ids, log p(response | prompt) under the candidate and theta0
    token_ids: Optional[List[int]] = None
    logprob: Optional[float] = None
    logprob_sft: Optional[float] = None


class ScoreStats(BaseModel):
    mean: float
    median: float
    stderr: float
    win_rate: Optional[float] = None  # against alpha = 0 on the same prompts; ties count half


class CandidateResult(BaseModel):
    """Summary of one candidate (an alpha, or the SFT model) on one prompt split."""

    alpha: Optional[float]  # None for the SFT model
    label: str  # "alpha=0.3" or "sft"
    split: Split
    n: int
    scores: Dict[str, ScoreStats]
    mean_tokens: float
    length_cut_share: float
    repetition: float
    # KL(candidate || theta0) in nats per response, estimated on the candidate's own samples
    kl: Optional[float] = None
    kl_stderr: Optional[float] = None
    # what the selection rule maximized (expo_eval.selection); select-split alphas only
    selection_value: Optional[float] = None
    judge: Optional[JudgeStats] = None  # against alpha = 0 on the same prompts
    # lm-eval results on this candidate's weights, {task: {metric: value}} (select rows only)
    capability: Dict[str, Dict[str, float]] = Field(default_factory=dict)
    timing: Dict[str, float] = Field(default_factory=dict)
    collapsed: bool = False
    collapse_reasons: List[str] = Field(default_factory=list)

    def score(self, scorer: str) -> float:
        return self.scores[scorer].mean
