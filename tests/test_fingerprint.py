"""Model fingerprints see every byte of every file, and their cached file digests follow each
file's stat (ctime included), never a stale or damaged cache."""

import builtins
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from expo_eval import fingerprint
from expo_eval.fingerprint import model_fingerprint

OLD_SAMPLE_BYTES = 64 << 10


def old_sampled_blocks(size: int) -> list:
    """The byte ranges that the fingerprint read of a file over 16 MiB before it hashed whole
    files (issue 17): 64 evenly spaced 64 KiB blocks plus the first and the last."""
    step = max(1, (size - OLD_SAMPLE_BYTES) // 65)
    offsets = [0, *range(step, size - OLD_SAMPLE_BYTES, step)][:65] + [size - OLD_SAMPLE_BYTES]
    return [(offset, offset + OLD_SAMPLE_BYTES) for offset in offsets]


def unsampled(start: int, end: int, size: int) -> bool:
    return all(end <= low or start >= high for low, high in old_sampled_blocks(size))


@pytest.fixture
def digests(tmp_path, monkeypatch):
    """A private digest cache that keeps digests of files written just now."""
    monkeypatch.setenv(fingerprint.DIGEST_CACHE_ENV, str(tmp_path / "digests"))
    monkeypatch.setattr(fingerprint, "RECENT_NS", 0)
    return tmp_path / "digests" / "file-digests.json"


@pytest.fixture
def opened(monkeypatch):
    """The files the fingerprint module opens, by real path."""
    paths = []

    def counting_open(file, *args, **kwargs):
        paths.append(os.path.realpath(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(fingerprint, "open", counting_open, raising=False)
    return paths


def shard(folder, tensors=160):
    """A 20 MiB safetensors shard of 128 KiB bf16 matrices, as a reward model's."""
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    generator = torch.Generator().manual_seed(0)
    weights = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(64, 1024, generator=generator).bfloat16()
               for i in range(tensors)}
    path = folder / "model.safetensors"
    save_file(weights, str(path))
    return path.resolve()


def test_a_whole_tensor_between_the_old_samples_changes_the_fingerprint(tmp_path):
    path = shard(tmp_path / "rm")
    size = path.stat().st_size
    assert size > 16 << 20
    raw = path.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    offsets = json.loads(raw[8:header])
    missed = [name for name in sorted(offsets) if name != "__metadata__"
              and unsampled(header + offsets[name]["data_offsets"][0], header + offsets[name]["data_offsets"][1], size)]
    assert missed  # tensors the old sampling never read
    before = model_fingerprint(str(tmp_path / "rm"))
    weights = load_file(str(path))
    weights[missed[0]] = weights[missed[0]] * -4
    save_file(weights, str(path))
    assert path.stat().st_size == size
    assert model_fingerprint(str(tmp_path / "rm")) != before


def test_two_swapped_ids_in_a_large_tokenizer_change_the_fingerprint(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    vocab = {f"token{i:07d}": i for i in range(1_000_000)}
    path = folder / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab}}))
    text = path.read_text()
    size = len(text)
    assert size > 17 << 20
    first, second = next((i, i + 1) for i in range(500_000, 1_000_000) if unsampled(
        text.index(f'"token{i:07d}": {i}'), text.index(f'"token{i + 1:07d}": {i + 1}') + 30, size))
    before = model_fingerprint(str(folder))
    vocab[f"token{first:07d}"], vocab[f"token{second:07d}"] = second, first
    path.write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab}}))
    assert path.stat().st_size == size
    assert model_fingerprint(str(folder)) != before


def test_an_edit_that_puts_the_old_mtime_back_is_seen(tmp_path, digests):
    path = shard(tmp_path / "rm", tensors=4)
    before = model_fingerprint(str(tmp_path / "rm"))
    assert str(path) in digests.read_text()  # its digest is cached
    stat = path.stat()
    time.sleep(0.05)  # past the file system's timestamp tick: the edit gets a later ctime
    with open(path, "r+b") as handle:  # in place: same inode and size
        handle.seek(stat.st_size - 2)
        handle.write(b"\x7f\x7f")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = path.stat()
    assert (after.st_mtime_ns, after.st_ino, after.st_size) == (stat.st_mtime_ns, stat.st_ino, stat.st_size)
    assert model_fingerprint(str(tmp_path / "rm")) != before


def test_a_cached_digest_is_used_without_reading_the_file(tmp_path, digests, opened):
    path = shard(tmp_path / "rm", tensors=4)
    before = model_fingerprint(str(tmp_path / "rm"))
    assert str(path) in opened
    opened.clear()
    assert model_fingerprint(str(tmp_path / "rm")) == before
    assert opened == []


def test_a_file_written_just_now_is_read_again_next_time(tmp_path, digests, opened, monkeypatch):
    """A write in the same timestamp tick as the first read could keep the file's ctime."""
    monkeypatch.setattr(fingerprint, "RECENT_NS", 60 * 10**9)
    path = shard(tmp_path / "rm", tensors=4)
    before = model_fingerprint(str(tmp_path / "rm"))
    opened.clear()
    assert model_fingerprint(str(tmp_path / "rm")) == before
    assert str(path) in opened


def stat_entry(path, digest) -> str:
    """A cache entry that matches the file's stat, with the given digest."""
    stat = path.stat()
    return json.dumps({str(path): [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, digest]})


@pytest.mark.parametrize("damage", [
    lambda path: "{not json",
    lambda path: '["a list"]',
    lambda path: stat_entry(path, None),
    lambda path: stat_entry(path, 7)[:-5],
], ids=["not json", "not a mapping", "no digest", "cut short"])
def test_a_damaged_digest_cache_is_ignored_and_replaced(tmp_path, digests, opened, damage):
    path = shard(tmp_path / "rm", tensors=4)
    expected = model_fingerprint(str(tmp_path / "rm"))
    digests.write_text(damage(path))
    opened.clear()
    assert model_fingerprint(str(tmp_path / "rm")) == expected
    assert str(path) in opened  # hashed again, not read from the damaged entry
    assert json.loads(digests.read_text())[str(path)][-1]  # the cache is whole again
