"""Scoring: each reward model (or function) scores a candidate's rows, once per generations
entry and scorer contents; the models load when first needed and are released together."""

import time
from typing import Dict, List, Optional

from expo_eval.config import SweepConfig
from expo_eval.keys import Keys
from expo_eval.records import Generation, Split
from expo_eval.scoring import Scorer, ScorerError, check_scores, given_scorer_name, load_scorer
from expo_eval.store import Store, numbers, valid
from expo_eval.phases.summary import label


class Scoring:
    def __init__(self, config: SweepConfig, keys: Keys, store: Store, given: Optional[List[Scorer]] = None):
        self.config, self.keys, self.store = config, keys, store
        self.given = {given_scorer_name(s): s for s in given or []}
        self._loaded: Dict[str, Scorer] = dict(self.given)
        self.seconds: Dict[tuple, float] = {}  # by (alpha, split); loading the models excluded

    def check(self) -> None:
        """Fail now, not after hours of generation, on a scorer that cannot score."""
        from expo_eval.scoring import check_scorer

        for name in self.config.reward_models:
            if name not in self.given:
                check_scorer(name, trust_remote_code=self.config.trust_remote_code)

    def scorer(self, name: str) -> Scorer:
        if name not in self._loaded:
            self._loaded[name] = load_scorer(
                name, device=self.config.device or "cpu", trust_remote_code=self.config.trust_remote_code
            )
        return self._loaded[name]

    def release(self) -> None:
        self._loaded = dict(self.given)

    def score(self, alpha: Optional[float], split: Split, rows: List[Generation]) -> None:
        """Every scorer's score on every row, from the store where it is there."""
        prompts = {p.id: p for p in self.keys.splits[split]}
        for name in self.config.reward_models:
            key = self.keys.scores(alpha, split, name)
            cacheable = self.keys.cacheable(name)
            values = self.store.read(key, "scores", valid(numbers(len(rows)), f"{len(rows)} numbers")) if cacheable else None
            if values is None:
                ordered = [prompts[r.prompt_id] for r in rows]
                started = time.perf_counter()
                try:
                    scorer = self.scorer(name)
                    started = time.perf_counter()
                    values = scorer.score(ordered, [r.response for r in rows])
                except ScorerError:
                    raise
                except Exception as error:  # a user's scorer or a model that cannot run
                    raise ScorerError(f"scorer {name} failed on {label(alpha)}: {type(error).__name__}: {error}") from error
                self.seconds[(alpha, split)] = self.seconds.get((alpha, split), 0.0) + time.perf_counter() - started
                values = check_scores(name, values, ordered)  # before anything is kept
                if cacheable:
                    self.store.write(key, "scores", values)
            for row, value in zip(rows, values):
                row.scores[name] = value
