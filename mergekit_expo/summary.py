"""The log lines and warnings an `expo` merge ends with."""

import logging
from typing import List

from mergekit_expo.stats import TensorRecord, summarize

LOG = logging.getLogger("mergekit_expo")


def log_summary(entries: List[TensorRecord]) -> None:
    summary = summarize(entries)
    if summary is None:
        return
    low, high = summary.alpha_range
    LOG.info(
        "expo: %d tensors, ||delta|| normalized %.3e, %.2f%% of elements changed, "
        "alpha in [%g, %g]",
        summary.tensors,
        summary.normalized_frobenius,
        100 * summary.changed / max(summary.numel, 1),
        low,
        high,
    )
    if summary.changed == 0:
        LOG.warning(
            "expo: delta is zero in every tensor: base_model and the aligned "
            "model are identical, so the output equals the aligned model"
        )
    if low < 0:
        LOG.warning(
            "expo: alpha %g < 0 interpolates toward the SFT model instead of "
            "extrapolating past the aligned one",
            low,
        )
