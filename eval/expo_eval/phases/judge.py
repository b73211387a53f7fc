"""The LLM judge's verdict on every reported candidate against alpha 0, on the held-out
prompts where there are some; kept by both generations and the judge's prompt."""

from typing import Callable, List, Optional

from expo_eval.keys import Keys
from expo_eval.records import CandidateResult, Generation, Split
from expo_eval.store import Store, valid


def judge_results(judge, results: List[CandidateResult], split: Split, rows: Callable[[Optional[float], Split], List[Generation]],
                  keys: Keys, store: Store) -> List[CandidateResult]:
    from expo_eval.judge import summarize

    baseline = rows(0.0, split)
    judged = []
    for r in results:
        if r.split == split and r.alpha != 0:
            candidate = rows(r.alpha, split)
            key = keys.judge(judge.fingerprint, r.alpha, split)
            preferences = store.read(key, "judge", valid(
                lambda values: isinstance(values, list) and len(values) == len(candidate)
                and all(v in (None, 1.0, 1.5, 2.0) for v in values),
                f"{len(candidate)} alpaca_eval preferences",
            ))
            fresh = preferences is None
            if fresh:
                preferences = judge.preferences(
                    [g.prompt for g in candidate], [g.response for g in baseline], [g.response for g in candidate]
                )
            stats = summarize(preferences, [g.response for g in baseline], [g.response for g in candidate], judge.config.model)
            if fresh:  # only a verdict that summarizes is kept
                store.write(key, "judge", preferences)
            r = r.model_copy(update={"judge": stats})
        judged.append(r)
    return judged
