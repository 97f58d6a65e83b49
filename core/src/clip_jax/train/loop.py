"""The steps of one run: dispatch, log, evaluate, save, guard, stop when asked.

The host never waits for the step it has just launched: batches are prepared ahead by a
thread (``Prefetch``), and a step's metrics stay on the device until the next step is
dispatched. The host runs at most one step ahead of the device, which keeps the batches
in flight few and lets the wait for data measure the time the device is idle. Each
step's guard verdict (``clip_jax.train.guards``) is read then, one step late, as a
single scalar: the host waits for that step anyway.

The loop writes nothing itself: it emits events (``clip_jax.train.events``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import jax
import numpy as np

from clip_jax import distributed
from clip_jax.components import Components
from clip_jax.data.naflex import patch_size_of
from clip_jax.data.readers import Readers, data_checkpoint
from clip_jax.errors import UserError
from clip_jax.train import guards
from clip_jax.train.checkpoint import Checkpoints
from clip_jax.train.events import Events
from clip_jax.train.prefetch import Prefetch, StepBatch, device_batches
from clip_jax.train.progress import Clock
from clip_jax.train.signals import StopRequest

Restore = Callable[[int], tuple[Any, dict[str, Any]]]


class Rollback(Exception):
    """A spike at ``step`` with ``train.spike.action = "rollback"``: back to a checkpoint."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


class TrainLoop:
    """``run(state, data_state, train_step)``: from the state's step to ``train.steps``.

    ``restore(step) -> (state, data_state)`` reads a checkpoint, for rollbacks.
    """

    def __init__(
        self,
        comps: Components,
        events: Events,
        checkpoints: Checkpoints,
        tokenizer: Callable,
        evaluate: Callable[[int, Any], dict[str, Any]],
        restore: Restore,
        rollbacks: int = 0,
    ):
        self.comps, self.spec, self.options = comps, comps.spec, comps.spec.train
        self.events, self.checkpoints = events, checkpoints
        self.tokenizer, self.evaluate, self.restore = tokenizer, evaluate, restore
        self.total = self.options.steps
        self.clock = Clock()
        self.step = 0  # the last step dispatched
        self.judged = 0  # the last step whose guard verdict was read
        self.rollbacks, self.rollbacks_here = rollbacks, 0
        self.pass_over = 0  # batches to drop before the next step (after a rollback)
        self.last_save = time.monotonic()
        self.pending: tuple[int, Any, dict[str, int]] | None = None  # a log step's record

    # ----------------------------------------------------------- what a step is
    def is_log_step(self, step: int) -> bool:
        return step % self.options.log_every == 0

    def is_final_step(self, step: int) -> bool:
        return step == self.total

    def is_eval_step(self, step: int) -> bool:
        every = self.spec.eval.every
        return bool(every) and step % every == 0 and not self.is_final_step(step)

    def is_checkpoint_step(self, step: int) -> bool:
        return step % self.options.checkpoint_every == 0 or self.is_final_step(step)

    def is_checkpoint_due(self) -> bool:
        """This process's clock says ``train.checkpoint_minutes`` have passed."""
        minutes = self.options.checkpoint_minutes
        return minutes is not None and time.monotonic() - self.last_save >= 60 * minutes

    # ------------------------------------------------------------------ the run
    def run(self, state, data_state: dict[str, Any] | None, train_step: Callable) -> dict:
        self.step = self.judged = int(state["step"])
        with StopRequest(on_quit=lambda: self.events.quitting(self.judged)) as stop:
            # Processes stop together: a request to any one of them (Ctrl-C on its
            # terminal, `clipctl stop` to process 0) is agreed on at the next sync point,
            # so all save the same step and none is left waiting in a collective.
            if distributed.any_process(stop.requested):  # before the first step: no save
                raise KeyboardInterrupt
            while True:
                try:
                    state = self.steps(state, data_state, train_step, stop)
                    break
                except Rollback as spike:
                    state, data_state = self.roll_back(spike.step)
        self.checkpoints.close()  # the last save committed before the run says "finished"
        results = self.evaluate(self.step, state)
        self.events.emit("finish", self.step, results)
        return results

    def steps(self, state, data_state, train_step: Callable, stop: StopRequest):
        """Steps until the last one; a stop raises KeyboardInterrupt, a spike Rollback."""
        with self.batches(data_state) as batches:
            for _ in range(self.pass_over):
                next(batches)
            self.pass_over = 0
            in_flight = None  # the last step dispatched (its metrics)
            try:
                while self.step < self.total:
                    batch = self.next_batch(batches, in_flight)
                    state, metrics = train_step(state, *batch.inputs, step=self.step)
                    self.step = step = self.step + 1
                    # The host keeps one step ahead of the device: it waits for the step
                    # before this one, while the device has this one to run.
                    jax.block_until_ready(in_flight)
                    self.guard(step - 1, in_flight, state, batch)
                    in_flight = metrics
                    if not self.clock.started:  # the first step compiles: time from here on
                        jax.block_until_ready(metrics)
                        self.clock.start(step)
                    self.write_pending()  # the last log step's: done
                    self.after_step(step, state, metrics, batch, stop)
            finally:  # a failure after a log step still leaves its record
                with suppress(Exception):
                    self.write_pending()
        return state

    def after_step(self, step: int, state, metrics, batch: StepBatch, stop) -> None:
        """Record, evaluate, save or stop, as this step asks."""
        stopping, save_due = self.agree(step, stop.requested)
        if self.is_log_step(step) or self.is_final_step(step) or stopping:
            self.pending = (step, metrics, batch.skipped)
        eval_now = self.is_eval_step(step) and not stopping
        save_now = self.is_checkpoint_step(step) or save_due or stopping
        if eval_now or save_now:  # both wait for the device: the record first
            self.write_pending()
            self.guard(step, metrics, state, batch)  # never save a step that rolls back
        if eval_now:
            with self.clock.timing("eval"):
                self.evaluate(step, state)
        if save_now:
            with self.clock.timing("checkpoint"):
                self.save(step, state, batch, force=stopping or save_due)
        if stopping:
            self.checkpoints.close()
            raise KeyboardInterrupt

    def agree(self, step: int, requested: bool) -> tuple[bool, bool]:
        """(stop now, a timed checkpoint is due). One process decides alone at every
        step; several agree at log steps only (a collective makes the host wait for the
        device), on any process's stop request and on process 0's clock."""
        if jax.process_count() == 1:
            return requested, self.is_checkpoint_due()
        if not self.is_log_step(step):
            return False, False
        flags = np.asarray([[requested, self.is_checkpoint_due()]], np.int32)
        gathered = distributed.allgather(flags).reshape(-1, 2)
        return bool(gathered[:, 0].any()), bool(gathered[0, 1])

    # ------------------------------------------------------------------- guards
    def guard(self, step: int, metrics: Any, state, batch: StepBatch) -> None:
        """Read ``step``'s verdict (once): log an event, stop or roll back as told. The
        last step is a checkpoint step: ``after_step`` judges it before saving."""
        if metrics is None or step <= self.judged:
            return
        self.judged = step
        event = guards.EVENTS[int(metrics["guard/event"])]
        if event is None:
            return
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if "/" not in k}
        spike = self.options.spike
        self.events.emit("guard", step, event, guards.event_line(step, event, values, spike))
        if event == "nonfinite" and self.options.on_nonfinite == "stop":
            self.stop_nonfinite(step, state, batch)
        if event == "spike" and spike.action == "rollback":
            self.checkpoints.wait()  # a save in flight is a checkpoint to go back to
            if self.checkpoints.latest_step() is None:
                self.events.message("guard: no checkpoint to roll back to yet; update skipped")
            else:
                raise Rollback(step)

    def stop_nonfinite(self, step: int, state, batch: StepBatch) -> None:
        """Save the state (its non-finite updates were never applied), then fail."""
        self.save(self.step, state, batch, force=True)
        self.checkpoints.close()
        saved = self.checkpoints.latest_step()
        kept = f"; the checkpoint at step {saved} holds the last good state" if saved else ""
        raise guards.NonFiniteStop(
            f"train.on_nonfinite: step {step} had a non-finite loss or gradient: the run "
            f"stopped before applying it{kept}. Lower the learning rate or check the data; "
            'set "skip" to pass over such steps'
        )

    def roll_back(self, step: int) -> tuple[Any, dict[str, Any]]:
        """The last checkpoint's state and data position, the next batches passed over."""
        spike = self.options.spike
        self.rollbacks += 1
        self.rollbacks_here += 1
        if self.rollbacks_here > spike.max_rollbacks:
            raise UserError(
                f"train.spike: spikes made the run roll back more than "
                f"{spike.max_rollbacks} times: lower the learning rate, or raise "
                "train.spike.k or train.spike.max_rollbacks"
            )
        to_step = self.checkpoints.latest_step()
        state, data_state = self.restore(to_step)
        self.events.emit("rollback", step, to_step)
        self.events.message(
            f"guard: rolled back to step {to_step}; passing over the next "
            f"{spike.rollback_skip_batches} batches"
        )
        self.step = self.judged = to_step
        self.pass_over = spike.rollback_skip_batches
        self.pending = None
        return state, data_state

    # -------------------------------------------------------------------- data
    def batches(self, data_state: dict[str, Any] | None) -> Prefetch:
        """This process's batches from the checkpoint's position on, prepared ahead."""
        spec, keys, head = self.spec, self.comps.data.keys, self.comps.head
        readers = Readers(
            self.comps.data.train_files,
            keys,
            resume=data_state,
            image_size=spec.model.vision.image_size,
            global_batch=spec.train.batch_size,
            seed=spec.run.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            preprocess=spec.preprocess,
            labels=head.needs_labels,
            record_format=self.comps.data.record_format,
            patch_size=patch_size_of(spec),
        )
        labels = (lambda b: checked_labels(b, head, keys)) if head.needs_labels else None
        return Prefetch(readers, device_batches(self.comps.layout, self.tokenizer, labels))

    def next_batch(self, batches: Prefetch, in_flight: Any) -> StepBatch:
        """The next batch. When none is ready yet, the device first finishes its step, so
        ``time/data_wait_frac`` counts the time it sits idle waiting for data."""
        if in_flight is not None and not batches.ready():
            jax.block_until_ready(in_flight)
        with self.clock.timing("data_wait"):
            return next(batches)

    # ------------------------------------------------------------ records, saves
    def write_pending(self) -> None:
        """Fetch the metrics of the pending log step and emit its record."""
        if self.pending is None:
            return
        (step, metrics, skipped), self.pending = self.pending, None
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        record.pop("guard/event", None)  # the step's own verdict: events say it
        record["guard/rollbacks"] = self.rollbacks
        record |= self.clock.lap(step, self.options.batch_size)
        record["skipped_records"] = sum(skipped.values())  # this process's readers
        record |= {f"skipped/{reason}": n for reason, n in sorted(skipped.items())}
        self.events.emit("step", step, record)

    def save(self, step: int, state, batch: StepBatch, force: bool) -> None:
        """A checkpoint at ``step``, with the data position after ``batch``, its last."""
        # Every process owns some readers: gather all their rows (a collective).
        data = data_checkpoint(distributed.allgather(batch.positions))
        if self.checkpoints.save(step, state, data, force=force):
            self.events.emit("checkpoint", step)
        self.last_save = time.monotonic()


def checked_labels(labels: np.ndarray, head, keys) -> np.ndarray:
    """The batch's labels as int32; a label the head has no class for is an error."""
    if head.num_classes is not None and labels.size and labels.max() >= head.num_classes:
        raise UserError(
            f"head.num_classes is {head.num_classes}, but the data's {keys.label_key!r} "
            f"feature holds label {int(labels.max())}: raise head.num_classes"
        )
    return labels.astype(np.int32)
