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

from mergekit_expo.rounding import RoundingMode, stochastic_round_, tensor_seed

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
    alignment itself. Mixed-dtype arithmetic casts theta0 on the fly, so a large
    tensor costs two compute-dtype buffers, not five.
    """
    dtype = compute_dtype(theta0, *theta1s)
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError(f"expo model weights must sum to a positive number, got {total}")
    density = density or [1.0] * len(theta1s)

    def prune(change: torch.Tensor, kept: float) -> torch.Tensor:
        if kept >= 1:
            return change
        return sparsify(
            change,
            density=kept,
            method=SparsificationMethod(sparsification),
            rescale_norm=RescaleNorm.l1 if rescale else None,
        )

    if len(theta1s) == 1:
        theta1 = theta1s[0].to(dtype)
        return theta1, prune(theta1 - theta0, density[0])

    mean_change = torch.zeros(theta0.shape, dtype=dtype, device=theta0.device)
    pruned = None if all(d >= 1 for d in density) else torch.zeros_like(mean_change)
    for aligned, weight, kept in zip(theta1s, weights, density):
        change = aligned.to(dtype, copy=True).sub_(theta0)
        mean_change.add_(change, alpha=weight / total)
        if pruned is not None:
            pruned.add_(prune(change, kept), alpha=weight / total)
        del change
    theta1 = mean_change + theta0
    return theta1, mean_change if pruned is None else pruned


def extrapolate(
    theta1: torch.Tensor,
    delta: torch.Tensor,
    alpha: float,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """theta1 + alpha * delta: alpha = 0 and zero-delta elements keep theta1 bitwise."""
    return torch.add(theta1, delta, alpha=alpha, out=out)


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
    rounding: RoundingMode = "nearest",
    rounding_seed: int = 0,
) -> torch.Tensor:
    """Return theta2 in the compute dtype; the writer rounds it once to `out_dtype`.

    With `rounding: stochastic` theta2 is already on the output dtype's grid
    (unbiased, seeded per tensor by name), so the writer's cast is exact.
    """
    from mergekit_expo import stats  # stats measures with this module's math

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
    name = group.metadata.name
    theta2 = None
    if rounding == "stochastic" and stats.output_dtype() is not None:
        seed = tensor_seed(rounding_seed, name)
        theta2 = stochastic_round_(extrapolate(theta1, delta, alpha), stats.output_dtype(), seed)
    stats.record(name, alpha, theta0, theta1, delta, theta2)
    if theta2 is None:
        owned = all(theta1 is not tensor for tensor in theta1s)
        theta2 = extrapolate(theta1, delta, alpha, out=theta1 if owned else None)
    return theta2
