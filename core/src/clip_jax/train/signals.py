"""Stop gracefully on Ctrl-C or SIGTERM: finish the step, save a checkpoint, exit.

A second Ctrl-C interrupts at once, for a user who really means it.

Python runs signal handlers in the main thread between bytecodes only: while that thread
sits in a long C++ call (XLA compiling a step, for seconds to minutes) Ctrl-C would show
nothing, and a second one could not get out. So a watcher thread also hears each signal,
through ``signal.set_wakeup_fd``, which Python's C-level handler writes to at once: it says
a stop was heard and, when a second Ctrl-C is not handled within ``GRACE_S``, exits.
That needs the blocking call to release the GIL, as XLA's compiling and waiting do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable

# Set by a handler that ran before training started (e.g. `clipctl run`'s SIGTERM during
# imports): the KeyboardInterrupt it raised may have landed where Python ignores
# exceptions (a gc callback), so the request is also remembered here.
_early = threading.Event()

GRACE_S = 2.0  # how long a second Ctrl-C waits for the main thread before a hard exit
STOP_LINE = (
    "stop requested: finishing the step in progress (it may still be compiling), "
    "then saving a checkpoint"
)
AGAIN = "; Ctrl-C again to quit at once"  # said after a Ctrl-C, not after a SIGTERM
QUIT_LINE = "interrupted: quitting now without saving (the last checkpoint stands)"

_pipes: set[tuple[int, int]] = set()  # the wakeup pipes of the StopRequests entered


def _forget_pipes_in_child() -> None:
    # A forked child inherits the wakeup fd: Ctrl-C reaches the whole process group, and
    # its byte in our pipe would read as a second Ctrl-C here.
    for pipe in _pipes:
        with contextlib.suppress(ValueError):  # forked from another thread
            signal.set_wakeup_fd(-1)
        for fd in pipe:
            os.close(fd)
    _pipes.clear()


os.register_at_fork(after_in_child=_forget_pipes_in_child)


def request_stop() -> None:
    """Ask the trainer to stop at its next chance, even if it has not started yet."""
    _early.set()


class StopRequest:
    """``on_quit``: what must still happen before a hard quit (the run folder's status
    says "interrupted"); it runs on the watcher thread, errors ignored."""

    def __init__(self, on_quit: Callable[[], None] | None = None) -> None:
        self.on_quit = on_quit
        self.requested = False
        self._previous: dict[int, object] = {}
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None
        self._interrupts = 0  # KeyboardInterrupts raised by `_handle`, for the watcher
        self._done = threading.Event()

    def _handle(self, signum, frame) -> None:
        # Silent: the watcher says what was heard, once, even while this cannot run.
        if self.requested and signum == signal.SIGINT:
            self._interrupts += 1
            raise KeyboardInterrupt
        self.requested = True

    def _watch(self, read_fd: int, heard: int) -> None:
        """Read signal numbers from the wakeup pipe until EOF or a 0 byte (the end)."""
        interrupts = 0
        while (data := os.read(read_fd, 64)) and 0 not in data:
            for signum in data:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                heard += 1
                if heard == 1:
                    again = AGAIN if signum == signal.SIGINT else ""
                    print(STOP_LINE + again, file=sys.stderr, flush=True)
                elif signum == signal.SIGINT:  # a second Ctrl-C; SIGTERM never quits
                    interrupts += 1
                    self._quit_unless_handled(interrupts)

    def _quit_unless_handled(self, interrupts: int) -> None:
        for _ in range(int(GRACE_S / 0.05)):
            if self._interrupts >= interrupts or self._done.wait(0.05):
                return  # the main thread raised KeyboardInterrupt, or left the `with`
        print(QUIT_LINE, file=sys.stderr, flush=True)
        if self.on_quit is not None:
            with contextlib.suppress(Exception):
                self.on_quit()
        os._exit(130)

    def __enter__(self) -> StopRequest:
        self.requested = _early.is_set()
        self._done.clear()  # the same StopRequest may be entered again
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)  # set_wakeup_fd's requirement: never blocks
            previous = signal.set_wakeup_fd(write_fd)
            if previous != -1:
                # Someone else's (an asyncio loop's): it reads that fd to dispatch its
                # own handlers, so taking it would silence them, and forwarding to it
                # would guess at its reader. Give it back (with the default
                # warn_on_full_buffer, which asyncio uses); do without the watcher.
                signal.set_wakeup_fd(previous)
                os.close(read_fd)
                os.close(write_fd)
            else:
                self._pipe = (read_fd, write_fd)
                _pipes.add(self._pipe)
                self._watcher = threading.Thread(
                    target=self._watch, args=(read_fd, int(self.requested)), daemon=True
                )
                self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._pipe is not None:
            read_fd, write_fd = self._pipe
            self._done.set()
            current = signal.set_wakeup_fd(-1)
            if current != write_fd:  # someone set theirs inside the `with`: keep it
                signal.set_wakeup_fd(current)
            os.write(write_fd, b"\0")  # the end (no EOF while a child forked in C holds it)
            self._watcher.join()
            _pipes.discard(self._pipe)
            os.close(read_fd)
            os.close(write_fd)
            self._pipe = None
