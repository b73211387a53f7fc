"""Content fingerprints of a sweep's inputs, so cached results never outlive the files they came from.

A model folder's fingerprint covers every byte of every file in it (subfolders included,
IGNORED names and temporary files not): each file's path and the xxh3-128 digest of its
whole contents, read in BLOCK-byte pieces. Each file's digest is computed once and kept in
a per-user cache (`digest_cache_path`) under the file's real path, valid while the file's
device, inode, size, mtime_ns and ctime_ns are unchanged: any write changes ctime, an edit
that puts the old mtime back (`touch -r`, os.utime) included. So the first fingerprint of a
checkpoint reads it once, disk-bound (xxh3 hashes at tens of GB/s), and later ones only stat
its files. A file changed less than RECENT_NS before it was read (a write in the same
timestamp tick could keep its ctime) or while it was read is hashed but not cached.
"""

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import xxhash

from expo_eval.files import write_text

BLOCK = 16 << 20
RECENT_NS = 2_000_000_000
DIGEST_CACHE_ENV = "MERGEKIT_EXPO_CACHE"
IGNORED = (".git", ".cache", "README.md", ".gitattributes")


def digest_cache_path() -> Path:
    """$MERGEKIT_EXPO_CACHE, else $XDG_CACHE_HOME/mergekit-expo, else ~/.cache/mergekit-expo."""
    folder = os.environ.get(DIGEST_CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergekit-expo"
    )
    return Path(folder) / "file-digests.json"


def _read_digests(path: Path) -> Dict[str, list]:
    """The cached entries, {real path: [dev, inode, size, mtime_ns, ctime_ns, digest]}; a
    missing or damaged cache file reads as empty (the next save replaces it), a malformed
    entry is dropped."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {
        name: entry for name, entry in entries.items()
        if isinstance(entry, list) and len(entry) == 6
        and all(type(v) is int for v in entry[:5]) and isinstance(entry[5], str)
    }


def _save_digests(path: Path, new: Dict[str, list]) -> None:
    """Add `new` to the cache file as it is now and replace it atomically, dropping files that
    are gone. Two processes saving at once can lose each other's new entries, never corrupt one
    (a lost entry is hashed again); an unwritable cache only means hashing again next time."""
    entries = {**_read_digests(path), **new}
    try:
        write_text(path, json.dumps({k: v for k, v in entries.items() if os.path.exists(k)}) + "\n")
    except OSError:
        pass


def _stat_key(stat: os.stat_result) -> List[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _hash_whole(path: str) -> str:
    digest = xxhash.xxh3_128()
    block = bytearray(BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(block)
            if not count:
                return digest.hexdigest()
            digest.update(view[:count])


def _file_digest(path: Path, cached: Dict[str, list], new: Dict[str, list]) -> str:
    """The digest of a file's whole contents, from `cached` while its stat is unchanged;
    a digest worth caching is added to `new`."""
    real = os.path.realpath(path)
    started = time.time_ns()
    key = _stat_key(os.stat(real))
    entry = cached.get(real)
    if entry is not None and entry[:5] == key:
        return entry[5]
    digest = _hash_whole(real)
    if _stat_key(os.stat(real)) == key and started - key[4] > RECENT_NS:
        new[real] = [*key, digest]
    return digest


def folder_fingerprint(folder: str) -> str:
    """The fingerprint of a model folder's files (sorted by name, subfolders included)."""
    digest = hashlib.sha256()
    root = Path(folder)
    cache = digest_cache_path()
    cached, new = _read_digests(cache), {}
    try:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.relative_to(root)
            if relative.parts[0] in IGNORED or path.name in IGNORED or ".tmp" in path.name:
                continue
            digest.update(f"{relative}\0{_file_digest(path, cached, new)}\0".encode())
    finally:  # an interrupted first fingerprint keeps the digests it has
        if new:
            _save_digests(cache, new)
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
    """A model folder or Hub ID (a model's own code is among its small files); a Hub ID not
    downloaded yet is fingerprinted by name only."""
    folder = local_folder(spec)
    return folder_fingerprint(folder) if folder else f"name:{spec}"


def text_fingerprint(text: Optional[str]) -> Optional[str]:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:24]


def describe_changes(old: dict, new: dict) -> list:
    """The inputs whose fingerprint differs between two manifests, by name."""
    return [name for name in new if name in old and old[name] != new[name]]
