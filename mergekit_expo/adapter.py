"""ExPO on a LoRA adapter, exactly: theta1 = theta0 + s * B A, so
theta1 + alpha * (theta1 - theta0) = theta0 + (1 + alpha) * s * B A.

The extrapolated model is the adapter with every lora_B (and lora_B bias) scaled by
1 + alpha, whatever its scaling s (lora_alpha / r, rsLoRA's lora_alpha / sqrt(r), rank
and alpha patterns): a few MB instead of a full checkpoint. Full tensors the adapter
carries (`modules_to_save`, trained biases) are extrapolated against theta0's as usual.
An adapter whose weights do not enter linearly (DoRA, other PEFT methods) is refused.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from mergekit_expo.checks import check_safetensors, is_hub_id
from mergekit_expo.errors import ExpoError
from mergekit_expo.method import PAPER_URL
from mergekit_expo.rules import check_alpha

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of every saved tensor name
SCALED = (".lora_B.", ".lora_embedding_B")  # enter as (1 + alpha) * s * B A
KEPT = (".lora_A.", ".lora_embedding_A")
# PEFT options under which the adapter's change is not s * B A added to a weight
NOT_LINEAR = {
    "use_dora": "DoRA rescales each column of W + s * B A to a learned norm, so the change is not linear in lora_B",
    "layer_replication": "layer replication changes the model's layers, not only their weights",
    "trainable_token_indices": "trainable tokens replace embedding rows instead of adding to them",
}


class AdapterError(ExpoError, ValueError):
    """The adapter cannot be extrapolated as an adapter (the message says why)."""


def is_adapter(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_FILE))


@dataclass
class Adapter:
    folder: Path
    config: dict
    tensors: Dict[str, torch.Tensor]

    @property
    def full_tensors(self) -> Dict[str, torch.Tensor]:
        """Tensors stored whole (modules_to_save, biases), by their name in theta0."""
        return {name.removeprefix(PREFIX): t for name, t in self.tensors.items() if not _low_rank(name)}


def read_adapter(folder) -> Adapter:
    """A PEFT LoRA adapter folder, checked: a LoRA, linear, its weights readable."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterError(f"{folder / CONFIG_FILE}: not a readable adapter config ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"{folder}: a {kind or 'non-PEFT'} adapter; only LoRA adapters extrapolate by scaling lora_B")
    for option, why in NOT_LINEAR.items():
        if config.get(option):
            raise AdapterError(
                f"{folder}: {option} is set: {why}. Merge the adapter into full weights and extrapolate those "
                "with `mergekit-yaml` (merge_method: expo) instead"
            )
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{folder}: no {WEIGHTS_FILE} (a .bin adapter: save it again with safe_serialization)")
    check_safetensors(str(weights))
    tensors = load_file(str(weights))
    unknown = [n for n in tensors if not n.startswith(PREFIX) or ("lora_" in n and not _low_rank(n))]
    if unknown:
        raise AdapterError(f"{weights}: tensor {unknown[0]} is none of lora_A, lora_B or a whole module")
    return Adapter(folder, config, tensors)


def _low_rank(name: str) -> bool:
    return any(part in name for part in SCALED + KEPT)


def check_base(adapter: Adapter, theta0: str, shapes: Dict[str, torch.Size]) -> None:
    """theta0 must be the model the adapter was trained on: the adapter names it, and every
    tensor it changes must exist there with its shape."""
    trained_on = adapter.config.get("base_model_name_or_path")
    if trained_on and not same_model(trained_on, theta0):
        raise AdapterError(
            f"{adapter.folder} was trained on {trained_on}, not on theta0 {theta0}: ExPO extrapolates from the "
            "adapter's own base model"
        )
    for name, tensor in adapter.tensors.items():
        target = name.removeprefix(PREFIX)
        if ".lora_A." in target or ".lora_B." in target:
            module = target.split(".lora_")[0]
            target = f"{module}.weight"
            if target not in shapes:
                raise AdapterError(f"{adapter.folder}: {name} adapts {module}, which theta0 {theta0} does not have")
            kind = "A" if ".lora_A." in name else "B"
            out_features, in_features = shapes[target][0], shapes[target][-1]
            expected = in_features if kind == "A" else out_features
            got = tensor.shape[-1] if kind == "A" else tensor.shape[0]
            if tensor.ndim == 2 and got != expected and not adapter.config.get("fan_in_fan_out"):
                raise AdapterError(f"{adapter.folder}: {name} has shape {tuple(tensor.shape)}, which does not fit "
                                   f"{target} {tuple(shapes[target])} in theta0 {theta0}")
        elif not _low_rank(name):
            if target not in shapes:
                raise AdapterError(f"{adapter.folder}: {name} is a whole tensor theta0 {theta0} does not have")
            if tuple(shapes[target]) != tuple(tensor.shape):
                raise AdapterError(f"{adapter.folder}: {name} has shape {tuple(tensor.shape)}, theta0's {target} "
                                   f"{tuple(shapes[target])}")


def same_model(trained_on: str, theta0: str) -> bool:
    """The same folder, or the same Hub ID (a local snapshot of `owner/name` counts as it)."""
    if os.path.isdir(trained_on) and os.path.isdir(theta0):
        return os.path.samefile(trained_on, theta0)
    tails = [Path(p).parts[-2:] for p in (trained_on, theta0)]
    hub = [p.replace("/", "--") for p in (trained_on, theta0) if is_hub_id(p)]
    return tails[0] == tails[1] or any(f"models--{h}" in Path(p).as_posix() for h in hub for p in (trained_on, theta0))


def extrapolate(adapter: Adapter, alpha: float, theta0_tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The extrapolated adapter's tensors: lora_B times 1 + alpha, lora_A as it is, whole tensors
    theta1 + alpha * (theta1 - theta0); computed in float32 (float64 for float64), rounded once."""
    check_alpha(alpha)
    out = {}
    for name, tensor in adapter.tensors.items():
        compute = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        if any(part in name for part in SCALED):
            value = tensor.to(compute) * (1.0 + alpha)
        elif any(part in name for part in KEPT):
            out[name] = tensor.clone()
            continue
        else:
            theta1 = tensor.to(compute)
            value = theta1 + alpha * (theta1 - theta0_tensors[name.removeprefix(PREFIX)].to(compute))
        if not torch.isfinite(value).all():
            raise AdapterError(f"alpha={alpha:g}: {name} overflows or is not finite")
        rounded = value.to(tensor.dtype)
        if not torch.isfinite(rounded).all():
            raise AdapterError(f"alpha={alpha:g}: {name} overflows {str(tensor.dtype).removeprefix('torch.')}")
        out[name] = rounded
    return out


def write_adapter(adapter: Adapter, tensors: Dict[str, torch.Tensor], out: Path, alpha: float, theta0: str,
                  write_card: bool = True) -> None:
    """The extrapolated adapter as PEFT saves one, its config naming theta0, and its card."""
    from mergekit_expo.card import BIBTEX

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {**adapter.config, "base_model_name_or_path": theta0}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if write_card:
        (out / "README.md").write_text(adapter_card(adapter, alpha, theta0, BIBTEX), encoding="utf-8")


def adapter_card(adapter: Adapter, alpha: float, theta0: str, bibtex: str) -> str:
    metadata = {"library_name": "peft", "tags": ["expo", "model-extrapolation", "lora"]}
    if is_hub_id(theta0):
        metadata["base_model"] = theta0
    front = "".join(f"{k}: {json.dumps(v)}\n" for k, v in metadata.items())
    whole = sorted(adapter.full_tensors)
    return (
        f"---\n{front}---\n\n# ExPO adapter (alpha {alpha:g})\n\n"
        f"A LoRA adapter for `{theta0}` made with [ExPO]({PAPER_URL}) by "
        "[mergekit-expo](https://pypi.org/project/mergekit-expo/): `mergekit-expo adapter`.\n"
        f"theta2 = theta1 + alpha * (theta1 - theta0) with theta0 = `{theta0}` (the SFT model) and theta1 = theta0 + "
        f"`{adapter.folder}` (the aligned adapter); exactly, theta2 = theta0 + (1 + alpha) * s * B A, so every "
        f"lora_B here is the aligned adapter's times {1 + alpha:g}.\n\n"
        f"- alpha: {alpha:g}\n- rank: {adapter.config.get('r')}, lora_alpha: {adapter.config.get('lora_alpha')}"
        f"{', rsLoRA' if adapter.config.get('use_rslora') else ''}\n"
        + (f"- whole tensors extrapolated against theta0: {', '.join(whole)}\n" if whole else "")
        + f"\nLoad it with PEFT on theta0: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{theta0}\"), "
        "PATH)`, or serve it with vLLM's `--enable-lora`.\n\n"
        f"### Citation\n\n```bibtex\n{bibtex}\n```\n"
    )


def theta0_shapes_and_tensors(theta0: str, names) -> "tuple[Dict[str, torch.Size], Dict[str, torch.Tensor]]":
    """theta0's tensor shapes (all, from the safetensors headers) and the tensors named (the
    adapter's whole ones), read through mergekit's loader."""
    from mergekit.io import LazyTensorLoader
    from safetensors import safe_open

    from mergekit_expo.diagnostics import resolve

    index = resolve(theta0)
    shapes: Dict[str, torch.Size] = {}
    for filename in sorted(set(index.tensor_paths.values())):
        with safe_open(os.path.join(index.base_path, filename), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = torch.Size(handle.get_slice(name).get_shape())
    loader = LazyTensorLoader(index)
    return shapes, {name: loader.get_tensor(name) for name in names if name in shapes}


def extrapolate_adapter(adapter_folder, theta0: Optional[str], alpha: float, out: Path) -> Adapter:
    """`mergekit-expo adapter`: read and check, extrapolate, write."""
    adapter = read_adapter(adapter_folder)
    theta0 = theta0 or adapter.config.get("base_model_name_or_path")
    if not theta0:
        raise AdapterError(f"{adapter.folder}: its config names no base model; give theta0 with --base")
    shapes, tensors = theta0_shapes_and_tensors(theta0, adapter.full_tensors)
    check_base(adapter, theta0, shapes)
    extrapolated = extrapolate(adapter, alpha, tensors)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdapterError(f"{out}: exists and is not an empty folder; give a new --out")
    staging = out.with_name(f".{out.name}.partial")  # renamed into place only when complete
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_adapter(adapter, extrapolated, staging, alpha, theta0)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return adapter
