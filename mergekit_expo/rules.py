"""The rules an `expo` recipe must follow, each stated once.

Plain Python with no mergekit import, so the merge, the method's parameter
validation and the alpha sweep all apply the same rule with the same message.
"""

import math
from typing import Any


FLOAT32_MAX = 3.4028234663852886e38


def check_alpha(alpha: float) -> float:
    """Return alpha if it is a finite number greater than -1, else raise ValueError.

    theta2 = theta1 + alpha * (theta1 - theta0): alpha = -1 gives theta0 itself and
    anything below moves past it; NaN or an infinity gives no model at all.
    """
    if isinstance(alpha, str):
        try:
            float(alpha)
            hint = f" (YAML reads {alpha!r} as text: write it with a dot, e.g. 1.0e+30)"
        except ValueError:
            hint = ""
        raise ValueError(f"alpha must be a number (got {alpha!r}){hint}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha must be a number (got {alpha!r})")
    if not math.isfinite(alpha):
        what = "NaN is not a number" if math.isnan(alpha) else "an infinite step gives no model"
        raise ValueError(f"alpha must be a finite number greater than -1 (got {alpha}): {what}")
    if alpha <= -1:
        raise ValueError(
            f"alpha must be a finite number greater than -1 (got {alpha}): "
            "alpha <= -1 moves past the SFT model theta0"
        )
    if alpha > FLOAT32_MAX:
        raise ValueError(f"alpha must fit the float32 arithmetic of the merge (alpha <= {FLOAT32_MAX:.3g}), got {alpha}")
    return alpha


def check_density(density: float) -> float:
    """Return density if it is in (0, 1], else raise ValueError."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (got {density})")
    return density


BASE_MODEL_REQUIRED = (
    "expo needs base_model: the SFT checkpoint (theta0) the aligned models were trained from"
)


def require_base_model(config: Any) -> None:
    """Raise ValueError unless a mergekit configuration names theta0.

    `base_model` at the top level, or a `base_model` in every slice.
    """
    slice_bases = [s.base_model for s in getattr(config, "slices", None) or []]
    if config.base_model is None and not (slice_bases and all(slice_bases)):
        raise ValueError(BASE_MODEL_REQUIRED)
