"""Everything under a sweep's `--out/cache`: entries named by a digest of what determines them.

One reader verifies an entry and discards a damaged one (naming its file), one atomic
writer writes it; the entry kinds are declared once below. An interrupted sweep resumes
from the entries it finished, and a repeated one finds them all.
"""

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from expo_eval.files import write_text
from expo_eval.records import Generation

LOG = logging.getLogger("expo_eval")


def digest(payload) -> str:
    """A content key: the same payload, the same key, in any process."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Kind:
    suffix: str  # the file is <key><suffix>
    rows: bool = False  # JSON lines of Generation, else one JSON document


# The cache's entry kinds, by name (the file names are the cache format: keep them).
KINDS: Dict[str, Kind] = {
    "generations": Kind(".jsonl", rows=True),  # a candidate's responses on one split
    "timing": Kind(".timing.json"),  # how long they took to load and generate
    "kl_samples": Kind(".kl.jsonl", rows=True),  # its plain samples, with their log-probability under it
    "logprob_sft": Kind(".logprob_sft.json"),  # theta0's log-probabilities of those samples
    "scores": Kind(".scores.json"),  # one scorer's scores of one generations entry
    "judge": Kind(".judge.json"),  # an LLM judge's preferences against alpha 0
    "lm_eval": Kind(".lm_eval.json"),  # lm-eval results on one candidate's weights
}


MANIFEST = "inputs.json"


def numbers(count: int) -> Callable[[object], bool]:
    """A check for `count` finite numbers."""
    return lambda values: isinstance(values, list) and len(values) == count and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def rows_for(prompt_ids: Sequence[str]) -> Callable[[List[Generation]], Optional[str]]:
    """A check that rows answer exactly these prompts, in order: the problem, or None."""
    expected = list(prompt_ids)

    def problem(rows: List[Generation]) -> Optional[str]:
        ids = [r.prompt_id for r in rows]
        if ids == expected:
            return None
        return f"{len(rows)} rows for {len(expected)} prompts" if len(ids) != len(expected) else "other prompts"

    return problem


class Store:
    """The cache folder; remembers what this run wrote, so a run whose inputs changed under it
    can take back everything it measured."""

    def __init__(self, root: Path):
        self.root = root
        self.written: List[Path] = []

    def path(self, key: str, kind: str) -> Path:
        return self.root / f"{key}{KINDS[kind].suffix}"

    def has(self, key: str, kind: str) -> bool:
        return self.path(key, kind).exists()

    def read(self, key: str, kind: str, check: Callable[[object], Optional[str]]):
        """The entry, or None where there is none; a damaged one (unreadable, or one `check`
        finds a problem with: it returns the problem, or None) is removed with a warning."""
        path = self.path(key, kind)
        if not path.exists():
            return None
        try:
            text = path.read_text(encoding="utf-8")
            if KINDS[kind].rows:
                value = [Generation.model_validate_json(line) for line in text.splitlines()]
            else:
                value = json.loads(text)
            problem = check(value)
        except (ValueError, OSError) as error:  # pydantic's ValidationError is a ValueError
            problem = f"unreadable ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        if problem is None:
            return value
        LOG.warning("Discarding damaged cache entry %s (%s); computing it again", path, problem)
        _remove(path)
        return None

    def write(self, key: str, kind: str, value) -> None:
        """Written whole or not at all (a rename), and remembered."""
        if KINDS[kind].rows:
            text = "".join(row.model_dump_json() + "\n" for row in value)
        else:
            text = json.dumps(value)
        path = self.path(key, kind)
        write_text(path, text)
        self.written.append(path)

    def last_inputs(self) -> dict:
        """The input fingerprints of the last sweep that finished into this folder ({} if none)."""
        try:
            return json.loads((self.root / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}

    def keep_inputs(self, fingerprints: dict) -> None:
        """What a finished sweep's results used, for the next sweep to compare against."""
        write_text(self.root / MANIFEST, json.dumps(fingerprints, indent=2) + "\n")

    def take_back(self) -> None:
        """Remove every entry this run wrote."""
        for path in self.written:
            path.unlink(missing_ok=True)


def valid(accept: Callable[[object], bool], what: str) -> Callable[[object], Optional[str]]:
    """A yes/no check as a problem check: `what` is the entry's expected form."""
    return lambda value: None if accept(value) else f"not {what}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
