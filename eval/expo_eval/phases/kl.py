"""KL(candidate || theta0) from the candidate's plain samples and their two log-probabilities."""

import statistics
from typing import List

from expo_eval.records import Generation


def kl_stats(rows: List[Generation]) -> dict:
    """E_y~candidate[log p_candidate(y) - log p_theta0(y)] per response, with its standard
    error; nothing when a log-probability is missing."""
    gaps = [r.logprob - r.logprob_sft for r in rows if r.logprob is not None and r.logprob_sft is not None]
    if len(gaps) != len(rows) or not gaps:
        return {}
    spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    return {"kl": statistics.fmean(gaps), "kl_stderr": spread / len(gaps) ** 0.5}
