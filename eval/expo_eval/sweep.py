"""Run a sweep: candidates -> generation -> scoring -> results.

Generations and scores are cached under DIR/cache by a hash of everything that
determines them, and written atomically as each candidate finishes: an
interrupted sweep resumes where it stopped, and a repeated one generates nothing.

A grid sweep generates every candidate first, releases the model (or vLLM engine),
then loads the reward models and scores: on one GPU the two never compete for
memory. A search alternates, so both stay loaded (the engine is sized for it).
"""

import gc
import hashlib
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from mergekit.config import MergeConfiguration

from expo_eval.backends.base import BackendError
from expo_eval.candidates import Candidates, RecipeError, load_recipe, merge_options
from expo_eval.config import SweepConfig
from expo_eval.files import finish_report_swap, read_text, write_text
from expo_eval.fingerprint import (
    describe_changes,
    function_fingerprint,
    model_fingerprint,
    read_manifest,
    text_fingerprint,
)
from expo_eval.lock import SweepLock
from expo_eval.outdir import check_output_folder, writing
from expo_eval.prompts import Prompt, PromptError, load_prompts, shared_prompts, split_prompts
from expo_eval.records import CandidateResult, Generation, ScoreStats, Split
from expo_eval.report import print_table, write_report
from expo_eval.scoring import (
    FUNCTION_SPEC,
    Scorer,
    ScorerError,
    check_scores,
    given_scorer_fingerprint,
    given_scorer_name,
    load_scorer,
    split_objective,
)
from expo_eval.search import (
    capability_flags,
    choose_alpha,
    judge_flags,
    other_rule_flags,
    mark_collapse,
    repetition,
    reward_hacking_flags,
    search_alphas,
)
from expo_eval.shards import generate_sharded
from mergekit_expo.errors import ExpoError
from mergekit_expo.merged_tokenizer import tokenizer_models
from mergekit_expo.run import MergeError, check_inputs, describe

def digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def label(alpha: Optional[float]) -> str:
    """`sft`, or `alpha=0.3`: short where that is exact, the float's full repr where not,
    so two different alphas never share a label (or a generations file)."""
    if alpha is None:
        return "sft"
    short = f"{alpha:g}"
    return f"alpha={short if float(short) == alpha else repr(alpha)}"


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
        self._given = config  # its paths as given name the inputs (and so key the cache)
        self.config = config = _absolute_paths(config)
        self.recipe_text = read_text(config.recipe, RecipeError)  # as written: it keys the cache and goes in the report
        self._given_recipe = load_recipe(self.recipe_text)
        self.recipe = _absolute_models(self._given_recipe)
        # what backends in other processes (vLLM's workers) plan: the models found here
        self._backend_recipe_text = self.recipe_text if self.recipe == self._given_recipe else self.recipe.to_yaml()
        self.merge_options = merge_options(config.trust_remote_code)
        try:
            check_inputs(self.recipe, self.merge_options)  # the merge's own checks, before anything
        except (ValueError, OSError) as error:
            raise MergeError(describe(error)) from None
        self.splits = self._prompt_splits()
        self._backend = backend
        self._owns_backend = backend is None
        self._given_scorers = {given_scorer_name(s): s for s in scorers or []}
        self._scorers = dict(self._given_scorers)
        self._loaded_alpha: object = object()
        self.load_seconds: Dict[tuple, float] = {}  # switching to the candidate
        self.generate_seconds: Dict[tuple, float] = {}
        self.score_seconds: Dict[tuple, float] = {}  # reward models' loading excluded
        self.startup_seconds: List[float] = []  # one per model or engine built
        self.cache = config.out / "cache"
        self.outcome_counts = {"generated": 0, "reused": 0}
        self.generations: Dict[str, List[Generation]] = {}
        self._rows: Dict[tuple, List[Generation]] = {}
        self._evaluated: Dict[tuple, CandidateResult] = {}
        self._reward_bytes: Optional[int] = None  # set while reward models share the device
        self._judge = None  # an LLM judge, set up when the sweep starts
        self._ran = False
        self._written: List[Path] = []  # the cache entries this run wrote
        self.chat_template = read_text(config.chat_template, BackendError) if config.chat_template else None
        self.generation_template = self._generation_template()
        self.inputs = self._fingerprints()
        self._check_candidates()

    def _check_candidates(self) -> None:
        """Stop before the first generation, naming the alpha, where a candidate the sweep
        would build fails the merge's per-tensor checks (NaN or Inf inputs, a result its
        dtype cannot hold): the merge would refuse that alpha, and a grid with a hole is
        not the sweep that was asked for. Each element of theta1 + alpha * delta is linear
        in alpha, so the largest magnitudes lie at the ends of the alphas swept: two
        candidates built and discarded prove the rest (each is checked again when it is
        built). An end already generated passed then and is not built again."""
        config = self.config
        if config.alphas is not None:
            alphas = sorted(set(config.alphas) | ({0.0} if not config.generate_only else set()))
        else:  # a search stays in [low, high] (0 < low); alpha 0 is its baseline
            alphas = [0.0, config.search.high]
        ends = [a for a in dict.fromkeys((alphas[0], alphas[-1])) if not self._has_generation(a, "select")]
        if ends:
            Candidates(self.recipe, self.merge_options).check(ends)

    def _fingerprints(self) -> Dict[str, str]:
        """Content fingerprints of everything a cached result depends on, by input name."""
        recipe, given = self.recipe, self._given_recipe  # read where found, named as written
        inputs = {f"theta0 ({given.base_model.model.path})": model_fingerprint(recipe.base_model.model.path)}
        for model, named in zip(recipe.models or [], given.models or []):
            if model.model != recipe.base_model:
                inputs[f"aligned model ({named.model.model.path})"] = model_fingerprint(model.model.model.path)
        for path in tokenizer_models(given):
            inputs[f"tokenizer source ({path})"] = model_fingerprint(_absolute_folder(path))
        if self.chat_template is not None:
            inputs[f"chat template ({self._given.chat_template})"] = text_fingerprint(self.chat_template)
        for name in self.config.reward_models:
            if name in self._given_scorers:  # an object passed in: its own fingerprint, or no cache
                fingerprint = given_scorer_fingerprint(self._given_scorers[name])
            elif FUNCTION_SPEC.match(name):
                fingerprint = function_fingerprint(name)
            else:
                fingerprint = model_fingerprint(name)
            inputs[f"scorer {name}"] = fingerprint
        return inputs

    def _keep(self, path: Path, text: str) -> None:
        """Write a cache entry, remembered: it is removed if an input changes under the run."""
        write_text(path, text)
        self._written.append(path)

    def _check_inputs_unchanged(self) -> None:
        """Fingerprint the inputs again (cheap: digests are cached by stat) before a report: an
        input merged again or edited while the sweep ran may have been read in either state,
        so nothing this run measured is kept under the fingerprint taken at the start."""
        changed = describe_changes(self.inputs, self._fingerprints())
        if changed:
            for path in self._written:
                path.unlink(missing_ok=True)
            raise InputsChangedError(
                f"{', '.join(changed)} changed while the sweep ran: its results are not kept; rerun"
            )

    def _note_changed_inputs(self) -> None:
        """One line per input that changed since the last finished sweep into this folder."""
        for name in describe_changes(read_manifest(self.cache / "inputs.json"), self.inputs):
            LOG.warning("%s changed since the last sweep in %s: its results are redone", name, self.config.out)

    def _input_paths(self) -> Dict[str, Path]:
        """Every local file or folder the sweep reads, described: the output folder must not
        be, contain or lie inside one (a hub ID or a function scorer is no path)."""
        config, recipe = self.config, self.recipe
        theta0 = recipe.base_model.model.path
        paths = {f"the recipe {config.recipe}": config.recipe, f"the theta0 folder {theta0}": theta0}
        for model in recipe.models or []:
            if model.model != recipe.base_model:
                paths[f"the aligned model's folder {model.model.model.path}"] = model.model.model.path
        for path in tokenizer_models(recipe):
            paths[f"the tokenizer source's folder {path}"] = path
        if config.chat_template is not None:
            paths[f"the chat template file {config.chat_template}"] = config.chat_template
        for name in config.reward_models:
            paths[f"the reward model's folder {name}"] = split_objective(name)[0]
        for prompts in filter(None, (config.prompts, config.select_prompts, config.report_prompts)):
            paths[f"the prompt file {prompts}"] = prompts
        return {what: Path(path) for what, path in paths.items() if Path(path).exists()}

    def _prompt_splits(self) -> Dict[Split, List[Prompt]]:
        """The select prompts (they choose alpha) and the held-out report prompts, which must
        not share a prompt with them: the report would not be held out."""
        config = self.config
        if config.select_prompts or config.report_prompts:
            sources = {
                split: (f"--{split}-prompts", spec) if spec else ("--prompts", config.prompts)
                for split, spec in (("select", config.select_prompts), ("report", config.report_prompts))
            }
            select, report = (load_prompts(sources[split][1], config.limit) for split in ("select", "report"))
            shared = shared_prompts(report, select)
            if shared:
                raise PromptError(
                    "{} {} shares {} of its {} prompts with the select prompts ({} {}): held-out prompts "
                    "must be disjoint; drop the shared ones, or give one set with --prompts and let "
                    "--select-fraction split it".format(*sources["report"], shared, len(report), *sources["select"])
                )
            return {"select": select, "report": report}
        select, report = split_prompts(load_prompts(config.prompts, config.limit), config.select_fraction)
        return {"select": select, "report": report}

    def _generation_template(self):
        """The chat template the backends render prompts with: the one the merge writes
        (the recipe's `chat_template:` and tokenizer settings), or --chat-template's."""
        from expo_eval.backends.hf import check_chat_template, load_tokenizer

        tokenizer = load_tokenizer(self.recipe, self.chat_template, self.merge_options)
        first = next(iter([*self.splits["select"], *self.splits["report"]]), None)
        if first is not None:
            source = (f"the chat template file {self.config.chat_template}" if self.config.chat_template
                      else f"the chat template the merge of {self.config.recipe} writes")
            check_chat_template(tokenizer, first.messages, source)
        return tokenizer.chat_template

    @property
    def backend(self):
        if self._backend is None:
            from expo_eval.backends import make_backend

            started = time.perf_counter()
            self._backend = make_backend(
                self.config, self._backend_recipe_text, self.recipe, reward_bytes=self._reward_bytes
            )
            self.startup_seconds.append(time.perf_counter() - started)
            LOG.info("%s backend ready in %.1f s", self.config.backend, self.startup_seconds[-1])
        return self._backend

    def release_backend(self) -> None:
        """Free the generating model (and the engine's processes and GPU memory)."""
        if self._backend is not None and self._owns_backend:
            self._backend.close()
            self._backend = None
            self._loaded_alpha = object()
            _free_memory()

    def release_scorers(self) -> None:
        self._scorers = dict(self._given_scorers)
        _free_memory()

    def check_scorer(self, name: str) -> None:
        """Fail now, not after hours of generation, on a scorer that cannot score."""
        from expo_eval.scoring import check_scorer

        if name not in self._given_scorers:
            check_scorer(name, trust_remote_code=self.config.trust_remote_code)

    def scorer(self, name: str) -> Scorer:
        if name not in self._scorers:
            self._scorers[name] = load_scorer(
                name, device=self.config.device or "cpu", trust_remote_code=self.config.trust_remote_code
            )
        return self._scorers[name]

    # -- one candidate -----------------------------------------------------------------

    def generation_key(self, alpha: Optional[float], split: Split) -> str:
        models = {name: value for name, value in self.inputs.items() if not name.startswith("scorer ")}
        return digest(
            {
                "recipe": self.recipe_text,
                "inputs": models,  # checkpoint and chat-template contents, not their paths
                "alpha": alpha,
                "split": split,  # a row records its split: a report row is never a select row
                "prompts": [p.id for p in self.splits[split]],
                "chat_template": self.generation_template,  # the text prompts are rendered with
                "sampling": self.config.sampling.model_dump(),
                "backend": self.config.backend,
                "device": self.config.device,
                "max_model_len": self.config.engine.max_model_len,  # can cut prompts and responses
                "materialize": self.config.materialize,
            }
        )

    def _has_generation(self, alpha: Optional[float], split: Split) -> bool:
        return (alpha, split) in self._rows or (self.cache / f"{self.generation_key(alpha, split)}.jsonl").exists()

    def score_path(self, alpha: Optional[float], split: Split, name: str):
        key = digest({"scorer": name, "contents": self.inputs[f"scorer {name}"]})
        return self.cache / f"{self.generation_key(alpha, split)}.{key}.scores.json"

    def _cached_rows(self, path, split: Split) -> Optional[List[Generation]]:
        """The cached generations, or None (with a warning) when the entry is damaged."""
        expected = [p.id for p in self.splits[split]]
        try:
            rows = [Generation.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines()]
            problem = None if [r.prompt_id for r in rows] == expected else (
                f"{len(rows)} rows for {len(expected)} prompts" if len(rows) != len(expected) else "other prompts"
            )
        except (ValueError, OSError) as error:  # pydantic's ValidationError is a ValueError
            problem = f"unreadable ({str(error).splitlines()[0]})"
        if problem is None:
            return rows
        LOG.warning("Discarding damaged cache entry %s (%s); generating it again", path, problem)
        _remove(path)
        return None

    def _generate(self, alpha: Optional[float], split: Split) -> List[Generation]:
        if (alpha, split) in self._rows:
            return self._rows[(alpha, split)]
        key = self.generation_key(alpha, split)
        path = self.cache / f"{key}.jsonl"
        rows = self._cached_rows(path, split) if path.exists() else None
        if rows is not None:
            self.outcome_counts["reused"] += 1
            self._rows[(alpha, split)] = rows
            timing = path.with_suffix(".timing.json")  # when it was generated (by a shard, say)
            if timing.exists():
                try:
                    cached = json.loads(timing.read_text())
                    self.load_seconds[(alpha, split)] = float(cached["load_s"])
                    self.generate_seconds[(alpha, split)] = float(cached["generate_s"])
                except (ValueError, KeyError, TypeError):
                    pass
            return rows
        prompts = self.splits[split]
        if self._loaded_alpha != alpha:
            backend = self.backend  # loading the model itself is not switching candidates
            started = time.perf_counter()
            backend.load_candidate(alpha)
            self.load_seconds[(alpha, split)] = time.perf_counter() - started
            self._loaded_alpha = alpha
        started = time.perf_counter()
        completions = self.backend.generate([p.messages for p in prompts], self.config.sampling)
        self.generate_seconds[(alpha, split)] = time.perf_counter() - started
        rows = [
            Generation(
                prompt_id=p.id,
                split=split,
                prompt=p.text,
                response=c.text,
                tokens=c.tokens,
                finish_reason=c.finish_reason,
            )
            for p, c in zip(prompts, completions)
        ]
        if split == "select" and alpha is not None:  # the candidate is loaded: its own log-probabilities now
            self._logprobs(alpha, split, rows, under_sft=False)
        timing = {"load_s": self.load_seconds.get((alpha, split), 0.0), "generate_s": self.generate_seconds[(alpha, split)]}
        self._keep(path.with_suffix(".timing.json"), json.dumps(timing))
        self._keep(path, "".join(row.model_dump_json() + "\n" for row in rows))
        self.outcome_counts["generated"] += 1
        self._rows[(alpha, split)] = rows
        return rows

    def _switch(self, alpha: Optional[float]) -> None:
        if self._loaded_alpha != alpha:
            self.backend.load_candidate(alpha)
            self._loaded_alpha = alpha

    def _logprobs(self, alpha: Optional[float], split: Split, rows: List[Generation], under_sft: bool) -> None:
        """Each row's log p(response | prompt) under its candidate, or under theta0 (cached)."""
        field = "logprob_sft" if under_sft else "logprob"
        path = self.cache / f"{self.generation_key(alpha, split)}.{field}.json"
        values = self._cached_scores(path, len(rows)) if path.exists() else None
        if values is None:
            self._switch(None if under_sft else alpha)
            prompts = {p.id: p for p in self.splits[split]}
            values = self.backend.response_logprobs(
                [prompts[r.prompt_id].messages for r in rows], [(r.response, r.finish_reason == "stop") for r in rows]
            )
            self._keep(path, json.dumps(values))
        for row, value in zip(rows, values):
            setattr(row, field, value)

    def measure_kl(self, alphas: Sequence[Optional[float]], split: Split = "select") -> None:
        """KL(candidate || theta0) for every candidate: its own log-probabilities first
        (switching to it where they are missing), then theta0's, with one switch to theta0."""
        alphas = [a for a in alphas if a is not None]
        for alpha in alphas:
            self._logprobs(alpha, split, self._generate(alpha, split), under_sft=False)
        for alpha in alphas:
            self._logprobs(alpha, split, self._generate(alpha, split), under_sft=True)

    def generate(self, alphas: Sequence[Optional[float]], split: Split) -> None:
        """Generate (or find in the cache) every candidate's responses, scoring nothing."""
        for alpha in alphas:
            self._generate(alpha, split)

    def _score(self, alpha: Optional[float], split: Split, rows: List[Generation]) -> None:
        prompts = {p.id: p for p in self.splits[split]}
        for name in self.config.reward_models:
            cacheable = self.inputs[f"scorer {name}"] is not None
            path = self.score_path(alpha, split, name)
            values = self._cached_scores(path, len(rows)) if cacheable and path.exists() else None
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
                self.score_seconds[(alpha, split)] = self.score_seconds.get((alpha, split), 0.0) + time.perf_counter() - started
                values = check_scores(name, values, ordered)  # before anything is cached
                if cacheable:
                    self._keep(path, json.dumps(values))
            for row, value in zip(rows, values):
                row.scores[name] = value

    def _cached(self, path, valid: Callable[[object], bool]):
        """A cache entry that `valid` accepts, or None (with a warning, the entry removed) when
        it is damaged; None too when there is none."""
        if not path.exists():
            return None
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            if valid(values):
                return values
        except (ValueError, OSError):
            pass
        LOG.warning("Discarding damaged cache entry %s; computing it again", path)
        _remove(path)
        return None

    def _cached_scores(self, path, count: int) -> Optional[List[float]]:
        """Cached scores: one finite number per response."""
        return self._cached(path, lambda values: isinstance(values, list) and len(values) == count and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ))

    def evaluate(self, alpha: Optional[float], split: Split) -> CandidateResult:
        """Generate, score and summarize one candidate on one split (memoized)."""
        if (alpha, split) in self._evaluated:
            return self._evaluated[(alpha, split)]
        baseline = None if alpha == 0 else self.evaluate(0.0, split)
        rows = self._generate(alpha, split)
        self._score(alpha, split, rows)
        self.generations[label(alpha)] = self.generations.get(label(alpha), []) + rows
        result = summarize(alpha, split, rows, baseline_rows=self.generations["alpha=0"])
        result.timing = {  # zero for what came from the cache
            "load_s": self.load_seconds.get((alpha, split), 0.0),
            "generate_s": self.generate_seconds.get((alpha, split), 0.0),
            "score_s": self.score_seconds.get((alpha, split), 0.0),
        }
        if baseline is not None:
            result = mark_collapse(result, baseline, self.config.selector)
        self._evaluated[(alpha, split)] = result
        selected = result.scores[self.config.selector]
        LOG.info(
            "%s on %s prompts: %s %.3f +- %.3f, %.0f tokens, %.0f%% cut%s",
            result.label,
            split,
            self.config.selector,
            selected.mean,
            selected.stderr,
            result.mean_tokens,
            100 * result.length_cut_share,
            " (collapsed: " + "; ".join(result.collapse_reasons) + ")" if result.collapsed else "",
        )
        return result

    # -- the whole sweep -----------------------------------------------------------------

    def run(self) -> SweepOutcome:
        """The output folder is checked before anything (the lock file too) is written there."""
        if self._ran:
            raise SweepReusedError(
                "this Sweep has run already; build a new Sweep(config) to run again (it reads the "
                "recipe, models, prompts and scorers afresh)"
            )
        self._ran = True
        config = self.config
        check_output_folder(config.out, self._input_paths())
        with writing(config.out), SweepLock(config.out) as self._lock:
            return self._run_locked(print_table, write_report)

    def _run_locked(self, print_table, write_report) -> SweepOutcome:
        """The previous report stays until this one is complete and replaces it (write_report)."""
        config = self.config
        finish_report_swap(config.out)  # one a killed sweep left midway
        self._note_changed_inputs()
        for name in config.reward_models:  # before the first generation, not after it
            self.check_scorer(name)
        if config.lm_eval is not None:
            from expo_eval.capability import check_tasks

            check_tasks(config.lm_eval)
        if config.judge is not None:
            from expo_eval.judge import Judge

            self._judge = Judge(config.judge)
            self._judge.check()
        try:
            if config.alphas is not None:
                results = self._grid()
                if results is None:
                    self._check_inputs_unchanged()
                    return self._outcome([], None, [])
            else:
                results = self._search()
            selection = config.selection
            results = selection.annotate(results)
            chosen = choose_alpha(results, selection)
            reported = sorted({0.0, chosen.alpha} | ({None} if config.include_sft else set()), key=_order)
            if self.splits["report"]:
                if not all(self._has_generation(a, "report") for a in reported):
                    self.release_scorers()  # the engine comes back: the reward models make room
                self.generate(reported, "report")
                self.release_backend()
                results += [self.evaluate(a, "report") for a in reported]
        finally:
            self.release_backend()
            self.release_scorers()
        timing = {"startup_s": self.startup_seconds}

        def report() -> List[str]:
            flags = selection.problems(results) + reward_hacking_flags(results, chosen, config.selector)
            flags += other_rule_flags(results, chosen, selection) + judge_flags(results, chosen)
            flags += capability_flags(results, chosen)
            self._check_inputs_unchanged()
            write_report(config.out, results, chosen, self.recipe_text, selection, flags, self.generations, timing,
                         self.inputs)
            return flags

        flags = report()
        if self._judge is not None or config.lm_eval is not None:  # the scores' report stands if these fail
            if self._judge is not None:
                results = self.judge(results)
            if config.lm_eval is not None:
                results = self.capability(results, chosen)
            chosen = next(r for r in results if r.split == "select" and r.alpha == chosen.alpha)
            flags = report()
        write_text(self.cache / "inputs.json", json.dumps(self.inputs, indent=2) + "\n")  # what this result used
        print_table(results, chosen, selection)
        return self._outcome(results, chosen, flags)

    def judge(self, results: List[CandidateResult]) -> List[CandidateResult]:
        """The judge's verdict on every reported candidate against alpha = 0, on the held-out
        prompts where there are some; cached by both generations and the judge's prompt."""
        from expo_eval.judge import summarize

        split = "report" if self.splits["report"] else "select"
        baseline = self._rows[(0.0, split)]
        judged = []
        for r in results:
            if r.split == split and r.alpha != 0:
                rows = self._rows[(r.alpha, split)]
                key = digest({"judge": self._judge.fingerprint, "candidate": self.generation_key(r.alpha, split),
                              "baseline": self.generation_key(0.0, split)})
                path = self.cache / f"{key}.judge.json"
                preferences = self._cached_preferences(path, len(rows))
                fresh = preferences is None
                if fresh:
                    preferences = self._judge.preferences(
                        [g.prompt for g in rows], [g.response for g in baseline], [g.response for g in rows]
                    )
                stats = summarize(preferences, [g.response for g in baseline], [g.response for g in rows], self._judge.config.model)
                if fresh:  # only a verdict that summarizes is kept
                    self._keep(path, json.dumps(preferences))
                r = r.model_copy(update={"judge": stats})
            judged.append(r)
        return judged

    def capability(self, results: List[CandidateResult], chosen: CandidateResult) -> List[CandidateResult]:
        """lm-eval's tasks on alpha 0 and the chosen alpha (or every alpha), each candidate built in
        place in a transformers model (whatever the generation backend); cached by the candidate's
        inputs, the task settings and the contents of the task files and the data they name."""
        from expo_eval.backends import make_backend
        from expo_eval.capability import run_lm_eval, task_fingerprint

        settings = self.config.lm_eval
        select = [r for r in results if r.split == "select" and r.alpha is not None]
        alphas = [r.alpha for r in select] if settings.every_alpha else sorted({0.0, chosen.alpha})
        tasks = {
            "settings": settings.model_dump(mode="json", exclude={"every_alpha", "batch_size"}),
            "files": task_fingerprint(settings),
        }
        models = {name: value for name, value in self.inputs.items() if not name.startswith("scorer ")}
        measured, backend = {}, None
        try:
            for alpha in alphas:
                path = self.cache / f"{digest({'recipe': self.recipe_text, 'inputs': models, 'alpha': alpha, 'tasks': tasks})}.lm_eval.json"
                measured[alpha] = self._cached_capability(path)
                if measured[alpha] is None:
                    if backend is None:
                        backend = make_backend(self.config.model_copy(update={"backend": "transformers", "materialize": False}), self.recipe_text, self.recipe)
                    backend.load_candidate(alpha)
                    measured[alpha] = run_lm_eval(backend.model, backend.tokenizer, settings, backend.device)
                    self._keep(path, json.dumps(measured[alpha]))
        finally:
            if backend is not None:
                backend.close()
                _free_memory()
        return [
            r.model_copy(update={"capability": measured[r.alpha]}) if r.split == "select" and r.alpha in measured else r
            for r in results
        ]

    def _cached_capability(self, path) -> Optional[Dict[str, Dict[str, float]]]:
        """Cached lm-eval results: finite numbers by metric, by task."""
        return self._cached(path, lambda values: isinstance(values, dict) and all(
            isinstance(metrics, dict) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
            for metrics in values.values()
        ))

    def _cached_preferences(self, path, count: int) -> Optional[List[Optional[float]]]:
        """Cached judge verdicts: alpaca_eval preferences (or None), one per prompt."""
        return self._cached(path, lambda values: isinstance(values, list) and len(values) == count
                            and all(v in (None, 1.0, 1.5, 2.0) for v in values))

    def _grid(self) -> Optional[List[CandidateResult]]:
        """Every candidate generated, the engine released, then everything scored."""
        config = self.config
        alphas: List[Optional[float]] = sorted(set(config.alphas) | ({0.0} if not config.generate_only else set()))
        alphas += [None] if config.include_sft else []
        if config.gpus is not None:  # every GPU group fills the shared cache in its own process
            missing = [a for a in alphas if not self._has_generation(a, "select")]
            generate_sharded(config, alphas, self._lock.token)
            self.outcome_counts["generated"] += sum(self._has_generation(a, "select") for a in missing)
            self.outcome_counts["reused"] -= sum(self._has_generation(a, "select") for a in missing)
        for alpha in alphas:  # alpha 0 and the SFT model are always reported: no second switch
            self._generate(alpha, "select")
            if self.splits["report"] and alpha in (0.0, None):
                self._generate(alpha, "report")
        self.measure_kl(alphas)
        self.release_backend()
        if config.generate_only:
            return None
        return [self.evaluate(a, "select") for a in sorted(alphas, key=_order)]

    def _search(self) -> List[CandidateResult]:
        """Generation and scoring alternate: the engine leaves the reward models room. Each
        candidate's KL is measured before it is summarized: the rule may need it to bisect."""
        from expo_eval.scoring import reward_model_bytes

        config = self.config
        self._reward_bytes = reward_model_bytes(config.reward_models)

        def evaluate(alpha: Optional[float]) -> CandidateResult:
            self.measure_kl([alpha])
            return self.evaluate(alpha, "select")

        baseline = evaluate(0.0)
        results = [baseline, *search_alphas(evaluate, config.search, config.selection, baseline)]
        if config.include_sft:
            results.append(evaluate(None))
        return results

    def _outcome(self, results, chosen, flags) -> SweepOutcome:
        return SweepOutcome(
            results=results,
            chosen=chosen,
            flags=flags,
            generated=self.outcome_counts["generated"],
            reused=self.outcome_counts["reused"],
            generations=self.generations,
        )


def _absolute_paths(config: SweepConfig) -> SweepConfig:
    """The config with its paths made absolute against the working directory now: a Sweep
    built in one folder and run from another reads and writes what it was built with."""
    update = {"recipe": config.recipe.absolute(), "out": config.out.absolute()}
    if config.chat_template is not None:
        update["chat_template"] = config.chat_template.absolute()
    for field_name in ("prompts", "select_prompts", "report_prompts"):
        spec = getattr(config, field_name)
        if spec is not None and spec not in ("smoke", "ultrafeedback", "alpaca_eval") and Path(spec).is_file():
            update[field_name] = str(Path(spec).absolute())
    return config.model_copy(update=update)


def _absolute_models(recipe: MergeConfiguration) -> MergeConfiguration:
    """The recipe with each relative model folder made absolute (as mergekit reads it: against
    the working directory), for the same reason; a Hub ID stays as it is."""

    def absolute(model):
        path = _absolute_folder(model.model.path)
        if path == model.model.path:
            return model
        return model.model_copy(update={"model": model.model.model_copy(update={"path": path})})

    models = [m.model_copy(update={"model": absolute(m.model)}) for m in recipe.models] if recipe.models else recipe.models
    return recipe.model_copy(update={"base_model": absolute(recipe.base_model), "models": models})


def _absolute_folder(path: str) -> str:
    """A relative local folder made absolute against the working directory; a Hub ID as it is."""
    return path if os.path.isabs(path) or not os.path.isdir(path) else os.path.abspath(path)


def _remove(path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _kl(rows: List[Generation]) -> dict:
    """KL(candidate || theta0) = E_y~candidate[log p_candidate(y) - log p_theta0(y)], per
    response, with its standard error; nothing when the log-probabilities are missing."""
    gaps = [r.logprob - r.logprob_sft for r in rows if r.logprob is not None and r.logprob_sft is not None]
    if len(gaps) != len(rows) or not gaps:
        return {}
    spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    return {"kl": statistics.fmean(gaps), "kl_stderr": spread / len(gaps) ** 0.5}


def _order(alpha: Optional[float]) -> float:
    """SFT (None) first, then alphas ascending."""
    return -2.0 if alpha is None else alpha


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(
    alpha: Optional[float],
    split: Split,
    rows: List[Generation],
    baseline_rows: Optional[List[Generation]] = None,
) -> CandidateResult:
    baseline = {(r.prompt_id, r.split): r for r in baseline_rows or []}
    scores = {}
    for name in rows[0].scores:
        values = [r.scores[name] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        paired = [(r.scores[name], baseline[(r.prompt_id, split)].scores[name]) for r in rows if (r.prompt_id, split) in baseline]
        win_rate = (
            sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in paired) / len(paired) if paired else None
        )
        scores[name] = ScoreStats(
            mean=statistics.fmean(values),
            median=statistics.median(values),
            stderr=spread / len(values) ** 0.5,
            win_rate=win_rate,
        )
    return CandidateResult(
        alpha=alpha,
        label=label(alpha),
        split=split,
        n=len(rows),
        scores=scores,
        mean_tokens=statistics.fmean(r.tokens for r in rows),
        length_cut_share=sum(r.finish_reason == "length" for r in rows) / len(rows),
        repetition=statistics.fmean(repetition(r.response) for r in rows),
        **_kl(rows),
    )
