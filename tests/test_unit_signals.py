"""``StopRequest`` with real signals sent to this process: the first Ctrl-C or SIGTERM
asks for a graceful stop, a second Ctrl-C interrupts at once, and the handlers that were
there before come back afterwards."""

import signal
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
