"""The capability guard: lm-eval's tasks on alpha 0 and the chosen alpha (or every alpha),
each candidate built in place in a transformers model (whatever the generation backend);
kept by the candidate's inputs, the task settings and the contents of the task files and
the data they name."""

import math
from typing import Dict, List

from expo_eval.config import SweepConfig
from expo_eval.executors import free_memory
from expo_eval.keys import Keys
from expo_eval.records import CandidateResult
from expo_eval.store import Store, valid


def _finite_results(values) -> bool:
    """Finite numbers by metric, by task."""
    return isinstance(values, dict) and all(
        isinstance(metrics, dict) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
        for metrics in values.values()
    )


def capability_results(config: SweepConfig, recipe_text: str, recipe, results: List[CandidateResult],
                       chosen: CandidateResult, keys: Keys, store: Store) -> List[CandidateResult]:
    from expo_eval.backends import make_backend
    from expo_eval.capability import run_lm_eval, task_fingerprint

    settings = config.lm_eval
    select = [r for r in results if r.split == "select" and r.alpha is not None]
    alphas = [r.alpha for r in select] if settings.every_alpha else sorted({0.0, chosen.alpha})
    tasks = {
        "settings": settings.model_dump(mode="json", exclude={"every_alpha", "batch_size"}),
        "files": task_fingerprint(settings),
    }
    measured: Dict[float, dict] = {}
    backend = None
    try:
        for alpha in alphas:
            key = keys.capability(alpha, tasks)
            measured[alpha] = store.read(key, "lm_eval", valid(_finite_results, "lm-eval results"))
            if measured[alpha] is None:
                if backend is None:
                    backend = make_backend(config.model_copy(update={"backend": "transformers", "materialize": False}),
                                           recipe_text, recipe)
                backend.load_candidate(alpha)
                measured[alpha] = run_lm_eval(backend.model, backend.tokenizer, settings, backend.device)
                store.write(key, "lm_eval", measured[alpha])
    finally:
        if backend is not None:
            backend.close()
            free_memory()
    return [
        r.model_copy(update={"capability": measured[r.alpha]}) if r.split == "select" and r.alpha in measured else r
        for r in results
    ]
