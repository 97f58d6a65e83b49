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

``self_distillation`` and ``masked_prediction`` (``TeacherTermOptions``) learn from an
EMA teacher of the image tower kept in the train state (``clip_jax.train.teacher``);
their modules read the image tower itself and the teacher's targets
(``clip_jax.models.self_supervised``), and reduce their outputs over the whole batch,
forming their (rows, ``prototypes``) logits a chunk of rows at a time.

This module stays free of jax: validating a spec never imports it.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import AfterValidator, Field, create_model, model_validator

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


class TeacherTermOptions(AuxOptions):
    """Terms that learn from an EMA teacher of the image tower (SigLIP 2's last stage).

    The teacher is a copy of the image tower (and of these terms' heads) that follows the
    student's parameters as an exponential moving average; until ``start_fraction`` of
    training it equals the student, so it starts from the student (as in the paper) and
    the term adds nothing (and costs nothing) before then.
    """

    start_fraction: float = Field(
        0.8, ge=0, le=1, description="share of training after which the term is on"
    )
    teacher_momentum: float = Field(
        0.996, ge=0, lt=1, description="EMA momentum of the teacher (fixed, as in SILC)"
    )
    prototypes: int = Field(1024, ge=2, description="outputs of the projection head (DINO's K)")
    head_hidden: int = Field(1024, ge=8, description="hidden width of the projection head")
    bottleneck: int = Field(256, ge=8, description="L2-normalised width before the prototypes")
    student_temperature: float = Field(0.1, gt=0)
    teacher_temperature: float = Field(0.05, gt=0, description="sharpening of the targets")


class SelfDistillationOptions(TeacherTermOptions):
    """SILC: the student's pooled features of small local crops predict the teacher's of
    a global view, through a DINO-style head with Sinkhorn-Knopp targets."""

    local_crops: int = Field(8, ge=1, description="local views per image (the paper: 8)")
    local_size: int | None = Field(
        None, ge=8, description="their side in pixels (None: the ViT's image_size / 2)"
    )
    local_scale: tuple[float, float] = Field(
        (0.05, 0.4), description="area range of a local crop, as a share of the image"
    )

    @model_validator(mode="after")
    def _check_scale(self) -> SelfDistillationOptions:
        low, high = self.local_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"local_scale must satisfy 0 < low <= high <= 1 (got {low}, {high})")
        return self


class MaskedPredictionOptions(TeacherTermOptions):
    """TIPS: the student sees the global view with a share of its patches replaced by a
    mask token and predicts the teacher's features of those patches."""

    weight: float = Field(0.25, ge=0, description="multiplies the term (the paper: 0.25)")
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="share of patches masked")


@dataclass(frozen=True)
class AuxTerm:
    """A built term: the module the model carries as ``aux_<name>`` and its weight.

    ``reduce``: the module's per-example outputs of the whole batch -> ``{"loss": scalar,
    ...metrics}``; None means the batch mean of each output. A term whose loss couples
    examples (Sinkhorn-Knopp targets) reduces here, after micro-batches are merged. An
    output that every example shares (a head's prototypes) can travel as one row, shape
    (1, ...): micro-batches stack one equal copy each, and ``reduce`` reads the first.
    ``teacher``: the term learns from the EMA teacher (``TeacherTermOptions``) from
    ``start_step`` on: its module is called as ``(run_tower, images, targets,
    view_keys_B, train)`` and has ``targets(teacher_outputs, view_keys_B)``
    (``clip_jax.models.self_supervised``).
    """

    name: str
    # flax.linen.Module: (image_tokens_BxNxD, tokens_BxL, train) -> {"loss": B, ...}
    module: Any
    weight: float
    reduce: Callable[[dict], dict] | None = None
    teacher: bool = False
    start_step: int = 0
    teacher_momentum: float = 0.0


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
    # One teacher for every term that learns from one: it follows the student at one pace.
    momenta = {e.teacher_momentum for e in entries if isinstance(e, TeacherTermOptions)}
    if len(momenta) > 1:
        raise ValueError(
            f"the terms that learn from the EMA teacher share it: give them one "
            f"teacher_momentum (got {sorted(momenta)})"
        )
    return entries
