"""One sweep per output folder: mergekit_expo's output lock on OUT/.sweep.lock.

The kernel releases the lock when its process ends however it ends, and the file names
its holder. Shard processes of a `--gpus` sweep write only cache entries under their
parent's lock: the parent passes its token in SHARD_TOKEN_ENV.
"""

import os
from pathlib import Path

from mergekit_expo.lock import OutputLock, OutputLockedError

SHARD_TOKEN_ENV = "MERGEKIT_EXPO_SWEEP_LOCK"
LOCK_FILE = ".sweep.lock"
SweepLockedError = OutputLockedError  # another sweep is writing to the same output folder


class SweepLock(OutputLock):
    def __init__(self, out: Path):
        super().__init__(Path(out) / LOCK_FILE, "sweep", Path(out), shared_token=os.environ.get(SHARD_TOKEN_ENV))
