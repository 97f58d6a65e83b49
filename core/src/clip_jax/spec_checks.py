"""Checks across spec tables, run once every table has validated on its own.

A table's own schema cannot see the others; these can, so a combination that cannot
train is refused by ``clipctl validate`` (exit 2, naming the key to change) before any
run starts. Each check returns (key, message) problems, reported with the rest.
"""

from __future__ import annotations

from typing import Any

from clip_jax.schemas import VisionOptions


def _architecture(spec: Any) -> Any:
    """The spec's architecture name (a plugin's model options may be a plain table)."""
    model = spec.model
    return model.get("architecture") if isinstance(model, dict) else model.architecture


def naflex_problems(spec: Any) -> list[tuple[str, str]]:
    """(key, message) for NaFlex settings that cannot work together: checked across
    tables (preprocess, model, eval) once the spec has validated, so a run that cannot
    train stops before it starts, naming the key to change."""
    pre, vision = spec.preprocess, getattr(spec.model, "vision", None)
    budgets = getattr(spec.eval, "max_patches", None)
    if pre.resize != "naflex":
        problems = []
        if pre.max_patches is not None:
            problems.append(("preprocess.max_patches", "is read only with resize = 'naflex'"))
        if budgets:  # named by the key that decides whether it means anything
            problems.append(
                (
                    "preprocess.resize",
                    f"eval.max_patches is for NaFlex runs: set resize = 'naflex' or remove "
                    f"eval.max_patches (got resize = {pre.resize!r})",
                )
            )
        return problems
    if not isinstance(vision, VisionOptions):
        return [
            (
                "model.architecture",
                f"{_architecture(spec)!r} has no ViT image tower (model.vision), which "
                "preprocess.resize = 'naflex' needs",
            )
        ]
    problems = []
    if vision.positions != "learned":
        problems.append(
            (
                "model.vision.positions",
                f"preprocess.resize = 'naflex' resamples the learned position table to each "
                f"image's grid: set positions = 'learned' (got {vision.positions!r})",
            )
        )
    if vision.patch_dropout:
        problems.append(
            (
                "model.vision.patch_dropout",
                "does not combine with preprocess.resize = 'naflex' (its padding would be "
                "dropped like patches): set it to 0",
            )
        )
    return problems


TEACHER_TERMS = ("self_distillation", "masked_prediction")  # views cut from square images


def teacher_term_problems(spec: Any) -> list[tuple[str, str]]:
    """The EMA teacher's terms read a ViT image tower on square views they cut and mask
    themselves: not NaFlex batches (yet), no patch dropout (it would drop the masked
    patches the student must predict), local crops on the patch grid."""
    terms = [
        (i, term)
        for i, term in enumerate(getattr(spec.loss, "aux", None) or [])
        if term.name in TEACHER_TERMS
    ]
    if not terms:
        return []
    vision = getattr(spec.model, "vision", None)
    first = f"loss.aux.{terms[0][0]}.name"
    if not isinstance(vision, VisionOptions):
        name = terms[0][1].name
        return [
            (
                first,
                f"{name!r} learns from a teacher of the ViT image tower, and "
                f"architecture {_architecture(spec)!r} has none",
            )
        ]
    if spec.preprocess.resize == "naflex":
        return [
            (
                first,
                f"{terms[0][1].name!r} cuts its views from square images and does "
                "not run on NaFlex batches (preprocess.resize = 'naflex') yet",
            )
        ]
    problems = []
    if vision.patch_dropout:
        problems.append(
            (
                "model.vision.patch_dropout",
                "does not combine with the teacher's "
                f"terms ({', '.join(t.name for _, t in terms)}): set it to 0",
            )
        )
    for i, term in terms:
        size = getattr(term, "local_size", None)
        if size is not None and size % vision.patch_size:
            problems.append(
                (
                    f"loss.aux.{i}.local_size",
                    f"must be a multiple of "
                    f"model.vision.patch_size ({vision.patch_size}); got {size}",
                )
            )
    return problems


def cross_table_problems(spec: Any) -> list[tuple[str, str]]:
    """Every cross-table check's problems, in order."""
    return naflex_problems(spec) + teacher_term_problems(spec)
