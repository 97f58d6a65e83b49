"""Parameters from another run's checkpoint, fitted to this model.

The common case is a change of resolution (pre-train at 224, fine-tune at 384): the
learned position embeddings of the image tower are resampled on their 2-D grid, the way
big_vision and open_clip do it. Any other shape change is an error that names the
parameter, because silently re-initialising part of a model loses work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.errors import UserError
from clip_jax.train.state import param_name, state_shardings


def resample_positions(pos_NxD: np.ndarray, new_tokens: int, prefix: int) -> np.ndarray:
    """Resize the square grid of a (prefix + h*w, D) table to (prefix + h'*w', D).

    ``prefix`` rows (the class token's position) are kept as they are. Bilinear with
    antialiasing, half-pixel centres: the grid covers the same image area at any size.
    """
    old_grid, new_grid = _side(len(pos_NxD) - prefix), _side(new_tokens - prefix)
    if old_grid is None or new_grid is None:
        raise UserError(
            f"cannot resample position embeddings of {len(pos_NxD)} tokens to {new_tokens}: "
            "the patch grids are not square"
        )
    grid_hxwxD = np.asarray(pos_NxD[prefix:], np.float32).reshape(old_grid, old_grid, -1)
    resized = jax.image.resize(
        jnp.asarray(grid_hxwxD), (new_grid, new_grid, grid_hxwxD.shape[-1]), "bilinear"
    )
    resized = np.asarray(resized).reshape(new_grid * new_grid, -1)
    return np.concatenate([np.asarray(pos_NxD[:prefix], np.float32), resized]).astype(pos_NxD.dtype)


def _side(tokens: int) -> int | None:
    side = math.isqrt(tokens)
    return side if side * side == tokens else None


FRESH = ("head/", "aux_")  # what a run adds on top of the towers it starts from


def fit_params(
    source: Any,
    target: Any,
    prefix: int,
    source_names: dict[str, str] | None = None,
    fresh_head: Callable[[list[str]], Any] | None = None,
) -> Any:
    """``source`` parameters with ``target``'s tree and shapes (``target`` may be abstract).

    ``source_names`` (our name -> the checkpoint's tensor name) makes errors name the
    tensor of a published checkpoint. ``fresh_head`` gives the parameters a run adds on
    top of the towers (``FRESH``: a downstream head's, ``head/...``, and the auxiliary
    terms', ``aux_<name>/...``), freshly initialised; those the source lacks come from it
    (called only then, with their names). Any other missing parameter is an error.
    """
    flat_source = dict(jax.tree_util.tree_leaves_with_path(source))
    flat_target = jax.tree_util.tree_leaves_with_path(target)
    if source_names:  # published weights: every tensor must find its place
        wanted = {path for path, _ in flat_target}
        extra = [param_name(p) for p in flat_source if p not in wanted]
        if extra:
            first = source_names.get(extra[0], extra[0])
            raise UserError(
                f"tensor {first} has no place in this model (it would be {extra[0]}): the "
                "spec changes the checkpoint's model; keep its options"
            )
    source_names = source_names or {}
    absent = [param_name(p) for p, _ in flat_target if p not in flat_source]
    missing = [n for n in absent if fresh_head is None or not n.startswith(FRESH)]
    if missing:
        raise UserError(f"the checkpoint has no {', '.join(missing[:5])}: different models")
    if absent:  # a new head or new terms on a trained model
        fresh = jax.tree_util.tree_leaves_with_path(fresh_head(absent))
        flat_source |= {path: leaf for path, leaf in fresh if path not in flat_source}
    fitted = []
    for path, want in flat_target:
        have = flat_source[path]
        name = param_name(path)
        if have.shape != want.shape:
            if name != "vision/pos_embed":
                tensor = f" (tensor {source_names[name]})" if name in source_names else ""
                raise UserError(
                    f"parameter {name}{tensor}: the checkpoint's shape {tuple(have.shape)} "
                    f"does not fit this model's {tuple(want.shape)}"
                )
            have = resample_positions(np.asarray(have), want.shape[0], prefix)
        fitted.append(np.asarray(have, want.dtype))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), fitted)


def params_of_run(
    run_dir: str | Path, step: int | None = None, layout: Any = None
) -> tuple[Any, Any, int]:
    """(host parameters, spec, step) of a run folder's latest (or given) checkpoint.

    The checkpoint is read onto ``layout`` (the reading run's mesh; by default all local
    devices, data parallel), never onto the mesh it was saved from: a model pre-trained
    on a pod is fine-tuned or used on whatever is here.
    """
    from clip_jax import spec as spec_lib
    from clip_jax.components import components
    from clip_jax.run_folder import RunFolder
    from clip_jax.train.checkpoint import Checkpoints

    folder = RunFolder(run_dir)
    if not folder.exists():
        raise UserError(f"{run_dir} is not a run folder (no spec.resolved.toml)")
    spec = spec_lib.validate(folder.read_spec(), pretrained=False)
    comps = components(spec)
    checkpoints = Checkpoints(folder.checkpoints, spec.train.keep_checkpoints, 1)
    try:
        saved = checkpoints.all_steps()
        step = step if step is not None else checkpoints.latest_step()
        if step is None:
            raise UserError(f"{run_dir} has no checkpoint yet")
        if step not in saved:
            steps = ", ".join(str(s) for s in sorted(saved))
            raise UserError(f"{run_dir} has no checkpoint at step {step} (saved: {steps})")
        tx, _ = comps.optimizer()
        if layout is None:
            from clip_jax.schemas import DataParallelOptions
            from clip_jax.sharding import data_parallel

            layout = data_parallel(DataParallelOptions())
        _, abstract, _ = state_shardings(comps.model, tx, layout, spec)
        params = checkpoints.restore_params(step, abstract)
    finally:
        checkpoints.close()
    from clip_jax.distributed import to_host

    return jax.tree.map(np.asarray, to_host(params)), spec, step


def warm_params(
    init_from: str,
    spec,
    abstract_params: Any,
    shardings: Any,
    layout: Any,
    fresh_head: Callable[[list[str]], Any] | None = None,
) -> Any:
    """Another run's (or a published checkpoint's) parameters, fitted to ``spec``'s model
    and placed on its shardings (head and term parameters it lacks from ``fresh_head``)."""
    from clip_jax import pretrained

    names = None
    if pretrained.parse_ref(init_from):
        source, names = pretrained.read_params(init_from, spec)
    else:
        source, _, _ = params_of_run(init_from, layout=layout)
    fitted = fit_params(source, abstract_params, class_token_rows(spec), names, fresh_head)
    return jax.tree.map(
        lambda value, sharding: jax.make_array_from_callback(
            value.shape, sharding, lambda index: value[index]
        ),
        fitted,
        shardings,
    )


def class_token_rows(spec) -> int:
    """Rows of the learned position table that are not on the patch grid."""
    vision = spec.model.vision
    return 1 if getattr(vision, "pool", None) == "tok" else 0
