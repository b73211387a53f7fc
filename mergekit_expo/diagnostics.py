"""`mergekit-expo inspect`: how far alignment moved the weights, and what a dtype keeps.

The pair is streamed tensor by tensor from mmapped safetensors shards (mergekit's
own index and loader), so memory stays near the largest tensor whatever the model
size, and each byte is read once. The statistics are `stats.measure`, the same
code the merge records with.
"""

import ctypes
import json
import math
import mmap
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mergekit.io import LazyTensorLoader, ShardedTensorIndex
from tqdm import tqdm

from mergekit_expo import advice
from mergekit_expo.checks import check_folder, is_hub_id, tied_embeddings_mismatch
from mergekit_expo.errors import ExpoError
from mergekit_expo.extrapolation import compute_dtype, extrapolate
from mergekit_expo.method import NonFiniteError, check_finite_input, check_fits
from mergekit_expo.stats import (
    Change,
    Summary,
    TensorRecord,
    layer_index,
    measure,
    module_kind,
    summarize,
)

DEFAULT_ALPHAS = (0.3,)  # zephyr-7b-dpo's best alpha (paper, Tables 2 and 7)
DEFAULT_DTYPES = ("bfloat16", "float16", "float32")
SCHEMA = "mergekit-expo.inspect/1"


class InspectError(ExpoError, ValueError):
    """Input that cannot be compared; the message names the model, file or tensor."""


@dataclass(frozen=True)
class Report:
    sft: str
    aligned: str
    alphas: Tuple[float, ...]
    dtypes: Tuple[str, ...]
    summary: Summary
    skipped: Tuple[str, ...]  # tensors that are not floating point
    config_warnings: Tuple[str, ...] = ()  # an unreadable config.json, a tie_word_embeddings mismatch

    @property
    def alerts(self) -> List[advice.Alert]:
        return advice.alerts(self.summary.total, self.dtypes, self.alphas)

    @property
    def suggested_alphas(self) -> Tuple[float, float]:
        return advice.suggested_alphas(self.summary.total)

    def to_json(self) -> Dict:
        summary = self.summary
        return {
            "schema": SCHEMA,
            "sft": self.sft,
            "aligned": self.aligned,
            "alphas": list(self.alphas),
            "out_dtypes": list(self.dtypes),
            "total": change_json(summary.total),
            "modules": {kind: change_json(c) for kind, c in summary.kinds.items()},
            "layers": [{"layer": i, **change_json(c)} for i, c in summary.layers.items()],
            "tensors": [tensor_json(t) for t in summary.tensors],
            "skipped": list(self.skipped),
            "suggested_alpha_range": list(self.suggested_alphas),
            "warnings": [{"code": "config", "message": m} for m in self.config_warnings]
            + [{"code": a.code, "message": a.message} for a in self.alerts],
        }

    def write_json(self, path: str) -> None:
        text = json.dumps(self.to_json(), indent=1, allow_nan=False)  # NaN is no JSON: fail loudly
        with open(path, "w") as handle:
            handle.write(text)


def change_json(change: Change) -> Dict:
    return {
        "tensors": change.tensors,
        "numel": change.numel,
        "changed": change.changed,
        "changed_fraction": change.changed_fraction,
        "frobenius": change.frobenius,
        "normalized_frobenius": change.normalized_frobenius,
        "relative_change": change.relative,
        "cosine": change.cosine,
        "one_minus_cosine": change.one_minus_cosine,
        "rounding": [
            {
                "alpha": alpha,
                "dtype": dtype,
                "moved": loss.moved,
                "rounded_back": loss.rounded_back,
                "rounded_back_fraction": loss.rounded_back_fraction,
                "kept": loss.kept,
                "kept_along_delta": loss.kept_along_delta,
            }
            for (alpha, dtype), loss in change.losses.items()
        ],
    }


def tensor_json(record: TensorRecord) -> Dict:
    return {
        "name": record.name,
        "shape": list(record.shape),
        "kind": module_kind(record.name),
        "layer": layer_index(record.name),
        **change_json(record.change),
    }


def resolve(model: str) -> ShardedTensorIndex:
    """A local folder, or a Hub ID fetched the way mergekit fetches models."""
    if os.path.isdir(model):
        folder = model
    elif is_hub_id(model):
        from mergekit.common import ModelReference  # imports peft: only for Hub IDs

        try:
            folder = ModelReference.model_validate(model).local_path()
        except Exception as error:
            raise InspectError(f"{model}: cannot fetch it from the Hub ({error})") from None
    else:
        raise InspectError(f"{model}: no such model folder (nor a Hub ID owner/name)")
    try:
        check_folder(folder)
        return ShardedTensorIndex.from_disk(folder)
    except (OSError, RuntimeError, ValueError) as error:
        raise InspectError(f"{model}: {error}") from None


def inspect_pair(
    sft: str,
    aligned: str,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    progress: bool = False,
) -> Report:
    """Measure theta1 - theta0 tensor by tensor; raise InspectError on a mismatch.

    Tensors are measured on torch's worker count of Python threads, one core each:
    chunks are too small for intra-op threads to pay off, and page faults on the
    mmapped inputs overlap with computation.
    """
    index0, index1 = resolve(sft), resolve(aligned)
    (config0, problem0), (config1, problem1) = (
        _read_config(model, index.base_path) for model, index in ((sft, index0), (aligned, index1))
    )
    config_warnings = [problem for problem in (problem0, problem1) if problem]
    if config0 is not None and config1 is not None:
        _check_architectures(sft, config0, aligned, config1)
        tied = tied_embeddings_mismatch(
            sft, config0.get("tie_word_embeddings"), aligned, config1.get("tie_word_embeddings")
        )
        config_warnings += [tied] if tied else []
    names = _paired_names(sft, index0, aligned, index1)
    loader0, loader1 = LazyTensorLoader(index0), LazyTensorLoader(index1)
    workers = torch.get_num_threads()

    def job(name: str, theta0: torch.Tensor, theta1: torch.Tensor) -> TensorRecord:
        change = measure(theta0, theta1, alphas, dtypes)
        if not _finite(change):
            _check_finite(name, sft, theta0, aligned, theta1)
            _check_fits(name, theta0, theta1, change)
        for tensor in (theta0, theta1):
            release(tensor)
        return TensorRecord(name, tuple(theta0.shape), None, change)

    records, skipped, pending = [], [], deque()
    bar = tqdm(total=len(names), desc="inspect", unit="tensor", disable=not progress)
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for name in names:
                theta0, theta1 = loader0.get_tensor(name), loader1.get_tensor(name)
                if theta0.shape != theta1.shape:
                    raise InspectError(
                        f"{name}: shape {tuple(theta0.shape)} in {sft} but "
                        f"{tuple(theta1.shape)} in {aligned}"
                    )
                if not (theta0.is_floating_point() and theta1.is_floating_point()):
                    skipped.append(name)
                    continue
                pending.append(pool.submit(job, name, theta0, theta1))
                while len(pending) > 2 * workers or (pending and pending[0].done()):
                    records.append(pending.popleft().result())
                    bar.update()
            for future in pending:
                records.append(future.result())
                bar.update()
    finally:
        torch.set_num_threads(workers)
        bar.close()
    if not records:
        raise InspectError(f"{aligned}: no floating-point tensors to compare")
    return Report(
        sft, aligned, tuple(alphas), tuple(dtypes), summarize(records), tuple(skipped), tuple(config_warnings)
    )


def _finite(change) -> bool:
    sums = (change.delta_sq, change.theta0_sq, change.theta0_delta)
    sums += tuple(s for loss in change.losses.values() for s in (loss.kept_sq, loss.kept_dot, loss.requested_sq))
    return all(math.isfinite(s) for s in sums)


def _check_fits(name: str, theta0: torch.Tensor, theta1: torch.Tensor, change) -> None:
    """Refuse, as the merge does, a theta2 an output dtype cannot hold; then any figure that
    still overflows (finite inputs: checked before)."""
    dtype = compute_dtype(theta0, theta1)
    delta = theta1.to(dtype) - theta0.to(dtype)
    try:
        for (alpha, dtype_name), loss in change.losses.items():
            if not all(math.isfinite(s) for s in (loss.kept_sq, loss.kept_dot, loss.requested_sq)):
                check_fits(name, extrapolate(theta1.to(dtype), delta, alpha), getattr(torch, dtype_name), alpha)
    except NonFiniteError as error:
        raise InspectError(str(error)) from None
    largest = float(max(theta0.abs().max(), theta1.abs().max()))
    raise InspectError(f"{name}: its norms overflow {str(dtype).removeprefix('torch.')} (largest |weight| {largest:.4g})")


def _check_finite(name: str, sft: str, theta0: torch.Tensor, aligned: str, theta1: torch.Tensor) -> None:
    """Refuse a NaN or Inf in either input, as the merge does: it makes the figures NaN.

    Called when a tensor's sums are not finite; finite sums prove finite inputs (a NaN
    or Inf in theta0 reaches ||theta0||^2, one in theta1 ||delta||^2).
    """
    try:
        check_finite_input(name, theta0, sft, "theta0, the SFT model")
        check_finite_input(name, theta1, aligned, "theta1, the aligned model")
    except NonFiniteError as error:
        raise InspectError(str(error)) from None


def release(tensor: torch.Tensor) -> None:
    """Unmap a measured tensor's pages when they come from a mmapped file.

    safetensors maps whole shards: without this, every page read stays resident
    until the shard is closed and peak RSS grows to the shard size. Pages of a
    file mapping are dropped, never lost: a later read faults them in again.
    """
    address, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    if _LIBC is None or not size or not _file_mapped(address):
        return
    start = address // mmap.PAGESIZE * mmap.PAGESIZE
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + size - start), _DONTNEED)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_DONTNEED = 4  # MADV_DONTNEED


def _file_mapped(address: int) -> bool:
    """Whether `address` lies in a mapping of a file (not anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, _, _, _, inode = line.split()[:5]
            low, high = (int(bound, 16) for bound in span.split("-"))
            if low <= address < high:
                return inode != "0"
    return False


def _check_architectures(sft, config0: Dict, aligned, config1: Dict) -> None:
    architectures = [
        (config.get("model_type"), tuple(config.get("architectures") or ())) for config in (config0, config1)
    ]
    if architectures[0] != architectures[1]:
        raise InspectError(
            f"different architectures: {sft} is {architectures[0]}, "
            f"{aligned} is {architectures[1]}"
        )


def _read_config(model: str, folder: str) -> Tuple[Optional[Dict], Optional[str]]:
    """(config.json's contents, None), or (None, a warning naming why it cannot be read)."""
    path = os.path.join(folder, "config.json")
    unchecked = "the architecture and tie_word_embeddings are not checked"
    try:
        with open(path) as handle:
            config = json.load(handle)
    except FileNotFoundError:
        return None, f"{model}: no config.json; {unchecked}"
    except (OSError, ValueError) as error:
        return None, f"{path}: cannot be read ({error}); {unchecked}"
    if not isinstance(config, dict):
        return None, f"{path}: not a JSON object; {unchecked}"
    return config, None


def _paired_names(sft, index0, aligned, index1) -> List[str]:
    """Every tensor of both models, in the aligned model's shard order."""
    for model, mine, other in ((sft, index0, index1), (aligned, index1, index0)):
        missing = sorted(set(other.tensor_paths) - set(mine.tensor_paths))
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise InspectError(f"{missing[0]}{more}: missing from {model}")
    paths0, paths1 = index0.tensor_paths, index1.tensor_paths
    return sorted(paths1, key=lambda name: (paths1[name], paths0[name]))
