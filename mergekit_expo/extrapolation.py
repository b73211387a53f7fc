"""The arithmetic the merge method and the statistics share (plain torch).

theta2 = theta1 + alpha * delta with delta = theta1 - theta0 (Zheng et al.,
arXiv 2404.16792).
"""

from typing import Optional

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: one rounding at the end."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def extrapolate(
    theta1: torch.Tensor,
    delta: torch.Tensor,
    alpha: float,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """theta1 + alpha * delta: alpha = 0 and zero-delta elements keep theta1 bitwise."""
    return torch.add(theta1, delta, alpha=alpha, out=out)
