"""Tensor layouts the weight converters share: torch's (and big_vision's) <-> ours.

Each layout is a pair (to ours, to theirs) for one kind of tensor. The converters of
every format (``hf_format``, ``open_clip_format``, ``big_vision_format``) compose them,
so each transposition is written once. numpy only.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from clip_jax.errors import UserError

Layout = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]

# Buffers some checkpoints carry that are not parameters.
IGNORED = re.compile(r".*position_ids$")

LINEAR: Layout = (lambda w: w.T, lambda k: k.T)  # torch (out, in) <-> flax (in, out)
COPY: Layout = (lambda w: w, lambda k: k)
SCALAR: Layout = (lambda w: w.reshape(()), lambda k: np.reshape(k, (1,)))  # (1,) <-> ()
SCALAR_0D: Layout = (lambda w: w.reshape(()), lambda k: np.reshape(k, ()))
CONV: Layout = (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


def flat_patches(patch: int) -> Layout:
    """Our patch convolution (p, p, C, D) <-> a torch Linear on flattened patches
    (D, p * p * C), patch vectors ordered (row, column, channel) as ``models.naflex``
    cuts them: transformers' Siglip2 embeds NaFlex patches this way."""
    return (
        lambda w: w.T.reshape(patch, patch, -1, w.shape[0]),
        lambda k: k.reshape(-1, k.shape[-1]).T,
    )


def split_heads(width: int, count: int) -> Layout:
    """q/k/v projections: torch (H*K, D) <-> ours (D, H, K); biases (H*K) <-> (H, K)."""
    return (
        lambda w: w.T.reshape(width, count, -1) if w.ndim == 2 else w.reshape(count, -1),
        lambda k: k.reshape(width, -1).T if k.ndim == 3 else k.reshape(-1),
    )


def attention_out(count: int) -> Layout:
    """Attention output projection: torch (D, H*K) <-> ours (H, K, D)."""
    return (
        lambda w: w.T.reshape(count, -1, w.shape[0]),
        lambda k: k.reshape(-1, k.shape[-1]).T,
    )


def tensor(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A checkpoint tensor as float32, or a UserError naming the missing one."""
    if name not in tensors:
        raise UserError(f"the checkpoint has no tensor {name}, which its config implies")
    return np.asarray(tensors[name], np.float32)


def convert(tensors: dict[str, np.ndarray], name: str, to_ours: Callable) -> np.ndarray:
    """One tensor in our layout; a shape that does not fit is a UserError naming it."""
    value = tensor(tensors, name)
    try:
        return to_ours(value)
    except ValueError:
        raise UserError(
            f"tensor {name} of shape {value.shape} does not fit the model its config describes"
        ) from None


_BLOCK = re.compile(r"^(.*)/encoder/block_(\d+)/(.*)$")


def stack_scanned(params: dict[str, np.ndarray], options) -> dict[str, np.ndarray]:
    """Per-block parameters stacked on a leading axis for towers with ``scan_layers``."""
    out, stacks = {}, {}
    for name, value in params.items():
        match = _BLOCK.match(name)
        tower = match and getattr(options, match.group(1), None)
        if tower is not None and tower.scan_layers:
            key = f"{match.group(1)}/encoder/blocks/{match.group(3)}"
            stacks.setdefault(key, {})[int(match.group(2))] = value
        else:
            out[name] = value
    for key, layers in stacks.items():
        out[key] = np.stack([layers[i] for i in range(len(layers))])
    return out


def unstack_scanned(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of ``stack_scanned``: one entry per block."""
    out = {}
    for name, value in params.items():
        head, sep, rest = name.partition("/encoder/blocks/")
        if sep:
            for i, layer in enumerate(np.asarray(value)):
                out[f"{head}/encoder/block_{i}/{rest}"] = layer
        else:
            out[name] = value
    return out


def finish_import(
    params: dict[str, np.ndarray], spec, unused: list[str], source: str
) -> dict[str, np.ndarray]:
    """What every import ends with: a sigmoid loss's bias where the checkpoint has none
    (CLIP weights fine-tuned with a SigLIP loss) and none where the loss has none, no
    tensor left over, scanned towers stacked."""
    init_bias = getattr(spec.loss, "init_bias", None)
    if init_bias is None:
        params.pop("logit_bias", None)
    elif "logit_bias" not in params:
        params["logit_bias"] = np.asarray(init_bias, np.float32)
    if unused:
        raise UserError(
            f"tensor {unused[0]} ({len(unused)} unused in all) has no place in the model "
            f"{source} describes"
        )
    return stack_scanned(params, spec.model)
