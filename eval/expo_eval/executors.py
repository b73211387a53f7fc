"""Where candidates are generated: one interface, the sweep does not know where it runs.

An executor generates candidates on a split and hands back rows, each select candidate
with its KL samples (plain samples, their log-probability under it and under theta0),
and keeps all of it in the store. `InProcess` runs one backend (transformers, or a vLLM
engine whose workers swap weights in place); `Sharded` first has one generate-only process
per GPU group fill the store (`--gpus`), then finds its work there.
"""

import gc
import logging
import time
from typing import Dict, List, Optional, Sequence, Tuple

from expo_eval.config import SweepConfig
from expo_eval.keys import Keys, plain_sampling
from expo_eval.prompts import Prompt
from expo_eval.records import Generation, Split
from expo_eval.shards import generate_sharded
from expo_eval.store import Store, numbers, rows_for, valid

LOG = logging.getLogger("expo_eval")

Work = Sequence[Tuple[Optional[float], Split]]  # (alpha, split) in the order to generate them


class InProcess:
    """One backend in this process, built when work first needs it; its weights are switched
    per candidate, and each candidate is switched to once where the store lacks it."""

    lock_token: Optional[str] = None  # the sweep's lock, which processes an executor starts share

    def __init__(self, config: SweepConfig, recipe_text: str, recipe, keys: Keys, store: Store, backend=None):
        self.config, self._recipe_text, self._recipe = config, recipe_text, recipe
        self.keys, self.store = keys, store
        self._backend, self._owns_backend = backend, backend is None
        self.reward_bytes: Optional[int] = None  # set while reward models share the device
        self._loaded: object = object()
        self._rows: Dict[tuple, List[Generation]] = {}
        self._kl: Dict[float, List[Generation]] = {}
        self.counts = {"generated": 0, "reused": 0}  # sample sets, made or found in the store
        self.load_seconds: Dict[tuple, float] = {}  # switching to the candidate
        self.generate_seconds: Dict[tuple, float] = {}
        self.startup_seconds: List[float] = []  # one per model or engine built

    @property
    def backend(self):
        if self._backend is None:
            from expo_eval.backends import make_backend

            started = time.perf_counter()
            self._backend = make_backend(self.config, self._recipe_text, self._recipe, reward_bytes=self.reward_bytes)
            self.startup_seconds.append(time.perf_counter() - started)
            LOG.info("%s backend ready in %.1f s", self.config.backend, self.startup_seconds[-1])
        return self._backend

    def release(self) -> None:
        """Free the generating model (and the engine's processes and GPU memory)."""
        if self._backend is not None and self._owns_backend:
            self._backend.close()
            self._backend = None
            self._loaded = object()
            free_memory()

    def has(self, alpha: Optional[float], split: Split) -> bool:
        return (alpha, split) in self._rows or self.store.has(self.keys.generation(alpha, split), "generations")

    def has_kl(self, alpha: float) -> bool:
        return alpha in self._kl or self.store.has(self.keys.kl_samples(alpha), "kl_samples")

    def generate(self, work: Work) -> None:
        """Every (alpha, split) of `work` generated or found, in order."""
        for alpha, split in work:
            self.rows(alpha, split)

    def rows(self, alpha: Optional[float], split: Split) -> List[Generation]:
        """A candidate's responses on a split (with the paper's sampling settings); a select
        candidate's KL samples are drawn while it is loaded."""
        if (alpha, split) in self._rows:
            return self._rows[(alpha, split)]
        key = self.keys.generation(alpha, split)
        prompts = self.keys.splits[split]
        rows = self.store.read(key, "generations", rows_for([p.id for p in prompts]))
        if rows is not None:
            self.counts["reused"] += 1
            timing = self.store.read(key, "timing", lambda t: None)  # when it was generated (by a shard, say)
            try:
                self.load_seconds[(alpha, split)] = float(timing["load_s"])
                self.generate_seconds[(alpha, split)] = float(timing["generate_s"])
            except (KeyError, TypeError, ValueError):
                pass
        else:
            rows = self._sample(alpha, split, prompts)
            if split == "select" and alpha is not None:
                self._kl_samples(alpha)
            timing = {"load_s": self.load_seconds.get((alpha, split), 0.0), "generate_s": self.generate_seconds[(alpha, split)]}
            self.store.write(key, "timing", timing)
            self.store.write(key, "generations", rows)
            self.counts["generated"] += 1
        self._rows[(alpha, split)] = rows
        return rows

    def _sample(self, alpha: Optional[float], split: Split, prompts: Sequence[Prompt]) -> List[Generation]:
        if self._loaded != alpha:
            self.backend  # built first: building the model is not switching candidates
            started = time.perf_counter()
            self._switch(alpha)
            self.load_seconds[(alpha, split)] = time.perf_counter() - started
        started = time.perf_counter()
        completions = self.backend.generate([p.messages for p in prompts], self.config.sampling)
        self.generate_seconds[(alpha, split)] = time.perf_counter() - started
        return [
            Generation(prompt_id=p.id, split=split, prompt=p.text, response=c.text, tokens=c.tokens,
                       finish_reason=c.finish_reason)
            for p, c in zip(prompts, completions)
        ]

    def _switch(self, alpha: Optional[float]) -> None:
        if self._loaded != alpha:
            self.backend.load_candidate(alpha)
            self._loaded = alpha

    def _kl_samples(self, alpha: float) -> List[Generation]:
        """Plain samples of the candidate on the first `kl_prompts` select prompts, with their
        log-probability under it (taken while it is loaded)."""
        if alpha in self._kl:
            return self._kl[alpha]
        key, prompts = self.keys.kl_samples(alpha), self.keys.kl_prompts()
        expected = rows_for([p.id for p in prompts])
        rows = self.store.read(key, "kl_samples", lambda rows: expected(rows) or (
            None if all(r.logprob is not None and r.token_ids is not None for r in rows) else "log-probabilities missing"
        ))
        self.counts["reused" if rows is not None else "generated"] += 1
        if rows is None:
            self._switch(alpha)
            completions = self.backend.generate([p.messages for p in prompts], plain_sampling(self.config.sampling))
            rows = [
                Generation(prompt_id=p.id, split="select", prompt=p.text, response=c.text, tokens=c.tokens,
                           finish_reason=c.finish_reason, token_ids=c.token_ids)
                for p, c in zip(prompts, completions)
            ]
            for row, value in zip(rows, self._logprobs(prompts, rows)):
                row.logprob = value
            self.store.write(key, "kl_samples", rows)
        self._kl[alpha] = rows
        return rows

    def _logprobs(self, prompts: Sequence[Prompt], rows: Sequence[Generation]) -> List[float]:
        """log p(response | prompt) under the loaded weights, of the token ids sampled."""
        return self.backend.response_logprobs([p.messages for p in prompts], [r.token_ids for r in rows])

    def kl_rows(self, alphas: Sequence[Optional[float]]) -> Dict[float, List[Generation]]:
        """Every candidate's KL samples, with their log-probabilities under it and under theta0:
        each candidate's first (switching to it where they are missing), then theta0's, with
        one switch to theta0. The paper's settings (temperature 0.7, top-k/top-p, penalties)
        sample another distribution, so an estimate from those responses is biased."""
        alphas = [a for a in alphas if a is not None]
        for alpha in alphas:
            self._kl_samples(alpha)
        for alpha in alphas:
            rows = self._kl[alpha]
            if all(r.logprob_sft is not None for r in rows):
                continue
            key = self.keys.kl_samples(alpha)
            values = self.store.read(key, "logprob_sft", valid(numbers(len(rows)), f"{len(rows)} numbers"))
            if values is None:
                self._switch(None)
                values = self._logprobs(self.keys.kl_prompts(), rows)
                self.store.write(key, "logprob_sft", values)
            for row, value in zip(rows, values):
                row.logprob_sft = value
        return {alpha: self._kl[alpha] for alpha in alphas}


class Sharded(InProcess):
    """`--gpus`: one generate-only process per GPU group fills the store with its share of the
    select candidates (and their KL samples) first; what is left runs here."""

    def generate(self, work: Work) -> None:
        alphas = list(dict.fromkeys(alpha for alpha, split in work if split == "select"))
        missing = [a for a in alphas if not self.has(a, "select")]
        missing_kl = [a for a in alphas if a is not None and not self.has_kl(a)]
        generate_sharded(self.config, alphas, self.lock_token)
        made = sum(self.has(a, "select") for a in missing) + sum(map(self.has_kl, missing_kl))
        super().generate(work)
        self.counts["generated"] += made  # by the shards: found in the store here
        self.counts["reused"] -= made


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
