"""Auxiliary objectives: weighted terms added to the run's main (contrastive) loss.

SigLIP 2's recipe trains the sigmoid loss together with a captioning decoder (and, late
in training, self-distillation and masked prediction). Each term is a table of
``[[loss.aux]]`` chosen by ``name`` among the components registered through
``register_aux_losses``; ``weight`` scales it, its other keys are its own options:

    [loss]
    name = "sigmoid"

    [[loss.aux]]
    name = "captioning"
    weight = 1.0
    depth = 2

A term's factory is ``factory(options, spec) -> AuxTerm``: it reads what it needs from
the spec (the text tower's vocabulary, say) and returns a Flax module whose parameters
live under ``aux_<name>/`` in the model. The module is called with the image tower's
token sequence and the captions' tokens and returns per-example values: ``"loss"``
(shape B), and any metrics of the same shape. The train step averages them over the
batch, adds ``weight * loss`` to the main loss and logs ``loss/<name>`` and
``<name>/<metric>``. Per-example values are what keeps a term exact under
``train.microbatches`` (gradient caching): the batch mean is taken after all
micro-batches are put together.

This module stays free of jax: validating a spec never imports it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import AfterValidator, Field, create_model

from clip_jax.schemas import Options


class AuxOptions(Options):
    """Options every auxiliary term has (subclass it for a term's own)."""

    weight: float = Field(1.0, ge=0, description="multiplies the term before it is added")


class CaptioningOptions(AuxOptions):
    """A LocCa / CapPa decoder reading the image tower's tokens and predicting the caption."""

    width: int | None = Field(None, ge=8, description="decoder width (None: the text tower's)")
    depth: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    parallel_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of examples predicted in parallel from the image alone (CapPa)",
    )


@dataclass(frozen=True)
class AuxTerm:
    """A built term: the module the model carries as ``aux_<name>`` and its weight."""

    name: str
    module: Any  # flax.linen.Module: (image_tokens_BxNxD, tokens_BxL, train) -> {"loss": B, ...}
    weight: float


def aux_entries_type(registry) -> Any:
    """The type of ``loss.aux``: a list of tables, each validated by the options of the
    term its ``name`` picks (pydantic's discriminated union on ``name``)."""
    terms = tuple(
        (name, component.options or AuxOptions)
        for name, component in sorted(registry.components.get("aux_loss", {}).items())
    )
    return _entries_type(terms)


@cache  # one class per set of terms: equal specs compare equal
def _entries_type(terms: tuple[tuple[str, type], ...]) -> Any:
    if not terms:
        return list[AuxOptions]
    models = [
        create_model(
            f"Aux{name.title().replace('_', '')}Spec",
            __base__=options,
            name=(typing.Literal[name], ...),
        )
        for name, options in terms
    ]
    if len(models) == 1:
        entries = list[models[0]]
    else:
        union = typing.Union[tuple(models)]  # noqa: UP007 (built from a runtime tuple)
        entries = list[typing.Annotated[union, Field(discriminator="name")]]
    return typing.Annotated[entries, AfterValidator(_once_each)]


def _once_each(entries: list) -> list:
    """A term's parameters live under ``aux_<name>``: a name listed twice would be one
    term, not two."""
    names = [entry.name for entry in entries]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"term {twice[0]!r} is listed twice (each term once, with its weight)")
    return entries
