"""Capability guard: lm-evaluation-harness benchmarks on the sweep's in-memory model.

Extrapolation can buy reward at the cost of general ability; running a few lm-eval
tasks on alpha 0 and the chosen alpha shows whether it did. lm-eval is an optional
extra (`pip install 'mergekit-expo[lm-eval]'`), imported only when a run needs it.

Metric names: lm-eval reports `NAME,FILTER` keys (`acc,none`, `exact_match,strict-match`);
they become `NAME` when the filter is `none` and `NAME/FILTER` otherwise (`acc`,
`exact_match/strict-match`). Standard errors are kept as the metrics lm-eval names
them, `acc_stderr` beside `acc` (`exact_match_stderr/strict-match`): with the few
examples a guard runs, a drop means little without its error bar.
"""

import difflib
import functools
import hashlib
import math
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import numpy
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergekit_expo.errors import ExpoError

INSTALL_HINT = "pip install 'mergekit-expo[lm-eval]'"
SEED = 1234  # every seed lm-eval takes: python, numpy, torch and few-shot sampling
# Resamples for the stderr of bootstrapped metrics (perplexity, f1, bleu...); lm-eval's
# default of 100000 takes minutes per task. Mean metrics such as acc have a closed form.
BOOTSTRAP_ITERS = 1000


class CapabilityError(ExpoError, ValueError):
    """An lm-eval run that cannot happen: lm-eval missing, a task unknown, its YAML unreadable, its
    data unreachable or too few documents for num_fewshot."""


class LmEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: List[str] = Field(min_length=1, description="lm-eval tasks, groups or tags to run, e.g. hellaswag,arc_easy.")
    include_path: Optional[Path] = Field(
        None, description="Folder of extra lm-eval task YAMLs (local tasks; they override built-in ones of the same name)."
    )
    limit: Optional[int] = Field(None, gt=0, description="Evaluate at most N examples per task (default: all).")
    num_fewshot: Optional[int] = Field(None, ge=0, description="Few-shot examples per prompt (default: each task's own).")
    batch_size: int = Field(8, gt=0, description="Requests per lm-eval forward pass.")
    every_alpha: bool = Field(False, description="Run on every alpha, not just alpha 0 and the chosen one.")

    @field_validator("include_path")
    @classmethod
    def _is_folder(cls, path: Optional[Path]) -> Optional[Path]:
        if path is not None and not path.is_dir():
            raise ValueError(f"{path} is not a folder of task YAMLs")
        return path


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as error:
        raise CapabilityError(f"lm-eval is not installed ({error}): {INSTALL_HINT}") from None
    return lm_eval


@functools.lru_cache(maxsize=None)
def _task_manager(include_path: Optional[str]):
    """One TaskManager per task folder and process: indexing lm-eval's thousands of task
    YAMLs takes seconds, so a YAML added to the folder later is not seen."""
    return _lm_eval().tasks.TaskManager(include_path=include_path)


def _manager(config: LmEvalConfig):
    manager = _task_manager(str(config.include_path.resolve()) if config.include_path else None)
    unknown = [name for name in config.tasks if name not in manager.all_tasks]
    broken = _unreadable_task_files(config.include_path) if unknown and config.include_path else []
    if broken:
        raise CapabilityError(
            f"{'; '.join(broken)}: lm-eval skips a task file it cannot read, so task "
            f"{', '.join(map(repr, unknown))} is unknown"
        )
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hints.append(f"{name!r} (did you mean {', '.join(close)}?)" if close else repr(name))
        where = f"nor in include_path {config.include_path}" if config.include_path else "(a local task's YAML needs include_path)"
        raise CapabilityError(f"unknown lm-eval task {', '.join(hints)}: not among lm-eval's tasks {where}")
    return manager


def check_tasks(config: LmEvalConfig) -> None:
    """Fail before any model work: every task must be known and its data loadable now (offline too)."""
    manager = _manager(config)
    # TaskManager.load arrived in lm-eval 0.4.12; older releases only have load_task_or_group.
    load = getattr(manager, "load", None) or manager.load_task_or_group
    for name in config.tasks:
        try:
            loaded = load([name])
        except Exception as error:
            raise CapabilityError(
                f"lm-eval task {name!r} could not be loaded ({type(error).__name__}: {error}); offline, its data must be "
                "local (dataset_path: json with dataset_kwargs.data_files) or already in the Hugging Face datasets cache"
            ) from error
        for task in _leaf_tasks(loaded):
            _check_fewshot(task, config.num_fewshot)


def _leaf_tasks(loaded: dict) -> list:
    """The tasks that TaskManager.load (lm-eval 0.4.12 on: under "tasks") or load_task_or_group
    (nested by group) returned."""
    tasks = loaded["tasks"] if isinstance(loaded.get("tasks"), dict) else loaded
    return [task for value in tasks.values() for task in (_leaf_tasks(value) if isinstance(value, dict) else [value])]


def _check_fewshot(task, num_fewshot: Optional[int]) -> None:
    """More few-shot examples than a task has documents to draw them from, refused before any
    model work: lm-eval would fail inside its sampling, after the model was wrapped."""
    sampler, own = getattr(task, "sampler", None), task.config.num_fewshot
    shots = own if own == 0 or num_fewshot is None else num_fewshot  # lm-eval keeps a YAML's 0
    if not shots or sampler is None:
        return
    available = len(sampler.fewshot_docs())
    if getattr(getattr(task, "fewshot_cfg", None), "split", None) == task.config.test_split:
        available -= 1  # drawn from the evaluated split: lm-eval leaves out the document being evaluated
    if shots > available:
        where = "--lm-eval-num-fewshot" if num_fewshot is not None else "the task's YAML"
        raise CapabilityError(
            f"lm-eval task {task.config.task!r}: num_fewshot {shots} (from {where}) asks for more few-shot "
            f"examples than the {available} documents it has to draw them from; set --lm-eval-num-fewshot to at most {available}"
        )


# Marks a metric lm-eval declares lower-is-better: `word_perplexity (lower is better)`.
LOWER_IS_BETTER = " (lower is better)"


def run_lm_eval(model, tokenizer, config: LmEvalConfig, device: str) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} for an already loaded transformers model, evaluated as it is.

    The model is used in place (moved to `device` first if it is elsewhere), so a sweep
    evaluates each candidate it loaded without reloading it. Groups appear beside their
    subtasks; only finite numbers are kept, `sample_len` (examples evaluated; lm-eval
    0.4.12 on) among them. Call check_tasks first: this checks task names, but a
    dataset that cannot be loaded fails only inside lm-eval, after the model was wrapped.
    """
    lm_eval = _lm_eval()
    manager = _manager(config)
    target = torch.device(device)
    if model.device.type != target.type or (target.index is not None and model.device.index != target.index):
        model.to(target)
    lm = lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
    with _rng_kept():
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(config.tasks),
            num_fewshot=config.num_fewshot,
            limit=config.limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
            task_manager=manager,
            random_seed=SEED,
            numpy_random_seed=SEED,
            torch_random_seed=SEED,
            fewshot_random_seed=SEED,
        )
    results = {}
    for task, metrics in output["results"].items():
        directions = (output.get("higher_is_better") or {}).get(task) or {}
        values = {
            _metric_name(key, directions): float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
        if values:
            results[task] = values
    return results


def _metric_name(key: str, directions: Dict[str, bool]) -> str:
    """`acc`, `exact_match/strict-match`; LOWER_IS_BETTER appended where lm-eval says so
    (perplexities, bits per byte), stderr included, so a reader of the figures cannot misread them."""
    name, _, filter_name = key.partition(",")
    name = name if filter_name in ("", "none") else f"{name}/{filter_name}"
    return name + LOWER_IS_BETTER if directions.get(key.partition(",")[0].removesuffix("_stderr")) is False else name


@contextmanager
def _rng_kept():
    """lm-eval seeds the global generators; put them back so a guard run shifts no other random stream."""
    states = random.getstate(), numpy.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        numpy.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class _AnyTagLoader(yaml.SafeLoader):
    """Task YAMLs carry lm-eval's own tags (`!function utils.process_docs`): read them as plain values."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _unreadable_task_files(folder: Path) -> List[str]:
    """`FILE, line N: YAML syntax error (...)` for each task YAML in `folder` (those lm-eval
    indexes: *.yaml) that does not parse."""
    problems = []
    for path in sorted(Path(folder).rglob("*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=_AnyTagLoader)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            problems.append(f"{path}{line}: YAML syntax error ({getattr(error, 'problem', None) or error})")
        except UnicodeDecodeError:
            problems.append(f"{path}: not UTF-8 text")
    return problems


def task_fingerprint(config: LmEvalConfig) -> Optional[str]:
    """A hash of the local task files and the data files they name (dataset_kwargs.data_files),
    by content: an edited task or dataset is evaluated again, not read from a sweep's cache."""
    if config.include_path is None:
        return None
    digest = hashlib.sha256()
    files = sorted(p for p in Path(config.include_path).rglob("*") if p.is_file())
    data = []
    for path in files:
        if path.suffix in (".yaml", ".yml"):
            try:
                task = yaml.load(path.read_text(encoding="utf-8"), Loader=_AnyTagLoader) or {}
            except (yaml.YAMLError, UnicodeDecodeError):
                continue
            kwargs = task.get("dataset_kwargs") if isinstance(task, dict) else None
            named = kwargs.get("data_files") if isinstance(kwargs, dict) else None
            data += [Path(v) for v in _strings(named) if Path(v).is_file()]
    for path in [*files, *sorted(set(data))]:
        digest.update(str(path).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _strings(value) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []
