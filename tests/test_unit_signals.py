"""``StopRequest`` with real signals sent to this process: the first Ctrl-C or SIGTERM
asks for a graceful stop, a second Ctrl-C interrupts at once, and the handlers that were
there before come back afterwards."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from clip_jax.train import signals
from clip_jax.train.signals import StopRequest, request_stop


@pytest.fixture(autouse=True)
def no_early_request():
    signals._early.clear()
    yield
    signals._early.clear()


def deliver(sig: int) -> None:
    """Send ``sig`` to this process and give Python the chance to run its handler."""
    signal.raise_signal(sig)
    for _ in range(50):  # the handler runs between bytecodes of the main thread
        time.sleep(0.001)


def test_ctrl_c_asks_for_a_stop_and_a_second_one_interrupts():
    with StopRequest() as stop:
        assert not stop.requested
        deliver(signal.SIGINT)
        assert stop.requested  # no KeyboardInterrupt: the trainer finishes its step
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)
        assert stop.requested


def test_sigterm_asks_for_a_stop_and_never_interrupts():
    with StopRequest() as stop:
        deliver(signal.SIGTERM)
        assert stop.requested
        deliver(signal.SIGTERM)  # a second SIGTERM (e.g. a scheduler repeating itself)
        assert stop.requested


def test_the_previous_handlers_come_back_even_after_an_interrupt():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt), StopRequest() as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        deliver(signal.SIGINT)
        deliver(signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before
    # And the default Ctrl-C is back: a KeyboardInterrupt straight away.
    with pytest.raises(KeyboardInterrupt):
        deliver(signal.SIGINT)


def test_a_stop_requested_before_training_started_is_seen_at_once():
    request_stop()
    with StopRequest() as stop:
        assert stop.requested
        # already requested: the next Ctrl-C is the second one
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)


def test_outside_the_main_thread_no_handler_is_installed():
    """Signal handlers can only be set from the main thread: a trainer run in another
    thread (a notebook's, a test's) still works, it just cannot be stopped by signal."""
    before = signal.getsignal(signal.SIGINT)
    seen = {}

    def run():
        try:
            with StopRequest() as stop:
                seen["handler"] = signal.getsignal(signal.SIGINT)
                seen["requested"] = stop.requested
        except Exception as exc:  # ValueError if it tried to install a handler
            seen["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": False}
    assert signal.getsignal(signal.SIGINT) == before


def test_repeated_uses_leave_no_thread_fd_or_wakeup_fd_behind():
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        with StopRequest() as stop:
            deliver(signal.SIGTERM)
            assert stop.requested
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == fds
    assert signal.set_wakeup_fd(-1) == -1  # nobody's: as before


def test_a_wakeup_fd_set_by_someone_else_is_left_to_them():
    """An asyncio loop reads its wakeup fd to run its own handlers: taking it would
    silence them, so a StopRequest then does without its watcher (Ctrl-C still stops)."""
    theirs, other_end = socket.socketpair()
    theirs.setblocking(False)
    threads = threading.active_count()
    signal.set_wakeup_fd(theirs.fileno())
    try:
        with StopRequest() as stop:
            assert threading.active_count() == threads
            deliver(signal.SIGINT)
            assert stop.requested
            assert signal.set_wakeup_fd(theirs.fileno()) == theirs.fileno()
        assert other_end.recv(16) == bytes([signal.SIGINT])  # the signal reached them
    finally:
        assert signal.set_wakeup_fd(-1) == theirs.fileno()
        theirs.close()
        other_end.close()


def test_a_forked_child_does_not_write_its_signals_into_our_pipe():
    """Ctrl-C reaches the whole process group: a child forked inside the `with` (a data
    loader's worker) must not count as a second Ctrl-C here."""
    with StopRequest():
        pid = os.fork()
        if pid == 0:  # the child: no wakeup fd, and the pipe's fds closed
            os._exit(0 if signal.set_wakeup_fd(-1) == -1 and not signals._pipes else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# A process that enters StopRequest and then sits in a C call that releases the GIL but
# runs no bytecode (as XLA compiling a step does) for about argv[1] seconds.
BLOCKED_IN_C = """
import hashlib, sys, time
from clip_jax.train.signals import StopRequest

def pbkdf2(rounds):
    return hashlib.pbkdf2_hmac("sha256", b"x", b"y", rounds)

def seconds(rounds):
    start = time.perf_counter()
    pbkdf2(rounds)
    return time.perf_counter() - start

# The quickest of a few tries: a try that lost the CPU for a moment would read as a slow
# machine and make the call too short for what a test means to show.
rounds = int(20_000 * float(sys.argv[1]) / min(seconds(20_000) for _ in range(5)))
with StopRequest(on_quit=lambda: print("on_quit ran", flush=True)) as stop:
    print("before", flush=True)
    pbkdf2(rounds)
    time.sleep(0.1)  # the Python handlers run now
    print("after", stop.requested, flush=True)
"""


class Child:
    """A Python child whose output lines are read as they come, with their arrival time."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[tuple[str, float, str]] = []
        for name in ("stdout", "stderr"):
            stream = getattr(self.proc, name)
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            self.lines.put((name, time.monotonic(), line.rstrip("\n")))

    def wait_for(self, name: str, prefix: str, timeout: float = 30.0) -> float:
        """When a line of ``name`` starting with ``prefix`` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen = self.lines.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            self.seen.append(seen)
            if seen[0] == name and seen[2].startswith(prefix):
                return seen[1]
        self.proc.kill()
        raise AssertionError(f"no {prefix!r} on {name} in {timeout} s: {self.seen}")

    def finish(self, timeout: float = 30.0) -> tuple[int, list[str]]:
        """Its exit code and every line it wrote (stream: line)."""
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.1)  # the readers reach EOF
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code, [f"{name}: {line}" for name, _, line in self.seen]


def test_ctrl_c_in_a_long_c_call_is_answered_at_once():
    child = Child(BLOCKED_IN_C, "2")
    child.wait_for("stdout", "before")
    sent = time.monotonic()
    child.proc.send_signal(signal.SIGINT)
    heard = child.wait_for("stderr", "stop requested:")
    after = child.wait_for("stdout", "after")
    code, lines = child.finish()
    assert heard - sent < 3 and heard < after  # said while still in the C call
    assert code == 0
    assert "stdout: after True" in lines
    assert sum(line.startswith("stderr: stop requested:") for line in lines) == 1, lines
    assert any(line.endswith("Ctrl-C again to quit at once") for line in lines), lines


def test_a_second_ctrl_c_in_a_long_c_call_quits_without_waiting_for_it():
    child = Child(BLOCKED_IN_C, "30")
    child.wait_for("stdout", "before")
    child.proc.send_signal(signal.SIGINT)
    child.wait_for("stderr", "stop requested:")
    sent = time.monotonic()
    child.proc.send_signal(signal.SIGINT)
    child.wait_for("stderr", "interrupted: quitting now without saving")
    code, lines = child.finish()
    assert code == 130
    assert time.monotonic() - sent < 10  # after the grace period, not the 30 s call
    assert not any(line.startswith("stdout: after") for line in lines), lines
    assert "stdout: on_quit ran" in lines  # e.g. the run folder's "interrupted"


@pytest.mark.slow  # seconds of waiting: the fast tier keeps the two Ctrl-C tests
def test_sigterm_twice_in_a_long_c_call_never_quits():
    child = Child(BLOCKED_IN_C, "3")
    child.wait_for("stdout", "before")
    child.proc.send_signal(signal.SIGTERM)
    child.wait_for("stderr", "stop requested:")
    sent = time.monotonic()
    child.proc.send_signal(signal.SIGTERM)
    after = child.wait_for("stdout", "after")
    code, lines = child.finish()
    assert after - sent > signals.GRACE_S  # a second Ctrl-C would have quit by then
    assert code == 0
    assert "stdout: after True" in lines
    assert not any("quitting now" in line for line in lines), lines
    assert not any("Ctrl-C again" in line for line in lines), lines  # no Ctrl-C was pressed


# The main thread free to run its handlers: a second Ctrl-C is a KeyboardInterrupt, as
# ever, and the watcher lets it be for longer than its grace period.
RESPONSIVE = """
import signal, sys, time
from clip_jax.train import signals

with signals.StopRequest() as stop:
    signal.raise_signal(signal.SIGINT)
    time.sleep(0.1)
    print("requested", stop.requested, flush=True)
    try:
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.1)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
    time.sleep(signals.GRACE_S + 1)  # a watcher that thought otherwise would quit here
print("done", flush=True)
"""


@pytest.mark.slow  # seconds of waiting: the fast tier keeps the two Ctrl-C tests
def test_a_responsive_main_thread_gets_its_keyboard_interrupt_and_no_hard_exit():
    child = Child(RESPONSIVE)
    code, lines = child.finish()
    assert code == 0, lines
    assert [line for line in lines if line.startswith("stdout")] == [
        "stdout: requested True",
        "stdout: KeyboardInterrupt",
        "stdout: done",
    ]
    assert sum(line.startswith("stderr: stop requested:") for line in lines) == 1, lines
    assert not any("quitting now" in line for line in lines), lines
