"""Atomic writes: a reader (or a resumed sweep) never sees half a file, nor half a report."""

import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable, List, Type

from mergekit_expo.errors import ExpoError, describe_os_error
from mergekit_expo.signals import deferred_interrupts

REPORT_STAGING = ".report-new"  # the next report, written aside in the folder it will replace
REPORT_MANIFEST = ".report-files.json"  # the report's files: the only ones a later report removes


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call write(temporary_path) in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 otherwise: the mode a plain open gives
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask, from /proc where there is one: setting it to read it (the
    fallback, restrictive meanwhile) affects files other threads create at that moment."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def read_text(path: Path, error: Type[ExpoError]) -> str:
    """A file the user named, as UTF-8 text, or `error` naming it (unreadable, or not text)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as reason:
        raise error(f"{path}: not UTF-8 text ({reason.reason} at byte {reason.start})") from None
    except OSError as reason:
        raise error(f"{path}: cannot be read ({describe_os_error(reason)})") from None


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def replace_report(folder: Path, write: Callable[[Path], None]) -> None:
    """Replace the report in `folder` by the files write(staging folder) writes, once all are.

    They are written aside in folder/REPORT_STAGING, listed in its REPORT_MANIFEST (written
    last: the mark of a complete report), then moved in; of the previous report only the
    files its manifest lists are removed, so nothing else in `folder` is touched. A write
    that fails leaves the previous report as it was; a swap cut short is finished by the
    next call (or finish_report_swap).
    """
    folder = Path(folder)
    finish_report_swap(folder)
    staging = folder / REPORT_STAGING
    staging.mkdir(parents=True)
    try:
        write(staging)
        names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if not p.is_dir())
        write_text(staging / REPORT_MANIFEST, json.dumps(names, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finish_report_swap(folder)


def finish_report_swap(folder: Path) -> None:
    """Move a complete staged report in (again, where a swap was cut short: only SIGKILL or a
    crash can cut it); drop an incomplete one."""
    folder = Path(folder)
    staging = folder / REPORT_STAGING
    manifest = staging / REPORT_MANIFEST
    if manifest.exists():
        new = _listed(manifest)
        with deferred_interrupts():  # Ctrl-C or SIGTERM acts once the report is whole
            for name in new:
                if (staging / name).exists():  # not moved yet
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging / name, folder / name)
            for name in set(_listed(folder / REPORT_MANIFEST)) - set(new):
                _remove_listed(folder, name)
            os.replace(manifest, folder / REPORT_MANIFEST)
            shutil.rmtree(staging, ignore_errors=True)  # the emptied folders, before a held signal acts
    else:
        shutil.rmtree(staging, ignore_errors=True)


def _listed(manifest: Path) -> List[str]:
    """The relative paths a manifest lists inside its folder (none when it is unreadable)."""
    try:
        names = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and n and not PurePosixPath(n).is_absolute()
            and ".." not in PurePosixPath(n).parts]


def _remove_listed(folder: Path, name: str) -> None:
    """A previous report's file, if it is still there, and the folders that leaves empty."""
    path = folder / name
    if path.is_symlink() or path.is_file():
        path.unlink()
    for parent in path.parents:
        if parent == folder:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty (or gone): someone else's files stay
            break
