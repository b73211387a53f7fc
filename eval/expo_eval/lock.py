"""One sweep per output folder: a lock that names its holder and dies with it.

The lock is an `fcntl.flock` on OUT/.sweep.lock, so the kernel releases it when its
process ends however it ends (a killed sweep leaves no stale lock to clean up); the
file says who holds it. Shard processes of a `--gpus` sweep write only cache entries
under their parent's lock: the parent passes its token in SHARD_TOKEN_ENV.
"""

import fcntl
import json
import os
import socket
import time
from pathlib import Path

SHARD_TOKEN_ENV = "MERGEKIT_EXPO_SWEEP_LOCK"


class SweepLockedError(RuntimeError):
    """Another sweep is writing to the same output folder."""


class SweepLock:
    def __init__(self, out: Path):
        self.path = Path(out) / ".sweep.lock"
        self.handle = None
        self.token = None

    def __enter__(self) -> "SweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            if holder and os.environ.get(SHARD_TOKEN_ENV) == json.loads(holder).get("token"):
                return self  # a shard of the sweep that holds the lock
            raise SweepLockedError(f"another sweep is writing to {self.path.parent}: {_describe(holder)}") from None
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": self.token}))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
