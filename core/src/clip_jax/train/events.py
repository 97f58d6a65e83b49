"""What the training loop tells the world, as events to subscribers.

The loop does not write files or print: it emits events (a train record, an evaluation,
a checkpoint, a message, a guard event, a stop, the finish, a failure) and each
subscriber does its part: ``RunFolderWriter`` keeps metrics.jsonl and status.json,
``Progress`` shows the bar and writes run.log. An experiment logger (wandb, TensorBoard)
is one more subscriber with the ``on_<event>`` methods it needs, wrapped in ``Tolerant``
so that a tracker's failure costs the run one warning, never the run.

``reported`` wraps a whole run: whatever way it ends (finished, Ctrl-C or a stop request,
an error), ``on_finish``, ``on_stop`` or ``on_failure`` has reached the subscribers, so
status.json is never left saying "running". One of them, except that a stop can be
followed by a failure (an error while the run stops: the failure is then the record):
a subscriber that closes something on these events must close it idempotently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from clip_jax.run_folder import RunFolder


class Subscriber:
    """The loop's events; every method is a no-op here: override the ones you need."""

    def on_start(self, step: int, total: int) -> None: ...
    def on_run_info(self, step: int, info: dict[str, Any]) -> None: ...
    def on_message(self, text: str) -> None: ...
    def on_step(self, step: int, record: dict[str, Any]) -> None: ...
    def on_eval(self, step: int, results: dict[str, Any]) -> None: ...
    def on_checkpoint(self, step: int) -> None: ...
    def on_guard(self, step: int, event: str, text: str) -> None: ...
    def on_rollback(self, step: int, to_step: int) -> None: ...
    def on_stop(self, step: int) -> None: ...
    def on_finish(self, step: int, results: dict[str, Any]) -> None: ...
    def on_failure(self, step: int, error: str) -> None: ...


class Events:
    """Hands each event to every subscriber, in order: ``events.emit("step", 5, record)``."""

    def __init__(self, subscribers: Sequence[Subscriber] = ()):
        self.subscribers = list(subscribers)
        self.ended: str | None = None  # "finish", "stop" or "failure" once emitted

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def emit(self, event: str, *args: Any) -> None:
        if event in ("finish", "stop", "failure"):
            self.ended = event
        for subscriber in self.subscribers:
            getattr(subscriber, f"on_{event}")(*args)

    def message(self, text: str) -> None:
        self.emit("message", text)

    def quitting(self, step: int) -> None:
        """The process quits at once (a second Ctrl-C that the main thread, busy in XLA,
        could not answer): the run folder says "interrupted" at the last step, not
        "failed" for a process gone. Nothing else runs: no tracker's network call may
        hold up an exit the user asked to be immediate."""
        for subscriber in self.subscribers:
            if isinstance(subscriber, RunFolderWriter):
                subscriber.on_stop(step)


class RunFolderWriter(Subscriber):
    """metrics.jsonl and status.json (run.log is the display's: ``Progress``)."""

    def __init__(self, folder: RunFolder, total: int):
        self.folder, self.total = folder, total

    def on_start(self, step: int, total: int) -> None:
        self.folder.write_status("running", step=step, steps=total)

    def on_run_info(self, step: int, info: dict[str, Any]) -> None:
        # the spec is spec.resolved.toml already; the rest goes in run.log
        counts = ", ".join(f"{k} {v:,}" for k, v in info["parameters"].items())
        machine = ", ".join(f"{k} {v}" for k, v in info["machine"].items())
        self.folder.log(f"parameters: {counts}")
        self.folder.log(f"machine: {machine}")

    def on_step(self, step: int, record: dict[str, Any]) -> None:
        self.folder.append_metrics({"step": step, "split": "train", **record, "time": time.time()})
        self.folder.write_status("running", step=step, steps=self.total)

    def on_eval(self, step: int, results: dict[str, Any]) -> None:
        if results:
            record = {"step": step, "split": "validation", **results, "time": time.time()}
            self.folder.append_metrics(record)
        self.folder.flush_or_warn()  # on a URL: an evaluation is worth a write of its own

    def on_checkpoint(self, step: int) -> None:
        # On a URL the records up to a checkpoint are written with it: a resume keeps
        # those (truncate_metrics) and trains only what came after, so a record still
        # pending at a crash would be a gap for good. A store error is a warning: the
        # records stay pending and the next timed write tries again.
        self.folder.flush_or_warn()

    def on_rollback(self, step: int, to_step: int) -> None:
        self.folder.truncate_metrics(to_step)  # those steps are trained again

    def on_stop(self, step: int) -> None:
        self.folder.write_status("interrupted", step=step, steps=self.total)

    def on_finish(self, step: int, results: dict[str, Any]) -> None:
        self.folder.write_status("finished", step=step, steps=self.total)

    def on_failure(self, step: int, error: str) -> None:
        self.folder.write_status("failed", step=step, steps=self.total, error=error)


EVENTS = [name.removeprefix("on_") for name in vars(Subscriber) if name.startswith("on_")]


class Tolerant(Subscriber):
    """A subscriber whose first exception is reported once through ``warn`` and turns it
    off: an experiment tracker that fails (not logged in, a full disk) must not stop
    the training it only watches."""

    def __init__(self, inner: Subscriber, name: str, warn: Callable[[str], None]):
        self.inner, self.name, self.warn = inner, name, warn
        self.failed = False

    def _call(self, event: str, *args: Any) -> None:
        method = getattr(self.inner, f"on_{event}", None)  # a plugin may skip the base
        if self.failed or method is None:
            return
        try:
            method(*args)
        except Exception as exc:
            self.failed = True
            self.warn(
                f"warning: logger {self.name!r} failed in on_{event} "
                f"({type(exc).__name__}: {exc}); the run goes on without it"
            )


def _forward(event: str) -> Callable[..., None]:
    return lambda self, *args: self._call(event, *args)


for _event in EVENTS:
    setattr(Tolerant, f"on_{_event}", _forward(_event))


@contextmanager
def reported(events: Events, step: Callable[[], int]) -> Iterator[None]:
    """The run's end reaches the subscribers on every exit path (``step``: the last
    step done). A KeyboardInterrupt is a stop, anything else a failure."""
    try:
        yield
    except KeyboardInterrupt:
        if events.ended is None:  # a second Ctrl-C after a stop keeps the first's record
            events.emit("stop", step())
        raise
    except BaseException as exc:
        if events.ended in (None, "stop"):
            events.emit("failure", step(), f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if events.ended is None:  # a return without a finish: never leave "running"
            events.emit("failure", step(), "the run ended without finishing")


class _ToMessages(logging.Handler):
    def __init__(self, events: Events):
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.events.message(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # a log line must never break the run
            self.handleError(record)


@contextmanager
def log_messages(events: Events, logger: str = "clip_jax") -> Iterator[None]:
    """For the duration of a run, warnings of the ``clip_jax`` loggers (e.g. the data
    layer's "unreadable shard") become messages: on the display and in run.log."""
    handler = _ToMessages(events)
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield
    finally:
        target.removeHandler(handler)
