"""The training loop: spec -> components -> sharded state -> steps, evals, checkpoints.

Rerunning a spec on its run folder resumes from the last checkpoint (a finished run
returns at once); a different spec in a folder that holds a run is refused unless the
caller passes ``force=True``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from typing import Any, TextIO

import jax
import numpy as np

from clip_jax import distributed
from clip_jax import spec as spec_lib
from clip_jax.components import Components, components
from clip_jax.data import pipeline
from clip_jax.data.readers import Readers
from clip_jax.errors import UserError
from clip_jax.evaluate import evaluate, padded_encoder
from clip_jax.run_folder import RunFolder, RunFolderConflict, check_run_folder  # noqa: F401
from clip_jax.spec import RunSpec
from clip_jax.train.checkpoint import Checkpoints
from clip_jax.train.prefetch import Prefetch, StepBatch, device_batches
from clip_jax.train.progress import Clock, Progress
from clip_jax.train.signals import StopRequest
from clip_jax.train.state import create_state, make_encoders, make_train_step, state_shardings


def run_evaluation(
    comps: Components, params: Any, tokenizer, encoders: tuple[Callable, Callable]
) -> dict:
    spec, source = comps.spec, comps.data
    if not source.validation_files:
        return {}
    size = spec.eval.batch_size
    encode_images = padded_encoder(encoders[0], params, size)
    encode_tokens = padded_encoder(encoders[1], params, size)
    head_scores = None
    if comps.classifier is not None:  # a classification head: its accuracy too
        classify = padded_encoder(comps.classifier, params, size)
        if comps.head.tower == "text":
            head_scores = lambda batch: classify(tokenizer(batch.captions))
        else:
            head_scores = lambda batch: classify(batch.images)
    dataset = pipeline.make_dataset(
        source.validation_files,
        image_size=spec.model.vision.image_size,
        batch_size=size,
        image_key=source.keys.image_key,
        caption_key=source.keys.caption_key,
        label_key=source.keys.label_key,
        train=False,
        preprocess=spec.preprocess,
    )
    return evaluate(
        pipeline.iterate(dataset),
        encode_images,
        lambda texts: encode_tokens(tokenizer(texts)),
        classes=source.classes,
        templates=source.templates,
        zero_shot_enabled=spec.eval.zero_shot,
        retrieval_enabled=spec.eval.retrieval,
        max_examples=spec.eval.max_examples,
        head_scores=head_scores,
    )


def load_tokenizer(comps: Components, folder: RunFolder, train_files: Sequence[str]):
    """This run's tokenizer; at a fresh start, the one of the run it starts from
    (``train.init_from``: its token embeddings mean those ids), else one trained here."""
    from clip_jax.pretrained import parse_ref

    saved = folder.tokenizer if folder.tokenizer.exists() else None
    init_from = comps.spec.train.init_from
    # A published checkpoint's tokenizer is the spec's tokenizer.path (its defaults).
    if saved is None and init_from and not parse_ref(init_from):
        saved = RunFolder(init_from).tokenizer
        if not saved.exists():
            raise UserError(f"train.init_from: {init_from} has no tokenizer.json")
    limit = getattr(comps.spec.tokenizer, "train_captions", 100_000)
    captions = (
        () if saved else pipeline.read_captions(train_files, comps.data.keys.caption_key, limit)
    )
    tokenizer = comps.tokenizer(saved=saved, captions=captions)
    if not folder.tokenizer.exists() and folder.writable:
        tokenizer.save(folder.tokenizer)
    vocab = comps.spec.model.text.vocab_size
    if tokenizer.vocab_size > vocab:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is "
            f"{vocab}: raise model.text.vocab_size or lower tokenizer.vocab_size"
        )
    return tokenizer


def train(spec: RunSpec, force: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``spec``; returns the final evaluation."""
    distributed.initialize(spec.distributed)
    comps = components(spec)
    comps.check()  # what a head needs (towers, labels): refused before the folder is written
    folder = RunFolder(spec.run.output_dir, writable=distributed.is_main())
    check_run_folder(folder, spec, force)
    folder.write_spec(spec_lib.to_toml(spec))
    total = spec.train.steps
    folder.write_status("running", step=0, steps=total)
    try:
        return _train(comps, folder, stream)
    except KeyboardInterrupt:
        if folder.status().get("state") != "interrupted":  # a second Ctrl-C
            folder.write_status("interrupted", step=_last_step(folder), steps=total)
        raise
    except BaseException as exc:
        folder.write_status("failed", error=f"{type(exc).__name__}: {exc}", steps=total)
        raise


def _warm_start(spec: RunSpec, tx, init, abstract, shardings, layout):
    """A step-0 state whose parameters come from ``train.init_from``, with fresh moments;
    head parameters that the source lacks start as a fresh run's would. Also returns
    whether it initialised any."""
    from clip_jax.train.warm_start import warm_params

    used = []

    def fresh_head():  # jit keeps only the head's share of the init: nothing else is made
        used.append(True)
        head = jax.jit(lambda rng: {"head": init(rng)["params"]["head"]})
        return jax.device_get(head(jax.random.key(spec.run.seed)))

    params = warm_params(
        spec.train.init_from, spec, abstract["params"], shardings["params"], layout, fresh_head
    )
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.make_array_from_callback((), shardings["step"], lambda _: np.zeros((), np.int32))
    return {"step": step, "params": params, "opt_state": opt_state}, bool(used)


def _last_step(folder: RunFolder) -> int:
    return max((r.get("step", 0) for r in folder.metrics()), default=0)


def _train(comps: Components, folder: RunFolder, stream: TextIO | None) -> dict[str, Any]:
    spec = comps.spec
    total, batch_size = spec.train.steps, spec.train.batch_size
    layout = comps.layout
    micro = spec.train.microbatches
    if batch_size % (layout.batch_divisor * jax.process_count() * micro):
        per = f" x {micro} micro-batches" if micro > 1 else ""
        raise UserError(
            f"train.batch_size ({batch_size}) must be divisible by the {layout.batch_divisor} "
            f"devices of the batch axes{per}"
        )
    with ExitStack() as closing:  # on every exit: checkpoints written out, then the bar
        progress = Progress(total, 0, folder, stream, quiet=not folder.writable)
        closing.callback(progress.close)
        progress.message(
            f"run folder {folder.path} | devices {jax.device_count()} | "
            f"processes {jax.process_count()} | preparing data"
        )
        source = comps.data
        tokenizer = load_tokenizer(comps, folder, source.train_files)
        tx, schedule = comps.optimizer()
        model = comps.model
        init, abstract, shardings = state_shardings(model, tx, layout, spec)
        checkpoints = Checkpoints(
            folder.checkpoints, spec.train.keep_checkpoints, spec.train.checkpoint_every
        )
        closing.callback(checkpoints.close)
        latest = checkpoints.latest_step()
        if latest is None:
            if spec.train.init_from:  # no random init first: one state in memory, not two
                state, fresh = _warm_start(spec, tx, init, abstract, shardings, layout)
                fresh_head = " (head/ initialised fresh)" if fresh else ""
                progress.message(f"parameters from {spec.train.init_from}{fresh_head}")
            else:
                state = create_state(init, shardings, spec.run.seed)
            data_state = {"positions": [0] * source.keys.readers, "skipped": 0}
        else:
            state, data_state = checkpoints.restore(latest, abstract)
            folder.truncate_metrics(latest)
            progress.message(f"resumed from the checkpoint at step {latest}")
        step = int(state["step"])
        progress.resume_at(step)
        final = folder.last_eval()
        if step >= total and final is not None and final.get("step") == step:
            progress.message(f"run already finished at step {step}")
            folder.write_status("finished", step=step, steps=total)
            return final
        train_step = make_train_step(
            model,
            comps.loss.fn,
            tx,
            schedule,
            shardings,
            layout,
            seed=spec.run.seed,
            objective=comps.head.objective(model, comps.loss.fn),
            microbatches=spec.train.microbatches,
        )
        loop = TrainLoop(comps, folder, progress, checkpoints, tokenizer, make_encoders(model))
        return loop.run(state, data_state, train_step)


class TrainLoop:
    """The steps of one run: dispatch, log, evaluate, save, stop when asked.

    The host never waits for the step it has just launched: batches are prepared ahead
    by a thread (``Prefetch``), and a log step's metrics stay on the device until the next
    step is dispatched. Only the last step, a stop, an evaluation or a checkpoint writes
    its record at once (each waits for the device anyway). The host runs at most one
    step ahead of the device, which keeps the batches in flight few and lets the wait
    for data measure the time the device is idle.
    """

    def __init__(
        self,
        comps: Components,
        folder: RunFolder,
        progress: Progress,
        checkpoints: Checkpoints,
        tokenizer: Callable,
        encoders: tuple[Callable, Callable],
    ):
        self.comps, self.spec = comps, comps.spec
        self.folder, self.progress, self.checkpoints = folder, progress, checkpoints
        self.tokenizer, self.encoders = tokenizer, encoders
        self.total = self.spec.train.steps
        self.clock = Clock()
        self.pending: tuple[int, Any, int] | None = None  # a log step's (step, metrics, skipped)

    def is_log_step(self, step: int) -> bool:
        return step % self.spec.train.log_every == 0

    def is_final_step(self, step: int) -> bool:
        return step == self.total

    def is_eval_step(self, step: int) -> bool:
        every = self.spec.eval.every
        return bool(every) and step % every == 0 and not self.is_final_step(step)

    def is_checkpoint_step(self, step: int) -> bool:
        return step % self.spec.train.checkpoint_every == 0 or self.is_final_step(step)

    def batches(self, data_state: dict[str, Any]) -> Prefetch:
        """This process's batches from the checkpoint's positions on, prepared ahead."""
        spec, keys, head = self.spec, self.comps.data.keys, self.comps.head
        # Checkpoints before data.readers existed hold a single "position".
        positions = data_state.get("positions", [data_state.get("position", 0)])
        readers = Readers(
            self.comps.data.train_files,
            keys,
            image_size=spec.model.vision.image_size,
            global_batch=spec.train.batch_size,
            seed=spec.run.seed,
            positions=positions,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            preprocess=spec.preprocess,
            labels=head.needs_labels,
        )
        labels = (lambda b: _checked_labels(b, head, keys)) if head.needs_labels else None
        return Prefetch(readers, device_batches(self.comps.layout, self.tokenizer, labels))

    def run(self, state, data_state: dict[str, Any], train_step: Callable) -> dict[str, Any]:
        step, total = int(state["step"]), self.total
        skipped_before = data_state.get("skipped", 0)  # all readers, up to the checkpoint
        results: dict[str, Any] = {}
        with self.batches(data_state) as batches, StopRequest() as stop:
            # Processes stop together: a request to any one of them (Ctrl-C on its
            # terminal, `clipctl stop` to process 0) is agreed on at the next sync point,
            # so all save the same step and none is left waiting in a collective.
            if distributed.any_process(stop.requested):  # before the first step: no save
                self.stopped(step)
            try:
                in_flight = None  # the last step dispatched (its metrics)
                while step < total:
                    batch = self.next_batch(batches, in_flight)
                    state, metrics = train_step(state, *batch.inputs)
                    step += 1
                    # The host keeps one step ahead of the device: it waits for the step
                    # before this one, while the device has this one to run.
                    jax.block_until_ready(in_flight)
                    in_flight = metrics
                    if not self.clock.started:  # the first step compiles: time from here on
                        jax.block_until_ready(metrics)
                        self.clock.start(step)
                    self.write_pending()  # the last log step's: done
                    stopping = _stop_agreed(stop.requested, self.is_log_step(step))
                    if self.is_log_step(step) or self.is_final_step(step) or stopping:
                        self.pending = (step, metrics, skipped_before + batch.skipped)
                    eval_now = self.is_eval_step(step) and not stopping
                    save_now = self.is_checkpoint_step(step) or stopping
                    if eval_now or save_now:  # both wait for the device: the record first
                        self.write_pending()
                    if eval_now:
                        with self.clock.timing("eval"):
                            results = self.evaluate(step, state)
                    if save_now:
                        with self.clock.timing("checkpoint"):
                            self.save(step, state, batch, skipped_before, force=stopping)
                    if stopping:
                        self.checkpoints.close()
                        self.stopped(step)
            finally:  # a failure after a log step still leaves its record
                with suppress(Exception):
                    self.write_pending()
        results = self.evaluate(step, state)
        self.folder.write_status("finished", step=step, steps=total)
        return results

    def next_batch(self, batches: Prefetch, in_flight: Any) -> StepBatch:
        """The next batch. When none is ready yet, the device first finishes its step, so
        ``time/data_wait_frac`` counts the time it sits idle waiting for data."""
        if in_flight is not None and not batches.ready():
            jax.block_until_ready(in_flight)
        with self.clock.timing("data_wait"):
            return next(batches)

    def write_pending(self) -> None:
        """Fetch the metrics of the pending log step and write its record."""
        if self.pending is None:
            return
        (step, metrics, skipped), self.pending = self.pending, None
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        batch_size = self.spec.train.batch_size
        record |= self.clock.lap(step, batch_size)
        record["skipped_records"] = skipped  # this process's readers
        self.folder.append_metrics({"step": step, "split": "train", **record, "time": time.time()})
        self.progress.update(step, {**record, "batch_size": batch_size})
        self.folder.write_status("running", step=step, steps=self.total)

    def save(self, step: int, state, batch: StepBatch, skipped_before: int, force: bool) -> None:
        """A checkpoint at ``step``, with the data position after ``batch``, its last."""
        # Every process owns some readers: gather all positions (a collective).
        skipped = distributed.allgather(np.asarray([batch.skipped]))
        data = {
            "positions": [int(p) for p in distributed.allgather(batch.positions)],
            "skipped": skipped_before + int(skipped.sum()),
        }
        self.checkpoints.save(step, state, data, force=force)

    def evaluate(self, step: int, state) -> dict[str, Any]:
        return _evaluate(
            self.comps, self.folder, self.progress, step, state, self.tokenizer, self.encoders
        )

    def stopped(self, step: int) -> None:
        self.progress.message(f"stopped at step {step}; rerun the same command to resume")
        self.folder.write_status("interrupted", step=step, steps=self.total)
        raise KeyboardInterrupt


def _checked_labels(labels: np.ndarray, head, keys) -> np.ndarray:
    """The batch's labels as int32; a label the head has no class for is an error."""
    if head.num_classes is not None and labels.size and labels.max() >= head.num_classes:
        raise UserError(
            f"head.num_classes is {head.num_classes}, but the data's {keys.label_key!r} "
            f"feature holds label {int(labels.max())}: raise head.num_classes"
        )
    return labels.astype(np.int32)


def _stop_agreed(requested: bool, sync_point: bool) -> bool:
    """One process decides alone at every step; several agree at log steps only, since
    agreeing is a collective that makes the host wait for the device."""
    if jax.process_count() == 1:
        return requested
    return sync_point and distributed.any_process(requested)


def _evaluate(comps, folder, progress, step, state, tokenizer, encoders) -> dict[str, Any]:
    started = time.perf_counter()
    # Multi-process: every process helps gather the parameters; process 0 evaluates.
    params = distributed.to_host(state["params"])
    if not folder.writable:
        return {}
    results = run_evaluation(comps, params, tokenizer, encoders)
    if results:
        record = {"step": step, "split": "validation", **results, "time": time.time()}
        folder.append_metrics(record)
        shown = " | ".join(f"{k} {v:.3f}" for k, v in results.items() if isinstance(v, float))
        progress.message(f"eval step {step} | {shown} | {time.perf_counter() - started:.1f}s")
    return results
