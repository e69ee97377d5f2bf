"""Ctrl-C during training: the first stops the loop at the next step boundary with a checkpoint, a second aborts."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

from aevb.errors import UserError


class Interrupted(UserError):
    """Training stopped by Ctrl-C after saving a checkpoint."""

    exit_code = 130


class StopRequest:
    """Whether Ctrl-C asked the loop to stop; the loop reads :attr:`requested` after every step."""

    def __init__(self):
        self.requested = False

    def handle(self, signum, frame) -> None:
        if self.requested:  # the second Ctrl-C: the user does not want to wait for the step
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def stop_on_sigint():
    """A :class:`StopRequest` that the first Ctrl-C sets while inside; a second one aborts.

    Python lets only the main thread handle signals: elsewhere (and on
    Windows) nothing is installed, and Ctrl-C interrupts as usual.
    """
    stop = StopRequest()
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, stop.handle)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
