"""Will it fit? The compiled per-device memory of the train step, and the largest batch.

An SPMD program's memory per device is what XLA's memory analysis reports for one
partition of it, so the real train step (``make_train_step`` on the real state
shardings) is lowered for ``jax.ShapeDtypeStruct`` arguments that carry their
shardings and compiled; nothing is allocated. Peak = arguments + outputs - aliased
(the donated state) + temporaries + code.

A mesh of N devices needs N devices to compile for: the local ones when there are
enough (a subset is fine), else a subprocess with N simulated CPU devices
(``--xla_force_host_platform_device_count``). A CPU compile estimates an accelerator's
program: fusion, layouts and bf16 handling differ there (``FOOTNOTE``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from clip_jax.errors import UserError
from clip_jax.fits import ACCELERATORS, largest_batch, local_device_memory, size

FOOTNOTE = (
    "compiled by XLA for {devices} simulated CPU devices: an estimate for TPU/GPU, whose "
    "fusion, layouts and bf16 handling differ"
)
PORTABLE_ATTENTION = (
    "{keys} = 'cudnn' estimated with XLA's attention (no GPU here), which keeps the "
    "(L x L) scores that the fused kernel does not: the GPU's peak is lower"
)


# ------------------------------------------------------------------- estimates
@dataclass
class Estimate:
    """Per-device bytes of one compiled train step."""

    strategy: str
    mesh: dict[str, int]
    batch: int
    microbatches: int
    per_device_batch: int  # images per device in a step (all its micro-batches)
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    platform: str
    peak: int = field(init=False)

    def __post_init__(self) -> None:
        self.peak = self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Estimator:
    """Compiles the train step of one spec (path + overrides) for ``devices`` local
    devices, per (strategy, microbatches) and batch; every compile is cached."""

    def __init__(
        self,
        path: str,
        overrides: Sequence[str],
        devices: int,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        import jax

        self.path, self.overrides = str(path), list(overrides)
        self.progress = progress or (lambda message: None)
        self.devices = jax.devices()[:devices]
        self.platform = self.devices[0].platform
        self._base = None
        self.portable: list[str] = []  # keys whose cuDNN attention is estimated with XLA's
        self._steps: dict[tuple[str, int], tuple] = {}
        self._estimates: dict[tuple[str, int, int], Estimate] = {}

    def spec(self, strategy: str | None = None, microbatches: int | None = None):
        """The spec, or its variant with another strategy / micro-batch count, as the
        overrides ``sharding.strategy=...`` and ``train.microbatches=...`` give it."""
        from clip_jax.components import with_portable_attention
        from clip_jax.spec import load_spec

        if self._base is None:
            self._base, self.portable = with_portable_attention(
                load_spec(self.path, self.overrides)
            )
        base, extra = self._base, []
        if strategy and strategy != base.sharding.strategy:
            extra.append(f"sharding.strategy={strategy}")
        if microbatches and microbatches != base.train.microbatches:
            extra.append(f"train.microbatches={microbatches}")
            if base.train.batch_size % microbatches:  # the batch is the estimate's own
                extra.append(f"train.batch_size={base.train.batch_size * microbatches}")
        if not extra:
            return base
        return with_portable_attention(load_spec(self.path, [*self.overrides, *extra]))[0]

    def _step(self, strategy: str, microbatches: int) -> tuple:
        key = (strategy, microbatches)
        if key not in self._steps:
            self._steps[key] = self._build(self.spec(strategy, microbatches), microbatches)
        return self._steps[key]

    def _build(self, spec, microbatches: int) -> tuple:
        from clip_jax.components import components
        from clip_jax.train.state import make_train_step, state_shardings

        comps = components(spec)
        strategy = comps.registry.get("sharding", spec.sharding.strategy)
        comps.layout = strategy.factory(spec.sharding, self.devices)  # this many devices
        tx, schedule = comps.optimizer()
        model = comps.model
        _, abstract, shardings = state_shardings(model, tx, comps.layout, spec)
        step = make_train_step(
            model,
            comps.loss.fn,
            tx,
            schedule,
            shardings,
            comps.layout,
            seed=spec.run.seed,
            objective=comps.objective(model),
            microbatches=spec.train.microbatches,
            teacher=comps.teacher,
        )
        return spec, comps, abstract, step

    def unit(self, strategy: str, microbatches: int) -> int:
        """The batch granularity: every micro-batch split evenly over the batch axes."""
        return self._step(strategy, microbatches)[1].layout.batch_divisor * microbatches

    def mesh(self, strategy: str, microbatches: int) -> dict[str, int]:
        return dict(self._step(strategy, microbatches)[1].layout.mesh.shape)

    def layout_key(self, strategy: str) -> tuple:
        """What decides how the step is partitioned (``layout_key``), from the strategy's
        mesh alone: no model is built, nothing compiled."""
        from clip_jax.plugins import get_registry

        sharding = self.spec(strategy).sharding
        factory = get_registry().get("sharding", sharding.strategy).factory
        return layout_key(factory(sharding, self.devices))

    def estimate(self, strategy: str, batch: int, microbatches: int = 1) -> Estimate:
        key = (strategy, batch, microbatches)
        if key in self._estimates:
            return self._estimates[key]
        import jax
        import jax.numpy as jnp

        spec, comps, abstract, step = self._step(strategy, microbatches)
        layout, unit = comps.layout, self.unit(strategy, microbatches)
        if batch < 1 or batch % unit:
            micro = f"{microbatches} micro-batches x " if microbatches > 1 else ""
            axes, example = "/".join(layout.batch_axes), max(unit, batch // unit * unit)
            raise UserError(
                f"batch {batch} must be a multiple of {micro}the {layout.batch_divisor} devices "
                f"of the batch axes ({axes}): e.g. {example}"
            )
        v, t = spec.model.vision, spec.model.text

        def batched(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=layout.batch_sharding(len(shape)))

        images = batched((batch, v.image_size, v.image_size, 3), jnp.float32)
        if spec.preprocess.resize == "naflex":  # padded patch sequences at the run's budget
            from clip_jax.data.naflex import budget
            from clip_jax.models.naflex import NaflexImages

            count = budget(spec.preprocess, v.image_size, v.patch_size)
            images = NaflexImages(
                batched((batch, count, v.patch_size**2 * 3), jnp.float32),
                batched((batch, 2), jnp.int32),
                batched((batch, count), jnp.bool_),
            )
        tokens = batched((batch, t.context_length), jnp.int32)
        labels = batched((batch,), jnp.int32) if comps.head.needs_labels else None
        # On CPU only buffer assignment matters: skip LLVM's optimisations (same bytes,
        # about half the compile time).
        options = {"xla_backend_optimization_level": 0} if self.platform == "cpu" else {}
        micro = f" x {microbatches} micro-batches" if microbatches > 1 else ""
        self.progress(
            f"compiling the {strategy} train step, batch {batch}{micro}, for "
            f"{len(self.devices)} {self.platform} devices"
        )
        lowered = step.lower(abstract, images, tokens, labels)
        stats = lowered.compile(compiler_options=options).memory_analysis()
        if stats is None:
            raise UserError(f"XLA reports no memory analysis on {self.platform}")
        found = Estimate(
            strategy=strategy,
            mesh=self.mesh(strategy, microbatches),
            batch=batch,
            microbatches=microbatches,
            per_device_batch=batch // layout.batch_divisor,
            arguments=stats.argument_size_in_bytes,
            outputs=stats.output_size_in_bytes,
            aliased=stats.alias_size_in_bytes,
            temporaries=stats.temp_size_in_bytes,
            code=stats.generated_code_size_in_bytes,
            platform=self.platform,
        )
        self._estimates[key] = found
        self.progress(
            f"compiled {strategy}{micro} at batch {batch}: peak {size(found.peak)} "
            f"({self.compiles} compile{'s' * (self.compiles != 1)})"
        )
        return found

    @property
    def compiles(self) -> int:
        return len(self._estimates)

    def max_batch(
        self, strategy: str, microbatches: int, limit: int, start: int | None = None
    ) -> dict[str, Any]:
        """The largest batch whose peak fits ``limit`` bytes (``fits.largest_batch``),
        and the next one up, which does not."""
        unit, before = self.unit(strategy, microbatches), self.compiles
        lo, hi, peaks = largest_batch(
            lambda batch: self.estimate(strategy, batch, microbatches).peak, unit, limit, start
        )
        return {
            "strategy": strategy,
            "mesh": self.mesh(strategy, microbatches),
            "microbatches": microbatches,
            "batch": lo or None,
            "per_device_batch": lo * microbatches // unit,
            "peak": peaks.get(lo),
            "next_batch": hi,
            "next_peak": peaks.get(hi),
            "compiles": self.compiles - before,
        }


def layout_key(layout) -> tuple:
    """Two layouts with equal keys partition parameters, activations and the batch alike.

    A mesh axis of size 1 splits nothing, so it is dropped from every rule (a rule left
    with no axis replicates, as no rule does): with ``sharding.mesh.model = 1``, ``tp``
    is ``dp`` and ``fsdp_tp`` is ``fsdp``. When a logical axis has several rules, Flax
    takes the first whose mesh axis is still free in that array, which dropping an axis
    could change: those rules are compared as they are.
    """
    shape = dict(layout.mesh.shape)

    def split(axes) -> tuple[str, ...]:
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return tuple(a for a in axes if shape.get(a, 1) > 1)

    names = [name for name, _ in layout.rules]
    if len(set(names)) == len(names):
        rules = tuple((name, split(axes)) for name, axes in layout.rules if split(axes))
    else:
        rules = tuple(layout.rules)
    return type(layout), tuple(shape.items()), split(layout.batch_axes), rules


def print_progress(message: str) -> None:
    """A ``progress`` for a log or a pipe (not a terminal): one plain line per message on
    stderr, so that a long estimate shows what it is compiling and what each gave."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- report
def report(
    path: str,
    overrides: Sequence[str] = (),
    devices: int | None = None,
    batch: int | None = None,
    memory: dict | str | None = "local",
    search: bool = False,
    strategies: Sequence[str] | None = None,
    microbatches: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per-device memory of the spec's train step on ``devices`` devices (default: the
    local ones) at ``batch`` (default ``train.batch_size``), per strategy (default the
    spec's; ``["all"]``: every registered one) and micro-batch count (default the spec's);
    with ``search``, the largest batch that fits ``memory`` (a ``device_memory`` dict,
    ``"local"``: the local device's, or None). More devices than this process has are
    simulated on CPU in a subprocess."""
    import jax

    if devices is not None and devices < 1:
        raise UserError(f"--devices must be at least 1 (got {devices})")
    request = {
        "path": str(path),
        "overrides": list(overrides),
        "devices": devices or jax.device_count(),
        "batch": batch,
        "memory": local_device_memory() if memory == "local" else memory,
        "search": search,
        "strategies": list(strategies) if strategies else None,
        "microbatches": list(microbatches) if microbatches else None,
    }
    if request["devices"] <= jax.device_count():
        return _report(**request, progress=progress)
    return run_worker(request, simulate=True, progress=progress)


def _report(
    path, overrides, devices, batch, memory, search, strategies, microbatches, progress=None
) -> dict[str, Any]:
    if microbatches and min(microbatches) < 1:
        raise UserError(f"--microbatches must be at least 1 (got {min(microbatches)})")
    if search and not memory:
        raise UserError(
            "--max-batch needs the device's memory and no local accelerator reports it: pass "
            f"--device NAME ({', '.join(ACCELERATORS)}) or --device-memory SIZE"
        )
    estimator = Estimator(path, overrides, devices, progress)
    spec = estimator.spec()
    every = list(strategies or []) == ["all"]
    if not strategies:
        strategies = [spec.sharding.strategy]
    elif every:
        from clip_jax.plugins import get_registry

        strategies = get_registry().names("sharding")
    counts = microbatches or [spec.train.microbatches]
    batch = batch or spec.train.batch_size
    limit = memory["bytes"] if memory else None
    estimates, largest, skipped = [], [], []
    sized: dict[tuple, str] = {}  # layout key -> the first strategy with that layout
    for strategy in strategies:
        same = _same_layout(estimator, strategy, sized) if every else None
        if same is not None:
            reason = f"same layout as {same} on this mesh"
            estimator.progress(f"{strategy}: {reason}, not compiled")
            skipped += [
                {"strategy": strategy, "microbatches": count, "error": reason, "same_as": same}
                for count in counts
            ]
            continue
        for count in counts:
            try:
                found = estimator.estimate(strategy, batch, count)
                fits = None if limit is None else found.peak <= limit
                estimates.append({**found.to_dict(), "fits": fits})
                if search:
                    largest.append(estimator.max_batch(strategy, count, limit, start=batch))
            except UserError as exc:
                if len(strategies) * len(counts) == 1:
                    raise
                skipped.append({"strategy": strategy, "microbatches": count, "error": str(exc)})
    return {
        "devices": devices,
        "platform": estimator.platform,
        "device_kind": estimator.devices[0].device_kind,
        "device_memory": memory,
        "estimates": estimates,
        "max_batch": largest if search else None,
        "skipped": skipped,
        "compiles": estimator.compiles,
        "note": _note(estimator, devices),
    }


def _same_layout(estimator: Estimator, strategy: str, sized: dict[tuple, str]) -> str | None:
    """The strategy already sized whose layout ``strategy`` has on this mesh (None: a
    new one, now recorded). One whose mesh cannot be built is estimated, which says why."""
    try:
        key = estimator.layout_key(strategy)
    except UserError:
        return None
    if key in sized:
        return sized[key]
    sized[key] = strategy
    return None


def _note(estimator: Estimator, devices: int) -> str | None:
    notes = []
    if estimator.platform == "cpu":
        notes.append(FOOTNOTE.format(devices=devices))
    if estimator.portable:
        notes.append(PORTABLE_ATTENTION.format(keys=", ".join(estimator.portable)))
    return "; ".join(notes) or None


# ---------------------------------------------------------------- subprocess
PROGRESS = "progress: "


def run_worker(
    request: dict[str, Any],
    simulate: bool,
    progress: Callable[[str], None] | None = None,
    on_process: Callable[[subprocess.Popen], None] | None = None,
) -> dict[str, Any]:
    """``_report`` in a fresh process: with ``simulate``, on ``request["devices"]`` CPU
    devices; else on the local devices (None: all; ``"memory": "local"`` allowed), with
    nothing allocated up front, so that a run can start beside it."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if simulate:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        count = f"--xla_force_host_platform_device_count={request['devices']}"
        env |= {"XLA_FLAGS": f"{flags} {count}".strip(), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-m", "clip_jax.memory"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if on_process is not None:
        on_process(process)
    errors: list[str] = []

    def read_stderr() -> None:
        for line in process.stderr:
            if line.startswith(PROGRESS):
                if progress is not None:
                    progress(line[len(PROGRESS) :].rstrip("\n"))
            else:
                errors.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    process.stdin.write(json.dumps(request))
    process.stdin.close()
    out = process.stdout.read()
    process.wait()
    reader.join()
    lines = out.strip().splitlines()
    answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if process.returncode == 0 and answer is not None:
        return answer
    if answer is not None and "error" in answer:
        raise UserError(answer["error"])
    if process.returncode < 0:
        raise RuntimeError(f"the memory estimate was stopped (signal {-process.returncode})")
    tail = "".join(errors[-8:]).strip()
    raise RuntimeError(f"the memory estimate failed (exit {process.returncode}):\n{tail}")


def _main() -> None:
    """``python -m clip_jax.memory``: a ``run_worker`` request on stdin, JSON on stdout."""
    request = json.loads(sys.stdin.read())

    def progress(message: str) -> None:
        print(PROGRESS + message, file=sys.stderr, flush=True)

    try:
        if request.get("devices") is None:
            import jax

            request["devices"] = jax.device_count()
        if request.get("memory") == "local":
            request["memory"] = local_device_memory()
        answer = _report(**request, progress=progress)
    except UserError as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(2)
    print(json.dumps(answer))


if __name__ == "__main__":
    _main()
