"""Make `expo` part of unmodified mergekit: register the method, wrap `run_merge`.

Called by the start-up hook (`_mergekit_expo_startup`, loaded from a .pth file)
right after `mergekit.merge_methods` or `mergekit.merge` is imported, and by
`import mergekit_expo`. Every step is idempotent.
"""

import functools
import logging
import os
import shutil
import sys
from typing import Optional, Set

LOG = logging.getLogger("mergekit_expo")


def register() -> None:
    """Register `expo` with mergekit's method registry, once per process."""
    from mergekit.merge_methods import registry

    from mergekit_expo.method import expo_merge

    if not any(m.spec.name == "expo" for m in registry.registered_methods()):
        registry.register(expo_merge)


def install() -> None:
    """Register `expo` and wrap `mergekit.merge` if it is already imported."""
    register()
    merge_module = sys.modules.get("mergekit.merge")
    if hasattr(merge_module, "run_merge"):  # else its import hook wraps it
        wrap_merge_module(merge_module)


def on_mergekit_import(module_name: str) -> None:
    method = sys.modules.get("mergekit_expo.method")
    if method is not None and not hasattr(method, "expo_merge"):
        return  # `import mergekit_expo` is under way and calls install() itself
    if module_name == "mergekit.merge_methods":
        register()
    elif module_name == "mergekit.merge":
        wrap_merge_module(sys.modules[module_name])


def wrap_merge_module(merge_module) -> None:
    """Route `expo` merges through `run_expo_merge` and `expo_card`.

    mergekit builds the card inside `run_merge` and asks the Hub about relative
    local paths there, so the card generator is replaced for `expo` configs too.
    """
    if getattr(merge_module.run_merge, "__wrapped_by_expo__", False):
        return
    original_run = merge_module.run_merge
    original_card = merge_module.generate_card

    @functools.wraps(original_run)
    def run_merge(merge_config, out_path, options, config_source=None):
        if merge_config.merge_method != "expo":
            return original_run(merge_config, out_path, options, config_source)
        return run_expo_merge(
            original_run, merge_config, out_path, options, config_source
        )

    @functools.wraps(original_card)
    def generate_card(config, config_yaml, name=None):
        if config.merge_method != "expo":
            return original_card(config, config_yaml, name)
        from mergekit_expo.card import expo_card

        return expo_card(config, config_yaml, name)

    run_merge.__wrapped_by_expo__ = True
    merge_module.run_merge = run_merge
    merge_module.generate_card = generate_card


def run_expo_merge(run, merge_config, out_path, options, config_source):
    """Run an `expo` merge with one rounding, a summary, and no half-written output."""
    from mergekit_expo import stats
    from mergekit_expo.checks import check_model_files
    from mergekit_expo.summary import log_summary

    slice_bases = [s.base_model for s in merge_config.slices or []]
    if merge_config.base_model is None and not (slice_bases and all(slice_bases)):
        raise ValueError(
            "expo needs base_model: the SFT checkpoint (theta0) the aligned models "
            "were trained from"
        )
    for model in merge_config.referenced_models():
        check_model_files(model, options.transformers_cache)
    merge_config = merge_config.model_copy(
        update={"out_dtype": output_dtype(merge_config, options)}
    )
    stats.reset(merge_config.out_dtype)  # what the writer rounds to
    existing = _entries(out_path)
    try:
        run(merge_config, out_path, options, config_source)
    except BaseException:
        _remove_new_entries(out_path, existing)
        raise
    log_summary(stats.records())


def output_dtype(merge_config, options) -> Optional[str]:
    """`out_dtype`, else `dtype`, else the aligned model's stored dtype.

    The kernel returns float32 (float64) results and mergekit's writer casts them
    to this dtype: the single rounding of the merge.
    """
    if merge_config.out_dtype or merge_config.dtype:
        return merge_config.out_dtype or merge_config.dtype
    aligned = [
        model
        for model in merge_config.referenced_models()
        if model != merge_config.base_model
    ]
    for model in aligned + [merge_config.base_model]:
        if model is None:
            continue
        config = model.config(trust_remote_code=options.trust_remote_code)
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if dtype is not None:
            return str(dtype).removeprefix("torch.")
    LOG.warning("No dtype in the recipe or the model config: writing float32 tensors")
    return None


def _entries(path: str) -> Optional[Set[str]]:
    return set(os.listdir(path)) if os.path.isdir(path) else None


def _remove_new_entries(path: str, existing: Optional[Set[str]]) -> None:
    if not os.path.isdir(path):
        return
    if existing is None:
        shutil.rmtree(path, ignore_errors=True)
        return
    for entry in set(os.listdir(path)) - existing:
        target = os.path.join(path, entry)
        if os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            os.remove(target)
