"""Spec -> components: the one place that turns registered names into objects."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from clip_jax.errors import UserError
from clip_jax.plugins import Registry, get_registry
from clip_jax.spec import COMPONENT_SECTIONS, RunSpec


def _build(spec: RunSpec, section: str, registry: Registry, *args: Any) -> Any:
    selector, kind, _ = COMPONENT_SECTIONS[section]
    options = getattr(spec, section)
    name = getattr(options, selector)
    return registry.get(kind, name, key=f"{section}.{selector}").factory(options, *args)


@dataclass
class Components:
    spec: RunSpec
    registry: Registry

    @cached_property
    def loss(self):
        return _build(self.spec, "loss", self.registry, self.layout)

    @cached_property
    def head(self):
        return _build(self.spec, "head", self.registry)

    @cached_property
    def aux_terms(self) -> list:
        """The ``[[loss.aux]]`` terms, built (``clip_jax.aux_terms``)."""
        entries = getattr(self.spec.loss, "aux", [])
        return [
            self.registry.get("aux_loss", entry.name, key=f"loss.aux.{i}.name").factory(
                entry, self.spec
            )
            for i, entry in enumerate(entries)
        ]

    @cached_property
    def teacher(self):
        """The EMA teacher's schedule (``clip_jax.train.teacher``), or None when no term
        learns from one."""
        from clip_jax.train.teacher import teacher_schedule

        return teacher_schedule(self.model, self.aux_terms)

    @cached_property
    def model(self):
        """The architecture's model with the head's parameters (if it has any) and the
        auxiliary terms' modules."""
        model = _build(
            self.spec, "model", self.registry, self.loss.init_temperature, self.loss.init_bias
        )
        model = self.head.attach(model, self.spec.model.architecture)
        if not self.aux_terms:
            return model
        if self.head.name != "contrastive":
            raise UserError(
                f"loss.aux: auxiliary terms train the two towers' contrastive model; "
                f"head {self.head.name!r} has its own objective (remove [[loss.aux]])"
            )
        return self.with_aux_terms(model)

    def with_aux_terms(self, model):
        """``model`` carrying the auxiliary terms' modules (they train with the towers)."""
        from flax.core import FrozenDict

        if "aux" not in getattr(model, "__dataclass_fields__", {}):
            raise UserError(
                f"loss.aux: architecture {self.spec.model.architecture!r} has no place for "
                "auxiliary terms (build it with clip_jax.models.clip.two_tower)"
            )
        return model.clone(aux=FrozenDict({t.name: t.module for t in self.aux_terms}))

    def objective(self, model=None):
        """What the train step differentiates: the head's objective, or the contrastive
        loss plus the auxiliary terms, all of them (the run's last stage).
        ``model``: another build of the model (resized)."""
        return self.objective_stages(model)[-1][1]

    def objective_stages(self, model=None) -> list[tuple[int, Any]]:
        """(first step, objective) of each stage of the run, in order. One stage, unless
        terms that learn from the EMA teacher start later: each start begins a stage
        with them on, compiled as its own program (``train.state.StagedStep``), so
        that the steps before pay nothing for them, neither time nor memory."""
        model = self.model if model is None else model
        if not self.aux_terms:
            return [(0, self.head.objective(model, self.loss.fn))]
        from clip_jax.heads import contrastive_objective

        stages = []
        for start in sorted({0} | {t.start_step for t in self.aux_terms if t.teacher}):
            on = [t for t in self.aux_terms if not t.teacher or t.start_step <= start]
            later = [t.name for t in self.aux_terms if t not in on]
            objective = contrastive_objective(model, self.loss.fn, aux_terms=on, later_terms=later)
            stages.append((start, objective))
        return stages

    @cached_property
    def classifier(self):
        """jit-compiled (params, inputs) -> the head's logits, for evaluation; or None."""
        classify = self.head.classify(self.model)
        if classify is None:
            return None
        import jax

        return jax.jit(classify)

    @cached_property
    def train_options(self):
        """``train``, with the head's freeze patterns after the spec's own."""
        train = self.spec.train
        extra = [p for p in self.head.freeze if p not in train.freeze]
        return train.model_copy(update={"freeze": [*train.freeze, *extra]}) if extra else train

    def check(self) -> None:
        """What the head and the parameter groups need from the spec, before the run
        folder is written, any data is read or any step is run."""
        if self.head.towers or self.head.module is not None or self.aux_terms:
            _ = self.model  # attaching the head and terms checks what they read
        if self.head.needs_labels and not getattr(self.spec.data, "label_key", None):
            raise UserError(
                f"data.label_key: head {self.spec.head.name!r} trains on the records' integer "
                'labels; set data.label_key to their int64 feature (e.g. "label")'
            )
        self._check_attention()
        options = self.train_options
        if options.freeze or options.lr_scale or options.layer_decay is not None:
            from clip_jax.train import param_groups
            from clip_jax.train.state import param_shapes

            param_groups.check(options, param_shapes(self.model, self.spec))

    def _check_attention(self) -> None:
        fused = fused_attention_towers(self.spec)
        if not fused:
            return
        import jax

        if jax.default_backend() != "gpu":
            raise UserError(
                f"model.{fused[0]}.attention: 'cudnn' runs on NVIDIA GPUs only and this "
                f"machine's backend is {jax.default_backend()!r}; use 'xla'"
            )

    @cached_property
    def layout(self):
        return _build(self.spec, "sharding", self.registry)

    @cached_property
    def data(self):
        return _build(self.spec, "data", self.registry)

    def optimizer(self):
        """(optax transformation, learning-rate schedule): the optimizer component's, with
        ``train.freeze`` (and the head's), ``train.lr_scale`` and ``train.layer_decay``
        applied."""
        from clip_jax.train import param_groups

        tx, schedule = _build(self.spec, "optimizer", self.registry, self.spec.train.steps)

        def order():  # layer decay's: the model is traced only when it is on
            return param_groups.forward_order(self.model, self.spec)

        return param_groups.wrap(tx, self.train_options, order), schedule

    def tokenizer(self, saved: str | Path | None = None, captions=()):
        context_length = self.spec.model.text.context_length
        return _build(self.spec, "tokenizer", self.registry, context_length, saved, captions)


def components(spec: RunSpec, registry: Registry | None = None) -> Components:
    return Components(spec, registry or get_registry())


def _towers(spec: RunSpec) -> dict[str, Any]:
    return {t: getattr(spec.model, t) for t in ("vision", "text") if hasattr(spec.model, t)}


def _with_towers(spec: RunSpec, updates: dict[str, dict[str, Any]]) -> RunSpec:
    """The spec with these fields of its towers replaced (``{"vision": {"remat": ...}}``)."""
    if not updates:
        return spec
    towers = {t: getattr(spec.model, t).model_copy(update=u) for t, u in updates.items()}
    return spec.model_copy(update={"model": spec.model.model_copy(update=towers)})


def fused_attention_towers(spec: RunSpec) -> list[str]:
    """The towers whose attention is cuDNN's fused kernel."""
    return [t for t, tower in _towers(spec).items() if getattr(tower, "attention", "") == "cudnn"]


def with_portable_attention(spec: RunSpec) -> tuple[RunSpec, list[str]]:
    """The spec with XLA's attention where it names cuDNN's and this machine has no GPU,
    and the keys changed: an estimate (FLOPs, memory) of a GPU run, made on a laptop,
    compiles here. XLA's attention keeps the (L x L) scores that the fused kernel does
    not, so its memory is an upper bound; its FLOPs are the same products."""
    fused = fused_attention_towers(spec)
    if not fused:
        return spec, []
    import jax

    if jax.default_backend() == "gpu":
        return spec, []
    spec = _with_towers(spec, {t: {"attention": "xla"} for t in fused})
    return spec, [f"model.{t}.attention" for t in fused]


def for_flop_count(spec: RunSpec) -> RunSpec:
    """The spec whose lowered step XLA's cost analysis counts as the model's FLOPs: every
    tower unrolled (the analysis counts a loop's body once, so a scanned tower would
    count one block of twelve) and without remat (recomputation is not model work).
    Lower it under ``clip_jax.models.chunks.unchunked()`` too, for the chunked heads."""
    updates = {}
    for name, tower in _towers(spec).items():
        update = {"scan_layers": False} if getattr(tower, "scan_layers", False) else {}
        if getattr(tower, "remat", "none") != "none":
            update["remat"] = "none"
        if update:
            updates[name] = update
    return _with_towers(spec, updates)


def with_scanned_remat(spec: RunSpec) -> tuple[RunSpec, list[str]]:
    """On a CPU backend, the spec with scanned layers where a tower has remat and unrolled
    layers, and the keys changed: XLA's CPU compiler removes remat's optimization
    barriers before it schedules, so the recomputation merges back into the forward pass
    and an unrolled remat saves nothing there (measured: equal temporaries with and
    without it), while GPU and TPU compilers keep the barriers. A scan keeps remat on
    every backend, so a CPU estimate of a GPU/TPU run compiles the scanned form: same
    recomputation, same saved block inputs."""
    import jax

    if jax.default_backend() != "cpu":
        return spec, []
    unrolled = [
        name
        for name, tower in _towers(spec).items()
        if getattr(tower, "remat", "none") != "none" and not getattr(tower, "scan_layers", True)
    ]
    spec = _with_towers(spec, {t: {"scan_layers": True} for t in unrolled})
    return spec, [f"model.{t}.remat" for t in unrolled]


def unrolled_remat_notes(spec: RunSpec) -> list[str]:
    """For a run on a CPU: a note per tower whose remat saves nothing there (unrolled
    layers, ``with_scanned_remat``), saying what does."""
    return [
        f"{key} saves no memory on a CPU with unrolled layers (XLA's CPU compiler undoes "
        f"it): set {key.removesuffix('.remat')}.scan_layers = true"
        for key in with_scanned_remat(spec)[1]
    ]
