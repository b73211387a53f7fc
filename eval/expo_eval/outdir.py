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
    or holds anything a sweep does not write. An empty or new folder, or an earlier sweep's,
    is accepted."""
    out = Path(out)
    where = out.resolve()
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
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise OutputFolderError(f"{existing}, where the output folder {out} would be created, is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = f"the output folder {out}" if existing == out.absolute() else f"{existing}, where the output folder {out} would be created,"
        raise OutputFolderError(f"{what} is not writable")


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
