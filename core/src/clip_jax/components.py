"""Spec -> components: the one place that turns registered names into objects."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from clip_jax.plugins import Registry, get_registry
from clip_jax.spec import COMPONENT_SECTIONS, RunSpec


def _build(spec: RunSpec, section: str, registry: Registry, *args: Any) -> Any:
    selector, kind, _ = COMPONENT_SECTIONS[section]
    options = getattr(spec, section)
    return registry.get(kind, getattr(options, selector)).factory(options, *args)


@dataclass
class Components:
    spec: RunSpec
    registry: Registry

    @cached_property
    def loss(self):
        return _build(self.spec, "loss", self.registry, self.layout)

    @cached_property
    def model(self):
        return _build(
            self.spec, "model", self.registry, self.loss.init_temperature, self.loss.init_bias
        )

    @cached_property
    def layout(self):
        return _build(self.spec, "sharding", self.registry)

    @cached_property
    def data(self):
        return _build(self.spec, "data", self.registry)

    def optimizer(self):
        """(optax transformation, learning-rate schedule): the optimizer component's, with
        ``train.freeze``, ``train.lr_scale`` and ``train.layer_decay`` applied."""
        from clip_jax.train import param_groups

        tx, schedule = _build(self.spec, "optimizer", self.registry, self.spec.train.steps)

        def order():  # layer decay's: the model is traced only when it is on
            return param_groups.forward_order(self.model, self.spec)

        return param_groups.wrap(tx, self.spec.train, order), schedule

    def tokenizer(self, saved: str | Path | None = None, captions=()):
        context_length = self.spec.model.text.context_length
        return _build(self.spec, "tokenizer", self.registry, context_length, saved, captions)


def components(spec: RunSpec, registry: Registry | None = None) -> Components:
    return Components(spec, registry or get_registry())
