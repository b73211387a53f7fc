"""The `expo` merge method: theta2 = theta1 + alpha * (theta1 - theta0).

Model extrapolation (ExPO, Zheng et al., arXiv 2404.16792): theta0 is the SFT
checkpoint (`base_model`), theta1 an aligned checkpoint (DPO, RLHF, ...). With
several aligned models, delta is their weighted mean change from theta0 and
theta2 = theta0 + (1 + alpha) * delta.

The kernel is a pure function of its inputs, its parameters and the output dtype
mergekit passes to `_execute` (the public API's `out_dtype`, or the graph task's).
It reads no module state; statistics observers (`stats.observing`) only watch.
"""

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Optional, Sequence, Tuple

import torch
from pydantic import AfterValidator
from typing_extensions import Annotated

from mergekit.merge_methods import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    PerNonBase,
    TensorGroup,
    merge_method,
)

from mergekit_expo import stats
from mergekit_expo.extrapolation import compute_dtype, extrapolate
from mergekit_expo.rounding import RoundingMode, stochastic_round_, tensor_seed
from mergekit_expo.rules import check_alpha, check_density

PAPER_URL = "https://arxiv.org/abs/2404.16792"

Alpha = Annotated[float, AfterValidator(check_alpha)]
Density = Annotated[float, AfterValidator(check_density)]


class NonFiniteError(ValueError):
    """NaN or Inf in an input tensor, or a result its output dtype cannot hold."""


@merge_method(
    name="expo",
    pretty_name="ExPO (model extrapolation)",
    reference_url=PAPER_URL,
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    optional_tensor_policy=OptionalTensorPolicy.ERROR,
)
def _parameters(
    group: TensorGroup,
    alpha: Alpha,
    weight: PerNonBase[float] = 1.0,
    density: PerNonBase[Density] = 1.0,
    sparsification: Literal["magnitude", "random"] = "magnitude",
    rescale: bool = True,
    rounding: RoundingMode = "nearest",
    rounding_seed: int = 0,
) -> torch.Tensor:
    """The parameters `expo` takes, declared through mergekit's own decorator.

    Only its spec is used: the kernel is `ExpoMerge.merge_group`, which also
    receives the output dtype.
    """
    raise NotImplementedError


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
        # compat names mergekit internals; it loads only once mergekit has, and
        # this module loads while mergekit is still importing (registration).
        from mergekit_expo import compat

        return compat.sparsify(
            change,
            density=kept,
            method=compat.SparsificationMethod(sparsification),
            rescale_norm=compat.RescaleNorm.l1 if rescale else None,
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


@dataclass(frozen=True)
class ExpoMerge(GroupMergeMethod):
    """`expo` as a group method whose kernel sees mergekit's `out_dtype`."""

    @cached_property
    def spec(self) -> MergeMethodSpec:
        return _parameters.spec

    def _execute(self, groups, parameters, options, *, input_dtypes, out_dtype=None):
        # mergekit hands the output dtype to `_execute` only; give it to each group.
        parameters = [{**bound, "out_dtype": out_dtype} for bound in parameters]
        return super()._execute(
            groups, parameters, options, input_dtypes=input_dtypes, out_dtype=out_dtype
        )

    def merge_group(
        self,
        group: TensorGroup,
        /,
        *,
        alpha: float,
        weight,
        density,
        sparsification: str,
        rescale: bool,
        rounding: str,
        rounding_seed: int,
        out_dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """theta2, already in `out_dtype` when one is given, else in the compute dtype.

        With `rounding: stochastic` and an output dtype, theta2 is rounded onto
        that dtype's grid without bias (seeded per tensor by name); otherwise it is
        rounded to nearest once, by the cast.
        """
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
        dtype = out_dtype or compute_dtype(theta0, *theta1s)
        sparse = any(density[entry.id] < 1 for entry in entries)
        if rounding == "stochastic" and out_dtype is not None:
            theta2 = extrapolate(theta1, delta, alpha)
            _check_finite(group, theta2, dtype, alpha, check_inputs=sparse)
            stochastic_round_(theta2, out_dtype, tensor_seed(rounding_seed, name))
            stats.observe(name, alpha, theta0, theta1, delta, dtype, theta2=theta2)
        else:
            stats.observe(name, alpha, theta0, theta1, delta, dtype)
            owned = all(theta1 is not tensor for tensor in theta1s)
            theta2 = extrapolate(theta1, delta, alpha, out=theta1 if owned else None)
            _check_finite(group, theta2, dtype, alpha, check_inputs=sparse)
        return theta2 if out_dtype is None else theta2.to(out_dtype)


def _check_finite(
    group: TensorGroup, theta2: torch.Tensor, dtype: torch.dtype, alpha: float, check_inputs: bool
) -> None:
    """Raise NonFiniteError naming the tensor (and model) unless `dtype` holds theta2.

    Every input element reaches theta2 with a nonzero factor unless sparsification
    pruned it, so a finite theta2 proves finite inputs; inputs are read only when
    theta2 is not finite or some delta was sparsified.
    """
    name = group.metadata.name or "tensor"
    if theta2.numel() == 0:
        return
    ok, largest = _fits(theta2, dtype)
    if ok and not check_inputs:
        return
    for entry in (group.base, *group.non_base):
        role = "theta0, the SFT model" if entry.is_base else "theta1, an aligned model"
        check_finite_input(name, entry.tensor, entry.id, role)
    if not ok:
        _raise_overflow(name, largest, dtype, alpha)


def check_fits(name: str, theta2: torch.Tensor, dtype: torch.dtype, alpha: float) -> None:
    """Raise NonFiniteError unless `dtype` holds theta2 (finite inputs assumed): the
    merge's overflow rule, for `inspect`."""
    ok, largest = _fits(theta2, dtype) if theta2.numel() else (True, 0.0)
    if not ok:
        _raise_overflow(name, largest, dtype, alpha)


def _fits(theta2: torch.Tensor, dtype: torch.dtype) -> Tuple[bool, float]:
    """(whether round-to-nearest into `dtype` keeps theta2 finite, its largest |value|);
    False for a NaN too. theta2 is not empty."""
    low, high = (float(v) for v in torch.aminmax(theta2))
    limit = _overflow_bound(dtype)
    return -limit < low and high < limit, max(abs(low), abs(high))


def _raise_overflow(name: str, largest: float, dtype: torch.dtype, alpha: float) -> None:
    dtype_text = str(dtype).removeprefix("torch.")
    raise NonFiniteError(
        f"{name}: theta2 overflows {dtype_text} at alpha {alpha:g} "
        f"(largest |value| {largest:.4g}; {dtype_text} holds up to "
        f"{torch.finfo(dtype).max:.4g}): use a smaller alpha or a wider out_dtype"
    )


def check_finite_input(name: str, tensor: torch.Tensor, model, role: str) -> None:
    """Raise NonFiniteError naming the tensor, its model and role if it holds NaN or Inf
    (the merge's and `inspect`'s one check)."""
    bad = tensor.numel() - int(torch.isfinite(tensor).sum())
    if bad:
        raise NonFiniteError(f"{name}: {bad} NaN or Inf value(s) in {model} ({role}); expo needs finite weights")


def _overflow_bound(dtype: torch.dtype) -> float:
    """The magnitude from which round-to-nearest into `dtype` gives infinity.

    max = (2 - eps) * 2**emax and its ulp is eps * 2**emax: values from max plus
    half that ulp round to infinity (the tie goes to the even neighbour, inf).
    """
    if dtype == torch.float64:
        return math.inf
    info = torch.finfo(dtype)
    return info.max + info.eps * info.max / (2 - info.eps) / 2


expo_merge = ExpoMerge()
