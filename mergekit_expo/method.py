"""The `expo` merge method: theta2 = theta1 + alpha * (theta1 - theta0).

Model extrapolation (ExPO, Zheng et al., arXiv 2404.16792): theta0 is the SFT
checkpoint (`base_model`), theta1 an aligned checkpoint (DPO, RLHF, ...). With
several aligned models, delta is their weighted mean change from theta0 and
theta2 = theta0 + (1 + alpha) * delta.
"""

import math
from typing import Literal, Optional, Sequence, Tuple

import torch
from pydantic import AfterValidator
from typing_extensions import Annotated

from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    OptionalTensorPolicy,
    PerNonBase,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

from mergekit_expo import stats

PAPER_URL = "https://arxiv.org/abs/2404.16792"


def _check_density(density: float) -> float:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (got {density})")
    return density


def _check_alpha(alpha: float) -> float:
    if not math.isfinite(alpha) or alpha <= -1:
        raise ValueError(
            f"alpha must be a finite number greater than -1 (got {alpha}): "
            "alpha <= -1 moves past the SFT model theta0"
        )
    return alpha


Alpha = Annotated[float, AfterValidator(_check_alpha)]
Density = Annotated[float, AfterValidator(_check_density)]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: one rounding at the end."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def decompose(
    theta0: torch.Tensor,
    theta1s: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: Optional[Sequence[float]] = None,
    sparsification: Literal["magnitude", "random"] = "magnitude",
    rescale: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(theta1, delta) in the compute dtype: the aligned point and the direction.

    theta1 is the aligned model as stored, or theta0 plus the weighted mean change
    of several. delta is the weighted mean of the changes, each sparsified when
    its density is below 1: sparsification prunes the extrapolation, never the
    alignment itself.
    """
    dtype = compute_dtype(theta0, *theta1s)
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError(f"expo model weights must sum to a positive number, got {total}")
    density = density or [1.0] * len(theta1s)
    base = theta0.to(dtype)
    changes = [theta1.to(dtype) - base for theta1 in theta1s]
    mean_change = _weighted_sum(changes, [w / total for w in weights])
    theta1 = theta1s[0].to(dtype) if len(theta1s) == 1 else base + mean_change
    if all(d >= 1 for d in density):
        return theta1, mean_change
    pruned = [
        sparsify(
            change,
            density=d,
            method=SparsificationMethod(sparsification),
            rescale_norm=RescaleNorm.l1 if rescale else None,
        )
        for change, d in zip(changes, density)
    ]
    return theta1, _weighted_sum(pruned, [w / total for w in weights])


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    result = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights):
        result.add_(tensor, alpha=weight)
    return result


def extrapolate(theta1: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """theta1 + alpha * delta: alpha = 0 and zero-delta elements keep theta1 bitwise."""
    return torch.add(theta1, delta, alpha=alpha)


@merge_method(
    name="expo",
    pretty_name="ExPO (model extrapolation)",
    reference_url=PAPER_URL,
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    optional_tensor_policy=OptionalTensorPolicy.ERROR,
)
def expo_merge(
    group: TensorGroup,
    alpha: Alpha,
    weight: PerNonBase[float] = 1.0,
    density: PerNonBase[Density] = 1.0,
    sparsification: Literal["magnitude", "random"] = "magnitude",
    rescale: bool = True,
) -> torch.Tensor:
    """Return theta2 in the compute dtype; the writer rounds it once to `out_dtype`."""
    entries = group.non_base
    theta0 = group.base.tensor
    theta1s = [entry.tensor for entry in entries]
    theta1, delta = decompose(
        theta0,
        theta1s,
        [weight[entry.id] for entry in entries],
        density=[density[entry.id] for entry in entries],
        sparsification=sparsification,
        rescale=rescale,
    )
    result = extrapolate(theta1, delta, alpha)
    stats.record(group.metadata.name, alpha, delta)
    return result
