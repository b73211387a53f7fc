"""Warnings and an alpha search range, from the paper's own figures (arXiv 2404.16792).

ExPO's first-order argument needs a small change theta1 - theta0, and its effect
is only as large as what survives the output dtype: alignment moves most bf16
weights by less than one ulp.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from mergekit_expo.stats import Change

# Table 1 (zephyr-7b-dpo): normalized Frobenius norm sqrt(sum(P_i^2) / |P|) of the change.
SFT_TO_DPO = 6.348e-6
PRETRAINED_TO_SFT = 1.955e-4
# A change nearer (in orders of magnitude) to pretrained -> SFT than to SFT -> DPO:
# extrapolating such a pair collapses the model (section 4.3: no EOS, repetition).
COLLAPSE_NORMALIZED = math.sqrt(SFT_TO_DPO * PRETRAINED_TO_SFT)  # 3.5e-5
# Table 7: every fully trained model's best alpha lay on the grid 0.1 .. 0.5.
FULL_TRAINING_ALPHAS = (0.1, 0.5)
# Table 2: with 10/20/40/100% of zephyr's DPO steps the best alpha was 8.0/2.5/0.5/0.3,
# i.e. (1 + alpha) x share of steps = 0.9/0.7/0.6/1.3: the extrapolated model sat about
# 0.6 to 1.3 full changes away from the SFT model.
FULL_CHANGES_REACHED = (0.6, 1.3)
# "Most of alpha * delta lost": the stored step, projected on alpha * delta, is
# shorter than this share of it (the model is as if alpha were this much smaller).
ROUNDING_KEPT_MIN = 0.5


@dataclass(frozen=True)
class Alert:
    code: str  # collapse, identical, rounding
    message: str


def suggested_alphas(total: Change) -> Tuple[float, float]:
    """An alpha search range from the size of the change (a heuristic, not a guarantee).

    It reads the change as a share of zephyr-7b-dpo's full DPO change (Table 1) and
    assumes the change grows with training as in the paper's Table 2.
    """
    low, high = FULL_TRAINING_ALPHAS
    share = total.normalized_frobenius / SFT_TO_DPO
    if share <= 0:
        return low, high
    reach_low, reach_high = FULL_CHANGES_REACHED
    return max(low, reach_low / share - 1), max(high, reach_high / share - 1)


def alerts(
    total: Change, dtypes: Sequence[str], alphas: Optional[Sequence[float]] = None
) -> List[Alert]:
    """Warnings about the pair and about storing theta2 in each of `dtypes`.

    alphas: report the rounding loss per alpha; None sums it over all alphas (a merge
    with per-module alpha).
    """
    found = []
    normalized = total.normalized_frobenius
    if total.numel and total.changed == 0:
        found.append(
            Alert(
                "identical",
                "delta is zero in every tensor: theta0 and theta1 are identical, so "
                "extrapolation returns theta1 unchanged",
            )
        )
    elif normalized >= COLLAPSE_NORMALIZED:
        found.append(
            Alert(
                "collapse",
                f"normalized ||theta1 - theta0|| is {normalized:.3g}, of the order of "
                f"pretrained->SFT ({PRETRAINED_TO_SFT:g}) rather than SFT->DPO "
                f"({SFT_TO_DPO:g}; paper, Table 1): ExPO will likely collapse the model "
                "(section 4.3). Is theta0 the SFT checkpoint theta1 was aligned from?",
            )
        )
    for dtype in dtypes:
        for alpha in alphas or [None]:
            loss = total.loss(dtype, alpha)
            kept = loss.kept_along_delta
            if kept is None or kept >= ROUNDING_KEPT_MIN:
                continue
            at = "" if alpha is None else f" at alpha {alpha:g}"
            found.append(
                Alert(
                    "rounding",
                    f"{dtype} output keeps {100 * kept:.0f}% of alpha * delta{at} "
                    f"(projected on delta; {100 * loss.rounded_back_fraction:.0f}% of the "
                    "changed elements round back to theta1): write float16 or float32 "
                    "(out_dtype), or use `rounding: stochastic`",
                )
            )
    return found
