"""The log lines and warnings an `expo` merge ends with."""

import logging
from typing import List

from mergekit_expo import advice
from mergekit_expo.stats import TensorRecord, summarize

LOG = logging.getLogger("mergekit_expo")


def log_summary(entries: List[TensorRecord]) -> None:
    summary = summarize(entries)
    if summary is None:
        return
    total = summary.total
    low, high = summary.alpha_range
    LOG.info(
        "expo: %d tensors, ||delta|| %.4g (normalized %.3e, relative to theta0 %.3e), "
        "%.2f%% of elements changed, alpha in [%g, %g]",
        total.tensors,
        total.frobenius,
        total.normalized_frobenius,
        total.relative or 0.0,
        100 * total.changed_fraction,
        low,
        high,
    )
    for dtype in total.dtypes:
        loss = total.loss(dtype)
        if loss.kept is not None:
            LOG.info(
                "expo: written as %s: %.1f%% of the changed elements round back to "
                "theta1; %.1f%% of ||alpha * delta|| is kept (%.1f%% along delta)",
                dtype,
                100 * loss.rounded_back_fraction,
                100 * loss.kept,
                100 * loss.kept_along_delta,
            )
    for alert in advice.alerts(total, total.dtypes):
        LOG.warning("expo: %s", alert.message)
    if low < 0:
        LOG.warning(
            "expo: alpha %g < 0 interpolates toward the SFT model instead of "
            "extrapolating past the aligned one",
            low,
        )
