"""One `expo` merge run: checks up front, a temporary sibling folder, statistics, a swap.

mergekit's `run_merge` writes into the output folder as it goes, so an error, a
full disk or Ctrl-C leaves a mix of old and new files. Here mergekit writes into
a fresh sibling folder; only when it finished, and every file it copied is
complete, is that folder swapped in for the output folder (one rename). The old
output stays exactly as it was until then, and nothing of it survives after.

An output path that is a symlink (`out -> /big/disk/out`) is followed: the checks,
the temporary folder and the swap all happen at the link's target, and the link is
left as it was, pointing at the new model. One merge at a time writes to an output
(`output_lock`).
"""

import ctypes
import difflib
import errno
import filecmp
import glob
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import click
from safetensors import SafetensorError

from mergekit_expo import compat, rules, stats
from mergekit_expo.card import expo_card
from mergekit_expo.checks import (
    check_architectures,
    check_lora_cache,
    check_model_files,
    check_remote_code,
    tied_embeddings_mismatch,
)
from mergekit_expo.errors import ExpoError
from mergekit_expo.lock import OutputLock, OutputLockedError
from mergekit_expo.method import expo_merge
from mergekit_expo.signals import deferred_interrupts, terminate_cleanly
from mergekit_expo.summary import log_summary

LOG = logging.getLogger("mergekit_expo")

# Files mergekit writes itself rather than copies (weights, index, config, card).
GENERATED = {"config.json", "README.md", "mergekit_config.yml", "model.safetensors.index.json",
             "pytorch_model.bin.index.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class MergeError(click.ClickException, ExpoError, ValueError):
    """A user error: mergekit's command line prints the message and exits 1 (an ExpoError
    to the Python API, as every user error is)."""


def run_expo_merge(run, merge_config, out_path, options, config_source=None) -> None:
    """Run mergekit's `run_merge` for an `expo` configuration, safely (see module doc)."""
    with terminate_cleanly():
        _run_expo_merge(run, merge_config, out_path, options, config_source)


def _run_expo_merge(run, merge_config, out_path, options, config_source=None) -> None:
    try:
        merge_config = prepare(merge_config, out_path, options)
        _merge(run, merge_config, output_target(out_path), options, config_source, Path(out_path).name)
    except MergeError:
        raise
    except OutputLockedError as error:
        raise MergeError(str(error)) from None
    except compat.IncompatibleMergekit:
        raise
    except (ValueError, OSError) as error:
        raise MergeError(describe(error)) from None
    except SafetensorError as error:  # safetensors' own I/O errors are no OSError
        raise MergeError(f"{out_path}: writing or reading safetensors failed: {error}; is the disk full?") from None
    except RuntimeError as error:
        if compat.is_user_error(error):
            raise MergeError(str(error)) from None
        raise


def describe(error: BaseException) -> str:
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{where}no space left on device; the previous output (if any) is untouched"
        if error.errno == errno.EFBIG:
            return f"{where}file too large for this file system or limit (ulimit -f)"
        return f"{where}{error.strerror or error}"
    return str(error)


# ------------------------------------------------------------------------- up front


def prepare(merge_config, out_path: str, options):
    """Check the recipe, the inputs and the output folder; return the configuration to run.

    Raises ValueError naming the problem. The configuration returned has its
    output dtype resolved (see `output_dtype`).
    """
    merge_config = adapters_on_theta0(merge_config)
    check_inputs(merge_config, options)
    folders = {m: m.local_path(options.transformers_cache, ignore_lora=True) for m in merge_config.referenced_models()}
    check_output_folder(out_path, folders)
    return merge_config.model_copy(update={"out_dtype": output_dtype(merge_config, options)})


def adapters_on_theta0(merge_config):
    """An aligned model given as a PEFT LoRA adapter folder is theta0 + the adapter: mergekit's
    `theta0+ADAPTER`, checked first against theta0 (the base it was trained on, its shapes)."""
    from mergekit_expo.adapter import check_base, is_adapter, read_adapter, theta0_shapes_and_tensors

    theta0 = merge_config.base_model
    adapters = [m for m in merge_config.models or [] if m.model.lora is None and is_adapter(m.model.model.path)]
    if theta0 is None or not adapters:
        return merge_config
    shapes, _ = theta0_shapes_and_tensors(theta0.model.path, [])
    models = []
    for model in merge_config.models:
        if model in adapters:
            check_base(read_adapter(model.model.model.path), theta0.model.path, shapes)
            reference = theta0.model_copy(update={"lora": model.model.model})
            model = model.model_copy(update={"model": reference})
        models.append(model)
    return merge_config.model_copy(update={"models": models})


def check_inputs(merge_config, options) -> None:
    """The recipe, its parameters and its models (files, adapters, code, architectures, tied
    embeddings): every check of the inputs that needs no tensor read. Raises ValueError naming
    the problem. The sweep runs it too, before its first candidate."""
    rules.require_base_model(merge_config)
    check_parameters(merge_config)
    for model in merge_config.referenced_models():
        check_model_files(model, options.transformers_cache)
        check_lora_cache(model, options)
        check_remote_code(model, options)
    check_architectures(merge_config, options)
    check_tied_embeddings(merge_config, options)


def parameter_settings(merge_config) -> Iterator[Tuple[str, Dict, bool]]:
    """(where, parameters, shared) for every parameter block of a configuration.

    shared: the block may set parameters that apply to all inputs (alpha).
    """
    yield "parameters", merge_config.parameters, True
    yield from _model_and_slice_blocks("", merge_config)
    for name, module in (merge_config.modules or {}).items():
        yield f"modules.{name}", module.parameters, True
        yield from _model_and_slice_blocks(f"modules.{name}.", module)


def _model_and_slice_blocks(where: str, owner):
    """The parameter blocks of a configuration's (or module's) models and slices."""
    for i, model in enumerate(owner.models or []):
        yield f"{where}models[{i}] ({model.model})", model.parameters, False
    for i, piece in enumerate(owner.slices or []):
        yield f"{where}slices[{i}]", piece.parameters, True
        for j, source in enumerate(piece.sources):
            yield f"{where}slices[{i}].sources[{j}]", source.parameters, False


def check_parameters(merge_config) -> None:
    """Unknown parameter names, a missing alpha and a bad alpha, named."""
    known = [p.name for p in expo_merge.spec.parameters]
    alpha_given = False
    for where, settings, shared in parameter_settings(merge_config):
        for key, value in (settings or {}).items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise ValueError(
                    f"unknown parameter `{key}` in {where}{hint}; expo takes: {', '.join(known)}"
                )
            if key == "alpha":
                alpha_given = alpha_given or shared
                for number in _numbers(value):
                    try:
                        rules.check_alpha(number)
                    except ValueError as error:
                        raise ValueError(f"{where}: {error}") from None
    if not alpha_given:
        raise ValueError(
            "expo needs alpha, the extrapolation strength: e.g. `parameters: {alpha: 0.3}` "
            "(there is no default; the paper's best values lie between 0.1 and 0.5 for "
            "fully trained models)"
        )


def _numbers(setting) -> Iterator:
    """Every value in a parameter setting: a number, a gradient list, filters."""
    if isinstance(setting, (list, tuple)):
        for item in setting:
            yield from _numbers(item)
    elif hasattr(setting, "value"):  # mergekit's ConditionalParameter (filter)
        yield from _numbers(setting.value)
    elif isinstance(setting, dict) and "value" in setting:
        yield from _numbers(setting["value"])
    else:
        yield setting


def check_stage_out_path(merge_configs: Dict, intermediate_dir: str, out_path: Optional[str]) -> None:
    """Refuse a mergekit-multi `--out-path` that is an `expo` recipe's stage folder: under
    `--lazy` the final merge is skipped (the folder "holds a model") and the stage is passed
    off as the final output; without it the final merge would overwrite the stage."""
    if not out_path or not any(c.merge_method == compat.METHOD for c in merge_configs.values()):
        return
    out = output_target(out_path)
    for name in merge_configs:
        if name is not None and output_target(os.path.join(intermediate_dir, name)) == out:
            raise MergeError(
                f"--out-path {out_path} is the folder of the stage `{name}` (in --intermediate-dir "
                f"{intermediate_dir}): the final merge would be skipped or overwrite that stage; "
                "choose another output folder"
            )


def check_tied_embeddings(merge_config, options) -> None:
    """Stop when theta0 and an aligned model disagree on tie_word_embeddings.

    A tied checkpoint stores one matrix for the input embedding and lm_head; an
    untied one two. Their difference is no alignment change, and the output's
    config (taken from theta0) would tie or untie lm_head against what was merged.
    """
    base = merge_config.base_model
    if base is None:
        return
    trust = options.trust_remote_code
    tied = getattr(base.config(trust_remote_code=trust), "tie_word_embeddings", None)
    for model in merge_config.referenced_models():
        if model == base:
            continue
        other = getattr(model.config(trust_remote_code=trust), "tie_word_embeddings", None)
        problem = tied_embeddings_mismatch(base, tied, model, other)
        if problem:
            raise ValueError(problem)


def output_target(out_path: str) -> Path:
    """The folder a merge replaces: the output path with every symlink followed.

    A user with `out -> /big/disk/out` wants the model on the big disk, and the link
    kept: so the link's target is checked, written beside (same file system, so the
    swap is one rename) and replaced, never the link itself.
    """
    try:
        return Path(out_path).resolve()
    except RuntimeError as error:  # a symlink loop (Python 3.11; later versions raise OSError)
        raise ValueError(f"the output path {out_path} cannot be followed: {error}") from None


def check_output_folder(out_path: str, inputs: Dict) -> None:
    """Refuse an output folder that is, contains or lies inside an input model's folder,
    and an existing folder holding anything but a model (a symlink: its target)."""
    out = output_target(out_path)
    if os.path.islink(os.path.normpath(out_path)):
        out_path = f"{out_path} (a link to {out})"
    for model, folder in inputs.items():
        folder = Path(folder).resolve()
        if out == folder:
            relation = "is"
        elif folder in out.parents:
            relation = "lies inside"
        elif out in folder.parents:
            relation = "contains"
        else:
            continue
        raise ValueError(
            f"the output folder {out_path} {relation} the folder of input model {model} "
            f"({folder}); writing there would destroy that model: choose another output folder"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output path {out_path} exists and is not a folder")
    if out == Path.cwd().resolve() or os.path.ismount(out):
        raise ValueError(
            f"the output folder {out_path} is the current folder or a mount point: a merge swaps in a "
            "new folder in its place, which these cannot be; choose a folder inside it"
        )
    if out.is_dir():
        entries = sorted(os.listdir(out))
        if entries and not is_model_folder(out):
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ValueError(
                f"the output folder {out_path} exists and holds files that are not a model "
                f"({shown}); a merge replaces its output folder as a whole: choose a new "
                "or empty folder"
            )


# What a merge (mergekit's writer and its copies of the donor's files) puts in a folder.
MODEL_FILES = {
    "config.json", "generation_config.json", "mergekit_config.yml", "README.md", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.txt", "spiece.model",
    "model.safetensors.index.json", "pytorch_model.bin.index.json",
}


def is_model_folder(folder: Path) -> bool:
    """Whether a folder holds nothing but what a merge writes: replacing it loses nothing else.

    An earlier merge output (mergekit_config.yml) qualifies only under the same rule: a
    config.json beside a project's source files does not make a folder a model."""
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            return False
        if entry.name not in MODEL_FILES and not entry.name.endswith(WEIGHT_SUFFIXES):
            return False
    return True


def output_dtype(merge_config, options) -> Optional[str]:
    """`out_dtype`, else `dtype`, else the aligned model's stored dtype.

    The kernel computes in float32 (float64) and rounds once to this dtype.
    """
    if merge_config.out_dtype or merge_config.dtype:
        return merge_config.out_dtype or merge_config.dtype
    aligned = [m for m in merge_config.referenced_models() if m != merge_config.base_model]
    for model in aligned + [merge_config.base_model]:
        if model is None:
            continue
        config = model.config(trust_remote_code=options.trust_remote_code)
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if dtype is not None:
            return str(dtype).removeprefix("torch.")
    LOG.warning("No dtype in the recipe or the model config: writing float32 tensors")
    return None


# ------------------------------------------------------------------------- the run


def output_lock(out: Path) -> OutputLock:
    """The lock one merge into the folder `out` (a resolved `output_target`) holds.

    Its file is the sibling `.NAME.expo-lock`, not a file inside `out`: the merge
    replaces `out` as a whole, and a lock inside it would go with the old folder. It
    sits beside the partial folders it guards, and is deleted when the merge ends
    (see mergekit_expo.lock for why that is race-free).
    """
    return OutputLock(out.parent / f".{out.name}.expo-lock", "merge", out)


def _merge(run, merge_config, out: Path, options, config_source: Optional[str], name: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        _merge_locked(run, merge_config, out, options, config_source, name)


def _merge_locked(run, merge_config, out: Path, options, config_source: Optional[str], name: str) -> None:
    for stale in out.parent.glob(f".{glob.escape(out.name)}.expo-partial-*"):  # left by kill -9
        LOG.warning("Removing %s, left by an interrupted merge", stale)
        if stale.is_symlink():  # left by an earlier version given a symlink: never follow it
            stale.unlink()
        else:
            shutil.rmtree(stale, ignore_errors=True)
    partial = out.parent / f".{out.name}.expo-partial-{uuid.uuid4().hex[:8]}"
    inner_options = options.model_copy(update={"write_model_card": False})
    card_config = merge_config.model_copy(deep=True)  # mergekit's planner normalizes the config in place
    try:
        with stats.observing() as collector, compat.merge_errors() as errors:
            run(merge_config, str(partial), inner_options, config_source)
        if errors:
            raise ValueError(
                "the merge failed: mergekit logged an error it carries on from (its own text may "
                "call the merge successful; here nothing was written to the output): " + "; ".join(errors)
            )
        if copies_tokenizer(merge_config, options):
            check_copies(compat.donor_folder(merge_config, options), partial)
        summary = collector.summary()
        if options.write_model_card:
            write_card(card_config, config_source, partial, name, summary)
        swap_in(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    log_summary(collector.records())


def copies_tokenizer(merge_config, options) -> bool:
    """Whether mergekit copies the donor's tokenizer files byte for byte.

    With a `tokenizer` section, `tokenizer_source` or a chat template it builds and
    saves a tokenizer instead (a failure there raises).
    """
    return bool(
        options.copy_tokenizer
        and merge_config.tokenizer is None
        and merge_config.tokenizer_source is None
        and not merge_config.chat_template
    )


def check_copies(donor: str, written: Path) -> None:
    """Every file mergekit copied from the donor model is byte-for-byte complete."""
    for name in sorted(os.listdir(written)):
        if name in GENERATED or name.endswith(WEIGHT_SUFFIXES):
            continue
        source = Path(donor) / name
        target = written / name
        if not source.is_file() or not target.is_file():
            continue
        size, expected = target.stat().st_size, source.stat().st_size
        if size != expected or not filecmp.cmp(source, target, shallow=False):
            raise ValueError(
                f"{name} was not copied completely from {donor} ({size} of {expected} "
                "bytes); is the disk full?"
            )


def write_card(merge_config, config_source, folder: Path, name: str, summary) -> None:
    config_yaml = config_source or merge_config.to_yaml()
    (folder / "README.md").write_text(expo_card(merge_config, config_yaml, name, summary), encoding="utf-8")
    (folder / "mergekit_config.yml").write_text(config_yaml, encoding="utf-8")


def swap_in(new: Path, out: Path) -> None:
    """Make `new` the folder at `out` in one step; remove what was there before."""
    if not out.exists():
        os.rename(new, out)
        return
    if _exchange(new, out):  # `new` now holds the old output
        shutil.rmtree(new, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.expo-old-{uuid.uuid4().hex[:8]}"
    with deferred_interrupts():
        os.rename(out, old)
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(old, out)
            raise
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0
