"""The sweep's output folder: refused before anything is written when writing there could
destroy something, and write failures there reported as one line.

A sweep writes only these names at the top of its folder, so a folder holding anything
else is someone else's: refused, not cleaned. Inside its own folders it removes only files
that an earlier report listed as its own (files.REPORT_MANIFEST).
"""

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

from expo_eval.files import REPORT_MANIFEST, REPORT_STAGING
from expo_eval.lock import LOCK_FILE
from expo_eval.report import ALPACA_EVAL_DIR, GENERATIONS_DIR, REPORT_FILES
from mergekit_expo.errors import ExpoError, describe_os_error

# cache/ (sweep.py), shards/ (shards.py), the report (report.py), the lock, the report's manifest and staging folder.
SWEEP_ENTRIES = frozenset({"cache", "shards", GENERATIONS_DIR, ALPACA_EVAL_DIR, *REPORT_FILES,
                           LOCK_FILE, REPORT_MANIFEST, REPORT_STAGING})
# what only a sweep leaves: a complete report's manifest (also in a swap cut short), or the
# inputs an earlier version recorded in cache/ at the end of a sweep
_SWEEP_MARKERS = (REPORT_MANIFEST, f"{REPORT_STAGING}/{REPORT_MANIFEST}", "cache/inputs.json")
# a report's own entries: without a marker beside them, files of these common names are a user's
_REPORT_ENTRIES = frozenset({GENERATIONS_DIR, ALPACA_EVAL_DIR, *REPORT_FILES})
_FOLDERS = ("cache", "shards", GENERATIONS_DIR, ALPACA_EVAL_DIR, REPORT_STAGING)
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.\w+\.tmp")  # files.write_atomic's, left by a killed write
_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputFolderError(ExpoError, RuntimeError):
    """The output folder cannot be used, or could not be written."""


def sweep_owns(name: str) -> bool:
    """Whether a name at the top of an output folder is one a sweep writes."""
    temporary = _TEMPORARY.fullmatch(name)
    return name in SWEEP_ENTRIES or (temporary is not None and temporary["name"] in SWEEP_ENTRIES)


def check_output_folder(out: Path, inputs: Dict[str, Path]) -> None:
    """Refuse, before anything is written, an output folder that is the current folder, a
    file, not writable, is, contains or lies inside an input (`inputs`: its description -> path),
    or holds anything a sweep does not write (or a report's files with no sweep's marker). An
    empty or new folder, or an earlier sweep's, is accepted; so is a folder holding only what a
    sweep cut short leaves (cache/, the lock), where no one else's file is replaced."""
    out = Path(out)
    try:
        where = out.resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a symlink loop
        raise OutputFolderError(f"the output folder {out} is a symlink loop") from None
    if out.is_symlink() and not out.exists():
        raise OutputFolderError(f"the output folder {out} is a symlink to a missing folder ({os.readlink(out)})")
    if out.name in SWEEP_ENTRIES and is_sweep_folder(where.parent):
        raise OutputFolderError(
            f"the output folder {out} is {out.name}, a name the sweep in {where.parent} keeps for itself: "
            "choose another --out"
        )
    if where == Path.cwd().resolve():
        raise OutputFolderError(
            f"the output folder {out} is the current folder: a sweep replaces its report, generations/ and "
            "alpaca_eval/ there; give it a folder of its own (e.g. --out sweep)"
        )
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"the output path {out} is a file, not a folder")
    for what, path in inputs.items():
        path = Path(path).resolve()
        relation = ("is" if where == path else "lies inside" if where.is_relative_to(path)
                    else "contains" if path.is_relative_to(where) else None)
        if relation is not None:
            raise OutputFolderError(
                f"the output folder {out} {relation} {what}: the sweep's cache and report would change "
                "that input; choose another --out"
            )
    if out.is_dir():
        foreign = sorted(name for name in os.listdir(out) if not sweep_owns(name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise OutputFolderError(
                f"the output folder {out} holds files a sweep does not write ({shown}): give a new or "
                "empty folder, or one an earlier sweep wrote"
            )
        report = sorted(name for name in os.listdir(out) if name in _REPORT_ENTRIES)
        if report and not is_sweep_folder(out):
            raise OutputFolderError(
                f"the output folder {out} holds {', '.join(report)} but no sweep's {REPORT_MANIFEST}: they are not "
                "an earlier sweep's report, and a sweep would replace them; give a new or empty folder"
            )
        for name in _FOLDERS:
            if (out / name).exists() and not (out / name).is_dir():
                raise OutputFolderError(f"{out / name} is a file, not the sweep's {name} folder: move it away")
        for name in REPORT_FILES:
            if (out / name).is_dir():
                raise OutputFolderError(f"{out / name} is a folder, not the sweep's {name}: move it away")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise OutputFolderError(f"{existing}, where the output folder {out} would be created, is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = f"the output folder {out}" if existing == out.absolute() else f"{existing}, where the output folder {out} would be created,"
        raise OutputFolderError(f"{what} is not writable")


def is_sweep_folder(folder: Path) -> bool:
    """Whether `folder` holds what only a sweep leaves there (_SWEEP_MARKERS)."""
    return any((Path(folder) / marker).is_file() for marker in _SWEEP_MARKERS)


@contextmanager
def writing(out: Path) -> Iterator[None]:
    """A full disk (anywhere), or a failed write in the output folder, as one line naming the
    folder; write_atomic and the report's swap leave nothing half-written behind it."""
    try:
        yield
    except OSError as error:
        if error.errno not in _FULL and not (_within(error.filename, out) or _within(error.filename2, out)):
            raise
        raise OutputFolderError(
            f"cannot write to the output folder {out}: {describe_os_error(error)}; nothing half-written "
            "is left there (the report in it is a complete one)"
        ) from None


def _within(name: Optional[str], out: Path) -> bool:
    return isinstance(name, (str, bytes)) and Path(os.fsdecode(name)).resolve().is_relative_to(Path(out).resolve())
