"""The compiled per-device memory of one spec's train step, per strategy, micro-batch
count and batch: ``Estimator`` compiles (and caches) the real step for abstract
arguments on a mesh of local devices and reads XLA's memory analysis; nothing is
allocated. ``clip_jax.memory`` turns its estimates into the report, simulating
devices in a subprocess when this process has too few.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from clip_jax.errors import UserError
from clip_jax.fits import largest_batch, size


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
        self.scanned: list[str] = []  # keys whose unrolled remat is estimated scanned
        self._steps: dict[tuple[str, int], tuple] = {}
        self._estimates: dict[tuple[str, int, int], Estimate] = {}

    def spec(self, strategy: str | None = None, microbatches: int | None = None):
        """The spec, or its variant with another strategy / micro-batch count, as the
        overrides ``sharding.strategy=...`` and ``train.microbatches=...`` give it."""
        from clip_jax.spec import load_spec

        if self._base is None:
            self._base = self._estimable(load_spec(self.path, self.overrides))
        base, extra = self._base, []
        if strategy and strategy != base.sharding.strategy:
            extra.append(f"sharding.strategy={strategy}")
        if microbatches and microbatches != base.train.microbatches:
            extra.append(f"train.microbatches={microbatches}")
            if base.train.batch_size % microbatches:  # the batch is the estimate's own
                extra.append(f"train.batch_size={base.train.batch_size * microbatches}")
        if not extra:
            return base
        return self._estimable(load_spec(self.path, [*self.overrides, *extra]))

    def _estimable(self, spec):
        """The spec as this machine compiles it like the target would (the keys changed
        are kept for the report's note): XLA's attention for cuDNN's without a GPU, and
        scanned layers for an unrolled remat on a CPU (``components``)."""
        from clip_jax.components import with_portable_attention, with_scanned_remat

        spec, self.portable = with_portable_attention(spec)
        spec, self.scanned = with_scanned_remat(spec)
        return spec

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
