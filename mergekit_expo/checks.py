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
from typing import TYPE_CHECKING

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
    check_folder(model.local_path(cache_dir, ignore_lora=True))


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
