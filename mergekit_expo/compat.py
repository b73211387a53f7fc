"""Every mergekit name mergekit-expo uses that mergekit does not document as API.

mergekit 0.1.5 documents `mergekit.merge_methods` (its `__all__`: method classes,
the decorator, the registry, the in-memory API), `mergekit.io`,
`mergekit.config.MergeConfiguration`, `mergekit.options.MergeOptions` and
`mergekit.merge.run_merge`. Everything else this package (and its sweep, in
`expo_eval`) needs is imported here, and only here; loading this module checks
that the installed mergekit has all of it and raises `IncompatibleMergekit`
naming what is missing.

The start-up hook registers the method while mergekit's own modules are still
half-imported, so the method does not import this module at module level; the
registration imports it once `mergekit.merge` has loaded.
"""

import contextlib
import importlib
import importlib.resources
import inspect
import logging
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Iterator, List

from mergekit_expo.errors import ExpoError

TESTED_WITH = "0.1.5"

_NAMES = {
    "mergekit.merge_methods.base": ["GroupMergeMethod"],
    "mergekit.sparsify": ["RescaleNorm", "SparsificationMethod", "sparsify"],
    "mergekit.common": ["ImmutableMap", "ModelReference", "dtype_from_name"],
    "mergekit.architecture": ["get_architecture_info"],
    "mergekit.graph": ["Executor"],
    "mergekit.io.tasks": ["FinalizeModel", "GatherTensors", "LoaderCache", "SaveTensor"],
    "mergekit.merge_methods.task_adapter": ["ExecuteMergeMethodTask"],
    "mergekit.plan": ["MergePlanner"],
    "mergekit.card": ["CARD_TEMPLATE"],
    # chat_templates: the package of the templates mergekit ships, as merge.py imports it.
    "mergekit.merge": ["run_merge", "_get_donor_model", "_set_chat_template", "chat_templates", "LOG"],
    "mergekit.tokenizer": ["BuildTokenizer"],
}
# Fields and arguments used, per name (pydantic fields or call parameters);
# `expo` overrides GroupMergeMethod._execute to receive the output dtype.
_MEMBERS = {
    "GroupMergeMethod._execute": ["input_dtypes", "out_dtype"],
    "ExecuteMergeMethodTask": ["method_name", "parameters", "out_dtype"],
    "SaveTensor": ["tensor_task", "dtype"],
    "FinalizeModel": ["tensor_save_tasks"],
    "MergePlanner.plan_to_disk": ["out_path"],
    "run_merge": ["merge_config", "out_path", "options", "config_source"],
    "_set_chat_template": ["tokenizer", "merge_config"],
    "BuildTokenizer": ["base_model", "referenced_models", "tokenizer_source", "add_tokens", "trust_remote_code"],
    "CARD_TEMPLATE": ["{metadata}", "{name}", "{merge_method}", "{base_text}", "{model_list}", "{config_yaml}"],
}


class IncompatibleMergekit(ExpoError, ImportError):
    """The installed mergekit lacks a name mergekit-expo relies on."""


def _installed() -> str:
    try:
        return version("mergekit")
    except PackageNotFoundError:
        return "unknown"


def _load() -> dict:
    found, missing = {}, []
    for module_name, names in _NAMES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            missing.append(f"{module_name} ({error})")
            continue
        for name in names:
            if hasattr(module, name):
                found[name] = getattr(module, name)
            else:
                missing.append(f"{module_name}.{name}")
    for qualified, members in _MEMBERS.items():
        owner, _, attribute = qualified.partition(".")
        if owner not in found:
            continue
        target = getattr(found[owner], attribute, None) if attribute else found[owner]
        if target is None:
            missing.append(qualified)
        elif isinstance(target, str):
            missing += [f"{qualified} placeholder {m}" for m in members if m not in target]
        else:
            fields = getattr(target, "model_fields", None)
            known = set(fields) if fields is not None else set(inspect.signature(target).parameters)
            missing += [f"{qualified}({m})" for m in members if m not in known]
    if missing:
        raise IncompatibleMergekit(
            f"mergekit-expo needs these parts of mergekit (tested with {TESTED_WITH}), "
            f"missing from the installed mergekit {_installed()}: {', '.join(missing)}. "
            f"Install mergekit=={TESTED_WITH}."
        )
    return found


METHOD = "expo"


# ------------------------------------------------------------------ the planned tasks


def with_output_dtype(targets: List) -> List:
    """The planned tasks, with each `expo` task told the dtype its tensor is written in.

    mergekit 0.1.5's planner casts results in `SaveTensor` (its `dtype`: the
    weight's forced dtype, else the recipe's `out_dtype`) and leaves
    `ExecuteMergeMethodTask.out_dtype` unset, so a method's `_execute` would get
    no output dtype on the graph path; this sets it to that same dtype. Tasks of
    other methods are returned unchanged.
    """
    saves, replaced = {}, False
    for task in targets:
        if isinstance(task, SaveTensor):
            inner = task.tensor_task
            if (
                isinstance(inner, ExecuteMergeMethodTask)
                and inner.method_name == METHOD
                and inner.out_dtype is None
                and task.dtype is not None
            ):
                inner = inner.model_copy(update={"out_dtype": task.dtype})
                saves[task] = task.model_copy(update={"tensor_task": inner})
                replaced = True
    if not replaced:
        return targets
    result = []
    for task in targets:
        if isinstance(task, SaveTensor):
            task = saves.get(task, task)
        elif isinstance(task, FinalizeModel):
            task = task.model_copy(
                update={"tensor_save_tasks": tuple(saves.get(t, t) for t in task.tensor_save_tasks)}
            )
        result.append(task)
    return result


def _route_planner() -> None:
    """Plan `expo` configurations with `with_output_dtype` (others as mergekit does)."""
    original = MergePlanner.plan_to_disk
    if getattr(original, "__expo_routed__", False):
        return

    def plan_to_disk(self, out_path: str):
        targets = original(self, out_path)
        if getattr(self.config, "merge_method", None) == METHOD:
            targets = with_output_dtype(targets)
        return targets

    plan_to_disk.__expo_routed__ = True
    plan_to_disk.__wrapped__ = original
    MergePlanner.plan_to_disk = plan_to_disk


# ------------------------------------------------------------------ mergekit.merge


def route_run_merge(merge_module, handler: Callable) -> None:
    """Send `expo` configurations given to `run_merge` to `handler`; others go through.

    handler(run_merge, merge_config, out_path, options, config_source) is called
    with mergekit's own `run_merge`. Idempotent.
    """
    original = merge_module.run_merge
    if getattr(original, "__expo_routed__", False):
        return

    def run_merge(merge_config, out_path, options, config_source=None):
        if merge_config.merge_method != METHOD:
            return original(merge_config, out_path, options, config_source)
        return handler(original, merge_config, out_path, options, config_source)

    run_merge.__expo_routed__ = True
    run_merge.__wrapped__ = original
    run_merge.__doc__ = original.__doc__
    merge_module.run_merge = run_merge


def route_multimerge(multimerge_module, check: Callable) -> None:
    """Have mergekit-multi call check(merge_configs, intermediate_dir, out_path) before it
    builds its tasks: its `--lazy` skip of a stage whose folder holds a model happens
    before any `run_merge`, so a refusal there is the only one that sees it. Idempotent."""
    original = multimerge_module.make_tasks
    if getattr(original, "__expo_routed__", False):
        return

    def make_tasks(merge_configs, dependencies, merge_options, intermediate_dir, out_path, lazy):
        check(merge_configs, intermediate_dir, out_path)
        return original(merge_configs, dependencies, merge_options, intermediate_dir, out_path, lazy)

    make_tasks.__expo_routed__ = True
    make_tasks.__wrapped__ = original
    multimerge_module.make_tasks = make_tasks


def donor_folder(merge_config, options) -> str:
    """The local folder mergekit copies the tokenizer and tag-along files from."""
    return _get_donor_model(merge_config, options=options)[1]


def built_tokenizer(merge_config, options):
    """The tokenizer mergekit's planner builds for a `tokenizer_source` or a `tokenizer:`
    section (its BuildTokenizer task, configured as MergePlanner configures it); None
    without either, when mergekit copies the donor's tokenizer instead."""
    section = merge_config.tokenizer
    source = section.source if section is not None else merge_config.tokenizer_source
    if source is None:
        return None
    task = BuildTokenizer(
        base_model=merge_config.base_model,
        referenced_models=tuple(merge_config.referenced_models()),
        tokenizer_source=source,
        trust_remote_code=options.trust_remote_code,
        add_tokens=tuple((section.tokens or {}) if section is not None else ()),
    )
    return task.execute().tokenizer


def set_chat_template(tokenizer, merge_config) -> None:
    """Give `tokenizer` the recipe's `chat_template:` as mergekit's merge does before saving
    it (a name of a template mergekit ships, `auto`, or Jinja text; nothing without one).
    Raises ValueError for a value mergekit refuses."""
    try:
        _set_chat_template(tokenizer, merge_config)
    except RuntimeError:  # mergekit's "Invalid chat template: ..."
        shipped = sorted(
            entry.name.removesuffix(".jinja")
            for entry in importlib.resources.files(chat_templates).iterdir()
            if entry.name.endswith(".jinja")
        )
        value = merge_config.chat_template
        raise ValueError(
            f"chat_template: {value[:60] + '...' if len(value) > 60 else value!r} is neither a template "
            f"mergekit ships ({', '.join(shipped)}), `auto`, nor a Jinja template (mergekit reads no "
            "template file: put the template's text in the recipe)"
        ) from None


# RuntimeErrors mergekit 0.1.5 raises for bad input rather than for a bug.
_USER_ERRORS = (
    re.compile(r"Tensor \S+ required but not present in model "),
    re.compile(r"Missing required parameter "),
    re.compile(r"All inputs to a slice must contain the same number of layers"),
    re.compile(r"Unable to find local path for "),
)


def is_user_error(error: BaseException) -> bool:
    """Whether mergekit raised `error` (a RuntimeError) about its input."""
    return isinstance(error, RuntimeError) and any(p.search(str(error)) for p in _USER_ERRORS)


@contextlib.contextmanager
def merge_errors() -> Iterator[List[str]]:
    """Collect the errors mergekit's merge logs and carries on from.

    mergekit 0.1.5 logs a failed tokenizer copy ("Failed to copy tokenizer", with
    a traceback) and returns normally. Here such records are taken out of the log
    and their messages land in the list this yields, for the caller to raise.
    """
    messages: List[str] = []

    class Capture(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno < logging.ERROR:
                return True
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += f" ({record.exc_info[1]})"
            messages.append(text)
            return False

    capture = Capture()
    _merge_log.addFilter(capture)
    try:
        yield messages
    finally:
        _merge_log.removeFilter(capture)


# Loaded last: importing mergekit.merge below runs the start-up hook, which calls
# route_run_merge on this (still loading) module; every function above looks the
# names up only when called.
_found = _load()
GroupMergeMethod = _found["GroupMergeMethod"]
RescaleNorm = _found["RescaleNorm"]
SparsificationMethod = _found["SparsificationMethod"]
sparsify = _found["sparsify"]
ImmutableMap = _found["ImmutableMap"]
ModelReference = _found["ModelReference"]
dtype_from_name = _found["dtype_from_name"]
get_architecture_info = _found["get_architecture_info"]
Executor = _found["Executor"]
FinalizeModel = _found["FinalizeModel"]
GatherTensors = _found["GatherTensors"]
LoaderCache = _found["LoaderCache"]
SaveTensor = _found["SaveTensor"]
ExecuteMergeMethodTask = _found["ExecuteMergeMethodTask"]
MergePlanner = _found["MergePlanner"]
CARD_TEMPLATE = _found["CARD_TEMPLATE"]
_merge_log: logging.Logger = _found["LOG"]
_get_donor_model = _found["_get_donor_model"]
_set_chat_template = _found["_set_chat_template"]
BuildTokenizer = _found["BuildTokenizer"]
chat_templates = _found["chat_templates"]
del _found

_route_planner()


def forget_loaders(models) -> None:
    """Drop mergekit's loaders for these models from its process-wide LoaderCache (keyed by
    model reference, kept for the life of the process): a loader keeps the shard index and
    the file it opened, so a folder merged again since its first use would still be read
    as it was, not as it now is."""
    paths = {model.model.path for model in models}
    loaders = LoaderCache().loaders
    for model in [m for m in loaders if m.model.path in paths]:
        loaders.pop(model).flush()
