"""Checks across spec tables, run once every table has validated on its own.

A table's own schema cannot see the others; these can, so a combination that cannot
train is refused by ``clipctl validate`` (exit 2, naming the key to change) before any
run starts. Each check returns (key, message) problems, reported with the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clip_jax import storage
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


# ------------------------------------------------------------------ local files
def _local(location: Any) -> bool:
    """A path on this machine: a URL (gs://...) needs the network (the trainer checks
    it), and a ``FORMAT:PATH`` checkpoint is checked when its defaults are read."""
    from clip_jax.pretrained import parse_ref

    return isinstance(location, str) and not storage.is_url(location) and not parse_ref(location)


def _resuming(spec: Any) -> bool | None:
    """Whether the run folder already has its tokenizer: a resume, which reads neither
    ``tokenizer.path`` nor ``train.init_from`` again. None for a URL (gs://) folder:
    only the trainer, with the network, can tell."""
    from clip_jax.run_folder import TOKENIZER

    output = str(spec.run.output_dir)
    return None if storage.is_url(output) else (Path(output) / TOKENIZER).exists()


def _checkpoint_gone(spec: Any) -> bool:
    """``train.init_from = "FORMAT:PATH"`` whose PATH is gone: a resolved spec resuming
    (``pretrained.with_defaults`` reports it otherwise), whose ``tokenizer.path`` was
    the checkpoint's."""
    from clip_jax.pretrained import checkpoint_exists, parse_ref

    init_from = spec.train.init_from
    parsed = parse_ref(init_from) if isinstance(init_from, str) else None
    return parsed is not None and not checkpoint_exists(parsed[1])


def tokenizer_path_problems(spec: Any) -> list[tuple[str, str]]:
    """A ``tokenizer.path`` that is not there, as the trainer's preflight refuses it."""
    path = getattr(spec.tokenizer, "path", None)
    if not path or "://" in path or Path(path).exists():
        return []
    if _resuming(spec) or _checkpoint_gone(spec):
        return []
    return [("tokenizer.path", f"{path} does not exist; fix the path or unset it")]


def init_from_problems(spec: Any) -> list[tuple[str, str]]:
    """A ``train.init_from`` run folder that a fresh run cannot start from: missing, or
    without the tokenizer.json whose ids its token embeddings mean."""
    from clip_jax.run_folder import TOKENIZER

    init_from = spec.train.init_from
    if not (init_from and _local(init_from)) or _resuming(spec) is not False:
        return []  # resuming (or maybe, in a gs:// folder): it may be gone by now
    if not Path(init_from).exists():
        return [("train.init_from", f"{init_from} does not exist")]
    if not (Path(init_from) / TOKENIZER).exists():
        return [("train.init_from", f"{init_from} has no {TOKENIZER}")]
    return []


def local_path_problems(spec: Any) -> list[tuple[str, str]]:
    """The local files a user's spec names that the trainer reads before it trains, so
    that ``clipctl validate`` refuses what ``clipctl run`` would. Not for a spec read
    back from a run folder: the files it started from may be gone, or relative to
    another working directory."""
    return tokenizer_path_problems(spec) + init_from_problems(spec)
