"""Make `expo` part of unmodified mergekit, as soon as mergekit's modules load.

Called by the start-up hook (`_mergekit_expo_startup`, loaded from a .pth file)
right after `mergekit.merge_methods` or `mergekit.merge` is imported, and by
`import mergekit_expo`. It registers the method with mergekit's registry and
routes `expo` configurations given to `run_merge` through `run.run_expo_merge`
(through `compat`, which holds every non-public mergekit name). Idempotent.
"""

import sys
import warnings


def register() -> None:
    """Register `expo` with mergekit's method registry, once per process."""
    from mergekit.merge_methods import registry

    from mergekit_expo.method import expo_merge

    if not any(m.spec.name == "expo" for m in registry.registered_methods()):
        registry.register(expo_merge)


def route_merges(merge_module) -> None:
    """Send `expo` configurations given to mergekit's `run_merge` to our run."""
    from mergekit_expo import compat  # may be mid-import itself: it imports mergekit.merge

    compat.route_run_merge(merge_module, _run_expo_merge)


def _run_expo_merge(*args):
    # Looked up per call: run.py imports compat, which may be what is loading mergekit.merge.
    from mergekit_expo.run import run_expo_merge

    return run_expo_merge(*args)


def install() -> None:
    """Register `expo`, and route `run_merge` if `mergekit.merge` is loaded already.

    Raises compat.IncompatibleMergekit when the installed mergekit lacks a name
    this package needs.
    """
    register()
    merge_module = sys.modules.get("mergekit.merge")
    if merge_module is not None and _loaded(merge_module):
        route_merges(merge_module)


def _loaded(module) -> bool:
    """The module exists and has finished executing (it is not mid-import)."""
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


def on_mergekit_import(module_name: str) -> None:
    """The start-up hook's entry point: `module_name` has just finished loading."""
    if not _loaded(sys.modules.get("mergekit_expo")):
        return  # `import mergekit_expo` is under way and calls install() itself
    if module_name == "mergekit.merge_methods":
        register()
        return
    if module_name == "mergekit.scripts.multimerge":
        from mergekit_expo import compat
        from mergekit_expo.run import check_stage_out_path

        compat.route_multimerge(sys.modules[module_name], check_stage_out_path)
        return
    try:
        route_merges(sys.modules[module_name])
    except ImportError as error:
        if type(error).__name__ != "IncompatibleMergekit":
            raise
        # Failing here would break every mergekit command, expo or not.
        warnings.warn(f"mergekit-expo: `expo` merges are unavailable: {error}", stacklevel=2)
        _refuse_expo(sys.modules[module_name], str(error))


def _refuse_expo(merge_module, reason: str) -> None:
    original = getattr(merge_module, "run_merge", None)
    if original is None:
        return

    def run_merge(merge_config, out_path, options, config_source=None):
        if merge_config.merge_method == "expo":
            raise RuntimeError(f"mergekit-expo cannot run on this mergekit: {reason}")
        return original(merge_config, out_path, options, config_source)

    merge_module.run_merge = run_merge
