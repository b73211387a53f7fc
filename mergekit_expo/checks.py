"""Up-front checks of input checkpoints, so bad files fail before anything is written.

safetensors' own errors ("incomplete metadata, file not fully covered") do not
say which file is broken, and mergekit opens the shards of an indexed
checkpoint only in the middle of a merge.
"""

import glob
import json
import os
import re
import struct
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # mergekit.common imports peft: seconds that `inspect` does not need
    from mergekit_expo.compat import ModelReference

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """Not a local path and shaped like `owner/name`: decided offline."""
    return not os.path.exists(path) and bool(_HUB_ID.match(path))


def check_safetensors(path: str) -> None:
    """Raise ValueError naming `path` if its header is unreadable or its data truncated."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes)")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - 8:
            raise ValueError(
                f"{path}: truncated or corrupt safetensors file: header of "
                f"{header_size} bytes, file of {size} bytes"
            )
        try:
            header = json.loads(handle.read(header_size))
            end = max(
                (info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{path}: corrupt safetensors header ({error})") from None
    if 8 + header_size + end != size:
        raise ValueError(
            f"{path}: truncated or corrupt safetensors file: tensors need "
            f"{8 + header_size + end} bytes, the file has {size}"
        )


def check_model_files(model: "ModelReference", cache_dir=None) -> None:
    """Check every safetensors file of a model (downloading it first, as mergekit would)."""
    path = model.model.path
    if not os.path.exists(path) and not is_hub_id(path):  # the hub client's words would be "Repo id must be..."
        raise ValueError(f"{path}: no such model folder (nor a Hub ID owner/name)")
    check_folder(model.local_path(cache_dir, ignore_lora=True))


def check_lora_cache(model: "ModelReference", options) -> None:
    """mergekit merges a `model+lora` adapter into its model before merging, in a folder
    it is given; without one it stops mid-plan with a RuntimeError naming no model."""
    if model.lora is not None and not options.lora_merge_cache:
        raise ValueError(
            f"{model}: a LoRA adapter on a model, which mergekit merges into the model first, "
            "in a folder of its own: pass --lora-merge-cache DIR"
        )


def check_remote_code(model: "ModelReference", options) -> None:
    """A model whose config.json names its own code (auto_map) is refused unless that code may run."""
    if options.trust_remote_code:
        return
    try:
        with open(os.path.join(model.local_path(options.transformers_cache, ignore_lora=True), "config.json")) as handle:
            auto_map = json.load(handle).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):  # no readable config: mergekit names that itself
        return
    if auto_map:
        code = sorted({str(ref) for ref in auto_map.values()})
        raise ValueError(
            f"{model} runs its own code (config.json auto_map: {', '.join(code)}): pass "
            "--trust-remote-code to run it (it runs with your permissions; read it first)"
        )


def check_architectures(merge_config, options) -> None:
    """Models of different architectures, named: mergekit refuses them (without
    --allow-crimes) only in the middle of a merge, in words that name no model."""
    from mergekit_expo import compat  # loads mergekit: `inspect` imports this module without it

    try:
        compat.get_architecture_info(merge_config, options)
    except RuntimeError as error:
        if "--allow-crimes" not in str(error):
            raise
        trust = options.trust_remote_code
        base = merge_config.base_model
        models = [base, *sorted((m for m in merge_config.referenced_models() if m != base), key=str)]
        described = "; ".join(
            f"{model} is {', '.join(model.config(trust_remote_code=trust).architectures or ['unknown'])}"
            for model in models
            if model is not None
        )
        raise ValueError(
            f"the models are of different architectures ({described}): expo extrapolates from an "
            "SFT model to a model aligned from it, which share one (mergekit's --allow-crimes "
            "merges them anyway)"
        ) from None


def check_folder(folder: str) -> None:
    """Check every safetensors file in a local model folder, and every shard its index names."""
    for index in sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json"))):
        check_index(index)
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        check_safetensors(path)


def check_index(path: str) -> None:
    """Raise ValueError naming the index and the shard when a shard it names is missing."""
    try:
        with open(path) as handle:
            shards = set(json.load(handle)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: unreadable safetensors index ({error})") from None
    folder = os.path.dirname(path)
    missing = sorted(s for s in shards if not os.path.isfile(os.path.join(folder, s)))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(
            f"{path} names the shard {missing[0]}{more}, missing from {folder}"
        )


def tied_embeddings_mismatch(base, tied, model, other) -> Optional[str]:
    """The message for an SFT model and an aligned model that disagree on tie_word_embeddings
    (None, or a setting that is None, agrees); the merge refuses it, `inspect` warns."""
    if tied is None or other is None or bool(tied) == bool(other):
        return None
    return (
        f"tie_word_embeddings differs: the SFT model {base} has "
        f"tie_word_embeddings={bool(tied)}, the aligned model {model} has "
        f"tie_word_embeddings={bool(other)}; expo needs both configured the same "
        "(save the tied model untied, with lm_head = embed_tokens, and set "
        "tie_word_embeddings: false)"
    )
