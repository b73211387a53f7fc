"""Statistics that `expo` records while it merges, for warnings and the model card.

mergekit gives a kernel no end-of-merge callback, so records go to a process-wide
ledger that `run_merge` (wrapped in registration.py) resets and reads.
"""

import math
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class TensorRecord:
    name: Optional[str]
    alpha: float
    numel: int
    changed: int
    delta_sq_sum: float


_lock = threading.Lock()
_records: List[TensorRecord] = []


def record(name: Optional[str], alpha: float, delta: torch.Tensor) -> None:
    entry = TensorRecord(
        name=name,
        alpha=alpha,
        numel=delta.numel(),
        changed=int(torch.count_nonzero(delta)),
        delta_sq_sum=float(torch.linalg.vector_norm(delta)) ** 2,
    )
    with _lock:
        _records.append(entry)


def reset() -> None:
    with _lock:
        _records.clear()


def records() -> List[TensorRecord]:
    with _lock:
        return list(_records)


MODULE_KINDS = ("embeddings", "attention", "mlp", "norm", "lm_head", "other")


def module_kind(name: Optional[str]) -> str:
    """Coarse module kind of a tensor name, for per-module summaries."""
    name = (name or "").lower()
    if "lm_head" in name or name.endswith("output.weight"):
        return "lm_head"
    if "embed" in name or "wte" in name or "tok_embeddings" in name:
        return "embeddings"
    if "norm" in name or "ln_" in name:
        return "norm"
    if "attn" in name or "attention" in name:
        return "attention"
    if "mlp" in name or "feed_forward" in name or "ffn" in name:
        return "mlp"
    return "other"


@dataclass(frozen=True)
class Summary:
    tensors: int
    numel: int
    changed: int
    delta_sq_sum: float
    alphas: Dict[str, Tuple[float, float]]

    @property
    def normalized_frobenius(self) -> float:
        """sqrt(sum(delta^2) / |P|): the paper's Table 1 measure."""
        return math.sqrt(self.delta_sq_sum / self.numel) if self.numel else 0.0

    @property
    def alpha_range(self) -> Tuple[float, float]:
        values = [v for pair in self.alphas.values() for v in pair]
        return min(values), max(values)


def summarize(entries: List[TensorRecord]) -> Optional[Summary]:
    if not entries:
        return None
    alphas: Dict[str, Tuple[float, float]] = {}
    for entry in entries:
        kind = module_kind(entry.name)
        low, high = alphas.get(kind, (entry.alpha, entry.alpha))
        alphas[kind] = (min(low, entry.alpha), max(high, entry.alpha))
    return Summary(
        tensors=len(entries),
        numel=sum(e.numel for e in entries),
        changed=sum(e.changed for e in entries),
        delta_sq_sum=math.fsum(e.delta_sq_sum for e in entries),
        alphas={kind: alphas[kind] for kind in MODULE_KINDS if kind in alphas},
    )
