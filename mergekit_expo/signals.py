"""Signals: SIGTERM (how schedulers such as Slurm end a job) unwinds like Ctrl-C, and a swap
of files is not cut in half by either. Both act only in the main thread (the one Python
delivers signals to) and restore what they changed."""

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    raised again right after, once the files are all in place (SIGKILL cannot be held).

    The handlers are swapped, not the signal mask: a process-directed signal goes to any
    thread that does not block it (torch's, a tokenizer's), and Python then runs its handler
    in the main thread all the same."""

    def __enter__(self):
        self.previous, self.pending = {}, []
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, lambda number, frame: self.pending.append(number))
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if self.pending:
            signal.raise_signal(self.pending[0])  # to the handler it would have met
        return False
