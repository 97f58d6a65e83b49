"""Handing a model over: a run folder's checkpoint written in another ecosystem's format.

The architecture that owns the parameters converts them (``formats=`` at registration),
so this module only finds the converter and checks the destination. A converter that
writes its format has ``check_export(spec)`` (what the format cannot express, refused
before any restore); one without it only reads (``train.init_from = "FORMAT:PATH"``).
"""

from __future__ import annotations

from pathlib import Path

from clip_jax.errors import UserError
from clip_jax.plugins import Component, get_registry


def writes(converter) -> bool:
    """Whether ``converter`` writes its format (export), not only reads it (import)."""
    return callable(getattr(converter, "check_export", None))


def export_formats(architecture: Component) -> list[str]:
    """The formats ``export`` can write a run of ``architecture`` in."""
    return sorted(f for f in architecture.formats if writes(architecture.load_format(f)))


def export(
    run_dir: str | Path, out: str | Path, format: str = "hf", step: int | None = None
) -> Path:
    """Write ``run_dir``'s latest (or given) checkpoint to ``out`` in ``format``."""
    from clip_jax import spec as spec_lib
    from clip_jax.pretrained import flatten
    from clip_jax.run_folder import RunFolder
    from clip_jax.train.warm_start import params_of_run

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: choose a new output folder")
    folder = RunFolder(run_dir)
    if not folder.exists():
        raise UserError(f"{run_dir} is not a run folder (no spec.resolved.toml)")
    # Whether the format can take this model is known from the spec: ask before restoring.
    spec = spec_lib.validate(folder.read_spec(), pretrained=False)
    architecture = get_registry().get("architecture", spec.model.architecture)
    converter = architecture.load_format(format)
    writable = ", ".join(export_formats(architecture)) or "none"
    if converter is None:
        raise UserError(
            f"architecture {architecture.name!r} cannot be written as {format!r} "
            f"(export writes: {writable})"
        )
    if not writes(converter):
        raise UserError(
            f"{format!r} is an import format: a run starts from such weights with "
            f'train.init_from = "{format}:PATH" (or clip_jax.load("{format}:PATH")); '
            f"export writes: {writable}"
        )
    converter.check_export(spec)
    params, spec, _ = params_of_run(run_dir, step)
    tokenizer = folder.tokenizer
    converter.write(flatten(params), spec, tokenizer if tokenizer.exists() else None, out)
    return out
