"""Run a sweep: check everything, generate, score, measure, choose, report.

Every generation, log-probability and score is kept in the store (DIR/cache) under a digest
of what determines it, written as each finishes: an interrupted sweep resumes where it
stopped, and a repeated one generates nothing.

A grid generates every candidate first, releases the model (or vLLM engine), then loads
the reward models and scores: on one GPU the two never compete for memory. A search
alternates, so both stay loaded (the engine is sized for it).
"""

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from expo_eval.config import SweepConfig
from expo_eval.executors import InProcess, Sharded
from expo_eval.files import finish_report_swap
from expo_eval.fingerprint import describe_changes
from expo_eval.inputs import SweepInputs
from expo_eval.keys import Keys
from expo_eval.lock import SweepLock
from expo_eval.outdir import check_output_folder, writing
from expo_eval.phases.capability import capability_results
from expo_eval.phases.judge import judge_results
from expo_eval.phases.score import Scoring
from expo_eval.phases.summary import label, order, summarize
from expo_eval.records import CandidateResult, Generation, Split
from expo_eval.report import print_table, recipe_subject, write_report
from expo_eval.scoring import Scorer, given_scorer_name
from expo_eval.search import (
    capability_flags,
    choose_alpha,
    judge_flags,
    mark_collapse,
    other_rule_flags,
    reward_hacking_flags,
    search_alphas,
)
from expo_eval.store import Store
from mergekit_expo.errors import ExpoError

LOG = logging.getLogger("expo_eval")


class SweepReusedError(ExpoError, RuntimeError):
    """run() called a second time on one Sweep: its inputs were read when it was built."""


class InputsChangedError(ExpoError, RuntimeError):
    """An input's contents changed while the sweep ran: what it measured is of no one input."""


@dataclass
class SweepOutcome:
    results: List[CandidateResult]
    chosen: Optional[CandidateResult]  # None when the sweep only generated
    flags: List[str]
    generated: int = 0
    reused: int = 0
    generations: Dict[str, List[Generation]] = field(default_factory=dict)


class Sweep:
    """One sweep over one recipe; backend and scorers load only when work needs them."""

    def __init__(self, config: SweepConfig, backend=None, scorers: Optional[List[Scorer]] = None):
        self.read = SweepInputs(config, {given_scorer_name(s): s for s in scorers or []})
        self.config, self.recipe, self.recipe_text = self.read.config, self.read.recipe, self.read.recipe_text
        self.splits, self.inputs = self.read.splits, self.read.fingerprints
        self.generation_template = self.read.generation_template
        self.store = Store(self.config.out / "cache")
        self.keys = Keys(self.config, self.recipe_text, self.inputs, self.splits, self.generation_template)
        executor = Sharded if self.config.gpus is not None else InProcess
        self.executor = executor(self.config, self.read.backend_recipe_text, self.recipe, self.keys, self.store, backend)
        self.scoring = Scoring(self.config, self.keys, self.store, scorers)
        self.generations: Dict[str, List[Generation]] = {}  # by label, as the report writes them
        self._evaluated: Dict[tuple, CandidateResult] = {}
        self._ran = False
        self.read.check_candidates(lambda alpha: self.executor.has(alpha, "select"))

    @property
    def backend(self):
        return self.executor.backend

    @property
    def startup_seconds(self) -> List[float]:
        return self.executor.startup_seconds

    def generation_key(self, alpha: Optional[float], split: Split) -> str:
        return self.keys.generation(alpha, split)

    def evaluate(self, alpha: Optional[float], split: Split) -> CandidateResult:
        """Generate, score, measure and summarize one candidate on one split (memoized)."""
        if (alpha, split) in self._evaluated:
            return self._evaluated[(alpha, split)]
        baseline = None if alpha == 0 else self.evaluate(0.0, split)
        rows = self.executor.rows(alpha, split)
        self.scoring.score(alpha, split, rows)
        self.generations[label(alpha)] = self.generations.get(label(alpha), []) + rows
        kl_rows = self.executor.kl_rows([alpha])[alpha] if split == "select" and alpha is not None else None
        result = summarize(alpha, split, rows, baseline_rows=self.generations["alpha=0"], kl_rows=kl_rows)
        result.timing = {  # zero for what came from the store
            "load_s": self.executor.load_seconds.get((alpha, split), 0.0),
            "generate_s": self.executor.generate_seconds.get((alpha, split), 0.0),
            "score_s": self.scoring.seconds.get((alpha, split), 0.0),
        }
        if baseline is not None:
            result = mark_collapse(result, baseline, self.config.selector)
        self._evaluated[(alpha, split)] = result
        selected = result.scores[self.config.selector]
        LOG.info(
            "%s on %s prompts: %s %.3f +- %.3f, %.0f tokens, %.0f%% cut%s", result.label, split, self.config.selector,
            selected.mean, selected.stderr, result.mean_tokens, 100 * result.length_cut_share,
            " (collapsed: " + "; ".join(result.collapse_reasons) + ")" if result.collapsed else "",
        )
        return result

    def run(self) -> SweepOutcome:
        """The output folder is checked before anything (the lock file too) is written there."""
        if self._ran:
            raise SweepReusedError(
                "this Sweep has run already; build a new Sweep(config) to run again (it reads the "
                "recipe, models, prompts and scorers afresh)"
            )
        self._ran = True
        check_output_folder(self.config.out, self.read.paths())
        with writing(self.config.out), SweepLock(self.config.out) as lock:
            self.executor.lock_token = lock.token
            return self._run_locked()

    def _run_locked(self) -> SweepOutcome:
        """The previous report stays until this one is complete and replaces it (write_report)."""
        config = self.config
        finish_report_swap(config.out)  # one a killed sweep left midway
        judge = self._check_everything()
        try:
            results = self._grid() if config.alphas is not None else self._search()
            if results is None:  # generate_only
                self._check_inputs_unchanged()
                return self._outcome([], None, [])
            selection = config.selection
            results = selection.annotate(results)
            chosen = choose_alpha(results, selection)
            results += self._report_split(chosen)
        finally:
            self.executor.release()
            self.scoring.release()

        def report() -> List[str]:
            flags = selection.problems(results) + reward_hacking_flags(results, chosen, config.selector)
            flags += other_rule_flags(results, chosen, selection) + judge_flags(results, chosen)
            flags += capability_flags(results, chosen)
            self._check_inputs_unchanged()
            write_report(config.out, results, chosen, self.recipe_text, selection, flags, self.generations,
                         {"startup_s": self.startup_seconds}, self.inputs, recipe_subject(self.read.given_recipe))
            return flags

        flags = report()
        if judge is not None or config.lm_eval is not None:  # the scores' report stands if these fail
            if judge is not None:
                split = "report" if self.splits["report"] else "select"
                results = judge_results(judge, results, split, self.executor.rows, self.keys, self.store)
            if config.lm_eval is not None:
                results = capability_results(config, self.recipe_text, self.recipe, results, chosen, self.keys, self.store)
            chosen = next(r for r in results if r.split == "select" and r.alpha == chosen.alpha)
            flags = report()
        self.store.keep_inputs(self.inputs)
        print_table(results, chosen, selection)
        return self._outcome(results, chosen, flags)

    def _check_everything(self):
        """Before the first generation, not after it: the inputs against the last sweep here,
        the scorers, the lm-eval tasks, the judge (returned, ready)."""
        for name in describe_changes(self.store.last_inputs(), self.inputs):
            LOG.warning("%s changed since the last sweep in %s: its results are redone", name, self.config.out)
        self.scoring.check()
        if self.config.lm_eval is not None:
            from expo_eval.capability import check_tasks

            check_tasks(self.config.lm_eval)
        if self.config.judge is None:
            return None
        from expo_eval.judge import Judge

        judge = Judge(self.config.judge)
        judge.check()
        return judge

    def _grid(self) -> Optional[List[CandidateResult]]:
        """Every candidate generated with its KL samples, the engine released, then everything scored."""
        config = self.config
        alphas: List[Optional[float]] = sorted(set(config.alphas) | ({0.0} if not config.generate_only else set()))
        alphas += [None] if config.include_sft else []
        # alpha 0 and the SFT model are always reported: their held-out responses now, no second switch
        self.executor.generate([(a, split) for a in alphas for split in ("select", "report")
                                if split == "select" or (self.splits["report"] and a in (0.0, None))])
        self.executor.kl_rows(alphas)
        self.executor.release()
        if config.generate_only:
            return None
        return [self.evaluate(a, "select") for a in sorted(alphas, key=order)]

    def _search(self) -> List[CandidateResult]:
        """Generation and scoring alternate: the engine leaves the reward models room."""
        from expo_eval.scoring import reward_model_bytes

        self.executor.reward_bytes = reward_model_bytes(self.config.reward_models)
        evaluate = lambda alpha: self.evaluate(alpha, "select")  # noqa: E731
        baseline = evaluate(0.0)
        results = [baseline, *search_alphas(evaluate, self.config.search, self.config.selection, baseline)]
        return results + ([evaluate(None)] if self.config.include_sft else [])

    def _report_split(self, chosen: CandidateResult) -> List[CandidateResult]:
        """alpha 0, the chosen alpha (and the SFT model) on the held-out prompts."""
        if not self.splits["report"]:
            return []
        reported = sorted({0.0, chosen.alpha} | ({None} if self.config.include_sft else set()), key=order)
        if not all(self.executor.has(a, "report") for a in reported):
            self.scoring.release()  # the engine comes back: the reward models make room
        self.executor.generate([(a, "report") for a in reported])
        self.executor.release()
        return [self.evaluate(a, "report") for a in reported]

    def _check_inputs_unchanged(self) -> None:
        """Fingerprint the inputs again before a report: an input merged again or edited while
        the sweep ran may have been read in either state, so nothing this run measured is
        kept under the fingerprint taken at the start."""
        changed = describe_changes(self.inputs, self.read.fingerprint())
        if changed:
            self.store.take_back()
            raise InputsChangedError(
                f"{', '.join(changed)} changed while the sweep ran: its results are not kept; rerun"
            )

    def _outcome(self, results, chosen, flags) -> SweepOutcome:
        counts = self.executor.counts
        return SweepOutcome(results=results, chosen=chosen, flags=flags, generated=counts["generated"],
                            reused=counts["reused"], generations=self.generations)
