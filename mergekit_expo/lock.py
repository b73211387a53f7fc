"""One writer per output: a lock that names its holder, dies with it and leaves no file.

The lock is an `fcntl.flock` on a lock file, so the kernel releases it when its process
ends however it ends (a killed writer leaves no stale lock to clean up); the file says
who holds it, for the message a second writer gets. Local file systems only: flock
does not reach across NFS clients.

The holder deletes the lock file before it unlocks, so a finished writer leaves
nothing behind. That is safe because a process that opened the file just before the
deletion, and then locked the deleted file, checks after locking that the path still
names the file it locked, and otherwise starts over on the new one: the only lock
that counts is the one on the file the path names, and only its holder deletes it.
(`kill -9` skips the deletion: the file stays, unlocked, and the next writer takes
it and deletes it in turn.)
"""

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from mergekit_expo.errors import ExpoError


class OutputLockedError(ExpoError, RuntimeError):
    """Another process is writing to the same output."""


class OutputLock:
    """`with OutputLock(path, "merge", out):` one `writer` at a time for `target`.

    shared_token: the token (`OutputLock.token`) of a holder this process works for
    (e.g. a sweep's shard processes): then a held lock with that token lets it in.
    """

    def __init__(self, path: Path, writer: str, target: Path, shared_token: Optional[str] = None):
        self.path = Path(path)
        self.writer = writer
        self.target = target
        self.shared_token = shared_token
        self.handle = None
        self.token = None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = self._open()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                content = handle.read().strip()
                handle.close()
                holder = _record(content)
                if self.shared_token is not None and holder and holder.get("token") == self.shared_token:
                    return self  # works for the holder
                raise OutputLockedError(f"another {self.writer} is writing to {self.target}: {self._describe(content, holder)}") from None
            if _names(self.path, handle):
                break
            handle.close()  # locked a file its holder had just deleted: take the new one
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": self.token}))
        handle.flush()
        self.handle = handle
        return self

    def _open(self):
        """The lock file, never followed through a symlink (its writes would land on the target)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise OutputLockedError(
                    f"{self.path} is a symlink, not a lock file this program wrote: remove it "
                    f"(its target is left alone) before another {self.writer} writes to {self.target}"
                ) from None
            raise
        return os.fdopen(fd, "r+")

    def __exit__(self, *exc) -> None:
        if self.handle is None:
            return
        try:
            os.unlink(self.path)  # while still locked: see the module docstring
        except OSError:
            self.handle.seek(0)
            self.handle.truncate()  # no holder to name once unlocked
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None

    def _describe(self, content: str, holder: Optional[dict]) -> str:
        if holder is not None:
            try:
                return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
            except KeyError:
                pass
        if not content:
            return f"its holder has not recorded itself in {self.path} yet"
        shown = content if len(content) <= 60 else content[:60] + "..."
        return (f"holder unknown: {self.path} is locked, but what it holds is not the holder record "
                f"this program writes ({shown!r}): another program or version holds it")


def _record(content: str) -> Optional[dict]:
    """The holder's record, or None for a file that is empty or not one."""
    try:
        record = json.loads(content)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _names(path: Path, handle) -> bool:
    """Whether `path` still names the open file `handle` (not deleted or replaced since)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
