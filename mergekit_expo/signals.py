"""Signals: SIGTERM (how schedulers such as Slurm end a job) unwinds like Ctrl-C, and a swap
of files is not cut in half by either. Both act only in the main thread (the one Python
delivers signals to) and restore what they changed."""

import signal
import threading

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class terminate_cleanly:
    """Turn SIGTERM into SystemExit(143), so `finally` blocks and context managers clean up
    (partial folders, locks) as they do for Ctrl-C."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            def stop(signum, frame):
                raise SystemExit(128 + signum)

            self.previous = signal.signal(signal.SIGTERM, stop)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


class deferred_interrupts:
    """Hold SIGINT and SIGTERM back while a few renames run: one that arrives meanwhile is
    delivered right after, once the files are all in place (SIGKILL cannot be held)."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.previous)
        return False
