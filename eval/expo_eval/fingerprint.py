"""Content fingerprints of a sweep's inputs, so cached results never outlive the files they came from.

Checkpoints are fingerprinted for speed at 70B (hundreds of GB): every file's name and
size; the safetensors headers (tensor names, dtypes, shapes, offsets) whole; small files
(configs, tokenizer, chat template: under SMALL_FILE bytes) whole; and of each large file
SAMPLES evenly spaced blocks of SAMPLE_BYTES plus its first and last block. That catches a
retrained or re-saved checkpoint (a training step changes nearly every block), a changed
tokenizer, config or chat template, and a truncated or replaced file; it can miss an edit
of a few bytes between sampled blocks of an otherwise identical large file.
"""

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Optional

SMALL_FILE = 16 << 20
SAMPLE_BYTES = 64 << 10
SAMPLES = 64
IGNORED = (".git", ".cache", "README.md", ".gitattributes")


def _hash_file(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as handle:
        if size <= SMALL_FILE:
            digest.update(handle.read())
            return
        if path.suffix == ".safetensors":
            header_size = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(min(header_size, size - 8)))
        step = max(1, (size - SAMPLE_BYTES) // (SAMPLES + 1))
        for offset in [0, *range(step, size - SAMPLE_BYTES, step)][: SAMPLES + 1] + [size - SAMPLE_BYTES]:
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))


def folder_fingerprint(folder: str) -> str:
    """The fingerprint of a model folder's files (sorted by name, subfolders included)."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if relative.parts[0] in IGNORED or path.name in IGNORED or ".tmp" in path.name:
            continue
        digest.update(str(relative).encode() + b"\0")
        _hash_file(path, digest)
    return digest.hexdigest()[:24]


def local_folder(spec: str) -> Optional[str]:
    """A model's local folder: the path itself, or its snapshot in the Hugging Face cache."""
    if os.path.isdir(spec):
        return spec
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, local_files_only=True)
    except Exception:  # not downloaded (yet), or not a Hub ID at all
        return None


def model_fingerprint(spec: str) -> str:
    """A model folder or Hub ID (a reward model's `#objective=K` names a column, not files; a
    model's own code is among its small files); a Hub ID not downloaded yet is fingerprinted
    by name only."""
    from expo_eval.scoring import split_objective

    folder = local_folder(split_objective(spec)[0])
    return folder_fingerprint(folder) if folder else f"name:{spec}"


def function_fingerprint(spec: str) -> str:
    """A `module:function` scorer by its whole module's source (its helpers and constants
    too; modules it imports are not followed)."""
    import importlib

    module_name, _, _ = spec.partition(":")
    module = importlib.import_module(module_name)
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):  # a compiled or built-in module
        source = f"{module_name} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}"
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def text_fingerprint(text: Optional[str]) -> Optional[str]:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:24]


def describe_changes(old: dict, new: dict) -> list:
    """The inputs whose fingerprint differs between two manifests, by name."""
    return [name for name in new if name in old and old[name] != new[name]]


def read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
