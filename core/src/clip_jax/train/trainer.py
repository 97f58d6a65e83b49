"""The training loop: spec -> components -> sharded state -> steps, evals, checkpoints.

Rerunning a spec on its run folder resumes from the last checkpoint (a finished run
returns at once); a different spec in a folder that holds a run is refused unless the
caller passes ``force=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from clip_jax import distributed, storage
from clip_jax import spec as spec_lib
from clip_jax.components import Components, components, unrolled_remat_notes
from clip_jax.data import naflex, pipeline
from clip_jax.data.naflex import patch_size_of
from clip_jax.data.readers import check_layout
from clip_jax.errors import UserError
from clip_jax.evaluate import at_budget, evaluate, head_scorer, padded_encoder
from clip_jax.host_memory import missing_huge_pages_hint
from clip_jax.models.captioning import greedy_captioner
from clip_jax.run_folder import RunFolder, RunFolderConflict, check_run_folder  # noqa: F401
from clip_jax.spec import RunSpec
from clip_jax.train import guards, loggers
from clip_jax.train.checkpoint import Checkpoints, checkpoint_directory
from clip_jax.train.events import Events, RunFolderWriter, log_messages, reported
from clip_jax.train.loop import TrainLoop
from clip_jax.train.progress import Progress
from clip_jax.train.state import (
    create_state,
    make_encoders,
    make_staged_train_step,
    state_shardings,
)
from clip_jax.train.teacher import teacher_of


def run_evaluation(
    comps: Components,
    params: Any,
    tokenizer,
    encoders: tuple[Callable, Callable],
    captioner: Callable | None = None,
) -> dict:
    """The run's validation split through the evaluators; ``captioner``: a captioning
    term's greedy decoder (``greedy_captioner``), whose captions are scored too."""
    spec, source = comps.spec, comps.data
    if not source.validation_files:
        return {}
    size = spec.eval.batch_size
    encode_images = padded_encoder(encoders[0], params, size)
    encode_tokens = padded_encoder(encoders[1], params, size)
    head_scores = head_scorer(comps, params, tokenizer, size)  # a head: its accuracy too
    caption_images = None
    if captioner is not None:  # a captioning term: how well its decoder captions
        captions_of = padded_encoder(captioner, params, size)
        caption_images = lambda images: tokenizer.decode(captions_of(images))  # noqa: E731

    def batches(preprocess):  # the validation split, preprocessed as told
        dataset = pipeline.make_dataset(
            source.validation_files,
            image_size=spec.model.vision.image_size,
            batch_size=size,
            image_key=source.keys.image_key,
            caption_key=source.keys.caption_key,
            label_key=source.keys.label_key,
            train=False,
            preprocess=preprocess,
            record_format=source.record_format,
            patch_size=patch_size_of(spec),
        )
        return pipeline.iterate(dataset)

    encode_texts = lambda texts: encode_tokens(tokenizer(texts))  # noqa: E731
    if spec.eval.max_patches:  # the same captions and prompts at every budget: once
        encode_texts = _remembered(encode_texts)
    common = {
        "classes": source.classes,
        "templates": source.templates,
        "zero_shot_enabled": spec.eval.zero_shot,
        "retrieval_enabled": spec.eval.retrieval,
        "max_examples": spec.eval.max_examples,
    }
    results = evaluate(
        batches(spec.preprocess),
        encode_images,
        encode_texts,
        **common,
        head_scores=head_scores,
        caption_images=caption_images,
    )
    own, vision = results, spec.model.vision
    for budget in spec.eval.max_patches or ():  # NaFlex: the images at other budgets too
        pre = spec.preprocess.model_copy(update={"max_patches": budget})
        at = own  # the run's own budget: measured above
        if budget != naflex.budget(spec.preprocess, vision.image_size, vision.patch_size):
            at = evaluate(batches(pre), encode_images, encode_texts, **common)
        results = results | at_budget(at, budget)
    return results


def _remembered(encode: Callable) -> Callable:
    """``encode(texts)``, computed once per distinct list of texts."""
    seen: dict[tuple[str, ...], Any] = {}

    def remembered(texts):
        key = tuple(texts)
        if key not in seen:
            seen[key] = encode(texts)
        return seen[key]

    return remembered


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
            raise UserError(f"train.init_from: {_missing_source(init_from)}")
    limit = getattr(comps.spec.tokenizer, "train_captions", 100_000)
    source = comps.data
    captions = (
        ()
        if saved
        else pipeline.read_captions(
            train_files, source.keys.caption_key, limit, source.record_format
        )
    )
    with storage.local_copy(saved) as local:  # a gs:// run folder's copy, read locally
        tokenizer = comps.tokenizer(saved=local, captions=captions)
    if not folder.tokenizer.exists() and folder.writable:
        with storage.staged(folder.tokenizer) as local:
            tokenizer.save(local)
    vocab = comps.spec.model.text.vocab_size
    if tokenizer.vocab_size > vocab:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is "
            f"{vocab}: raise model.text.vocab_size or lower tokenizer.vocab_size"
        )
    return tokenizer


def train(spec: RunSpec, force: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``spec``; returns the final evaluation.

    Everything that can fail on the user's input is checked before the run folder is
    created or changed: a run that never starts leaves no trace.
    """
    distributed.initialize(spec.distributed)
    comps = components(spec)
    preflight(comps)
    folder = RunFolder(spec.run.output_dir, writable=distributed.is_main())
    check_run_folder(folder, spec, force)
    folder.write_spec(spec_lib.to_toml(spec))
    total = spec.train.steps
    progress = Progress(
        total, 0, folder, stream, quiet=not folder.writable, batch_size=spec.train.batch_size
    )
    events = Events([RunFolderWriter(folder, total), progress])
    loops: list[TrainLoop] = []  # the loop, once made: the step a failure reports
    last_step = lambda: loops[0].step if loops else _last_step(folder)  # noqa: E731
    with reported(events, last_step), log_messages(events), ExitStack() as closing:
        closing.callback(progress.close)  # on every exit: checkpoints written out, then the bar
        loggers.subscribe(events, spec, folder)  # [logging]: trackers besides the run folder
        events.emit("start", 0, total)
        return _train(comps, folder, events, progress, closing, loops)


def preflight(comps: Components) -> None:
    """The checks that need no run folder, data reading or device work beyond the mesh."""
    from clip_jax.pretrained import parse_ref

    comps.check()  # what a head needs (towers, labels)
    spec = comps.spec
    source = comps.data  # the data files resolve
    path = getattr(spec.tokenizer, "path", None)
    if path and "://" not in path and not Path(path).exists():
        raise UserError(f"tokenizer.path: {path} does not exist; fix the path or unset it")
    init_from = spec.train.init_from  # a fresh run takes its tokenizer
    if (
        init_from
        and not parse_ref(init_from)
        and not RunFolder(spec.run.output_dir).tokenizer.exists()
        and not RunFolder(init_from).tokenizer.exists()
    ):
        raise UserError(f"train.init_from: {_missing_source(init_from)}")
    checkpoint_directory(RunFolder(spec.run.output_dir).checkpoints)  # a scheme orbax writes
    layout = comps.layout  # the mesh builds on these devices
    batch, micro, processes = spec.train.batch_size, spec.train.microbatches, jax.process_count()
    if batch % (layout.batch_divisor * processes * micro):
        per = f" x {micro} micro-batches" if micro > 1 else ""
        raise UserError(
            f"train.batch_size ({batch}) must be divisible by the {layout.batch_divisor} "
            f"devices of the batch axes{per}"
        )
    check_layout(len(source.train_files), source.keys.readers, batch, processes)


def _missing_source(init_from: str) -> str:
    """Why a fresh run cannot take its tokenizer from the run it starts from."""
    if not storage.path(init_from).exists():
        return f"{init_from} does not exist"
    return f"{init_from} has no tokenizer.json"


def _warm_start(spec: RunSpec, tx, init, abstract, shardings, layout):
    """A step-0 state whose parameters come from ``train.init_from``, with fresh moments;
    head and auxiliary-term parameters that the source lacks start as a fresh run's
    would. Also returns the groups it initialised (``head``, ``aux_<name>``)."""
    from clip_jax.train.warm_start import warm_params

    used = []

    def fresh_head(names: list[str]):  # jit keeps only those groups' share of the init
        groups = sorted({name.split("/")[0] for name in names})
        used.extend(groups)

        def added(rng):
            params = init(rng)["params"]
            return {k: params[k] for k in groups}

        return jax.device_get(jax.jit(added)(jax.random.key(spec.run.seed)))

    params = warm_params(
        spec.train.init_from, spec, abstract["params"], shardings["params"], layout, fresh_head
    )
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.make_array_from_callback((), shardings["step"], lambda _: np.zeros((), np.int32))
    state = {"step": step, "params": params, "opt_state": opt_state}
    if "teacher" in shardings:  # the EMA teacher starts as the student
        keys = tuple(shardings["teacher"])
        copy = jax.jit(lambda p: teacher_of(p, keys), out_shardings=shardings["teacher"])
        state["teacher"] = copy(params)
    return state, used


def _last_step(folder: RunFolder) -> int:
    return max((r.get("step", 0) for r in folder.metrics()), default=0)


def _train(
    comps: Components,
    folder: RunFolder,
    events: Events,
    progress: Progress,
    closing: ExitStack,
    loops: list,
) -> dict[str, Any]:
    spec = comps.spec
    total, layout = spec.train.steps, comps.layout
    events.message(
        f"run folder {folder.path} | devices {jax.device_count()} | "
        f"processes {jax.process_count()} | preparing data"
    )
    hint = missing_huge_pages_hint(jax.default_backend())
    if hint:
        events.message(hint)
    for note in unrolled_remat_notes(spec):
        events.message(f"note: {note}")
    tokenizer = load_tokenizer(comps, folder, comps.data.train_files)
    tx, schedule = comps.optimizer()
    init, abstract, shardings = state_shardings(comps.model, tx, layout, spec)
    shardings = {**shardings, "guard": guards.guard_shardings(layout.mesh)}
    window = spec.train.spike.window
    checkpoints = Checkpoints(folder.checkpoints, spec.train.keep_checkpoints, 1)
    closing.callback(checkpoints.close)

    def restore(step: int) -> tuple[Any, dict[str, Any]]:
        guard = guards.abstract_guard(window, shardings["guard"])
        state, data_state = checkpoints.restore(step, abstract, guard)
        if "guard" not in state:  # a checkpoint from before guards, or another window
            state["guard"] = guards.create_guard(window, shardings["guard"])
        return state, data_state

    latest = checkpoints.latest_step()
    if latest is None:
        if spec.train.init_from:  # no random init first: one state in memory, not two
            state, fresh = _warm_start(spec, tx, init, abstract, shardings, layout)
            fresh_head = (
                f" ({', '.join(f'{k}/' for k in fresh)} initialised fresh)" if fresh else ""
            )
            events.message(f"parameters from {spec.train.init_from}{fresh_head}")
        else:
            state = create_state(
                init, {k: v for k, v in shardings.items() if k != "guard"}, spec.run.seed
            )
        state["guard"] = guards.create_guard(window, shardings["guard"])
        data_state = None
    else:
        state, data_state = restore(latest)
        folder.truncate_metrics(latest)
        events.message(f"resumed from the checkpoint at step {latest}")
    step = int(state["step"])
    progress.resume_at(step)
    final = folder.last_eval()
    if step >= total and final is not None and final.get("step") == step:
        events.message(f"run already finished at step {step}")
        events.emit("finish", step, final)
        return final
    events.emit("run_info", step, loggers.run_info(spec, state["params"]))
    train_step = make_staged_train_step(
        comps.objective_stages(),
        model=comps.model,
        loss_fn=comps.loss.fn,
        tx=tx,
        schedule=schedule,
        shardings=shardings,
        layout=layout,
        seed=spec.run.seed,
        microbatches=spec.train.microbatches,
        guard=spec.train.spike,
        teacher=comps.teacher,
    )
    encoders = make_encoders(comps.model)
    captioner = greedy_captioner(comps.model, tokenizer)  # built once: it compiles
    evaluate = lambda step, state: _evaluate(
        comps, folder, events, step, state, tokenizer, (encoders, captioner)
    )  # noqa: E731
    loop = TrainLoop(comps, events, checkpoints, tokenizer, evaluate, restore, _rollbacks(folder))
    loops.append(loop)
    loop.step = step
    return loop.run(state, data_state, train_step)


def _rollbacks(folder: RunFolder) -> int:
    """Rollbacks so far (process 0's count, for the record; limits count this process's)."""
    train = [r for r in folder.metrics() if r.get("split") == "train"]
    return int(train[-1].get("guard/rollbacks", 0)) if train else 0


def _evaluate(comps, folder, events, step, state, tokenizer, compiled) -> dict[str, Any]:
    # Multi-process: every process helps gather the parameters; process 0 evaluates.
    params = distributed.to_host(state["params"])
    if not folder.writable:
        return {}
    encoders, captioner = compiled
    results = run_evaluation(comps, params, tokenizer, encoders, captioner)
    events.emit("eval", step, results)  # its time: the next record's time/eval_s
    return results
