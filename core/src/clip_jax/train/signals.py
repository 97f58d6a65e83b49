"""Stop gracefully on Ctrl-C or SIGTERM: finish the step, save a checkpoint, exit.

A second Ctrl-C interrupts at once, for a user who really means it.
"""

from __future__ import annotations

import signal
import threading

# Set by a handler that ran before training started (e.g. `clipctl run`'s SIGTERM during
# imports): the KeyboardInterrupt it raised may have landed where Python ignores
# exceptions (a gc callback), so the request is also remembered here.
_early = threading.Event()


def request_stop() -> None:
    """Ask the trainer to stop at its next chance, even if it has not started yet."""
    _early.set()


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        self.requested = _early.is_set()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
