"""Parameter groups: ``train.freeze``, ``train.lr_scale`` and ``train.layer_decay``.

``wrap`` turns whatever transformation the optimizer component built into one that

- gives frozen parameters ``optax.set_to_zero()`` through ``optax.multi_transform``: the
  optimizer only ever sees the trained parameters, so frozen ones have no moments (an
  empty ``MaskedNode`` where their state would be), no weight decay and no share in
  gradient clipping, and ``p + 0`` leaves them bit-identical;
- multiplies the updates of the other parameters by their learning-rate scale.

Parameters are named by their path, ``vision/encoder/block_0/attn/query/kernel``, and
patterns are regexes matched whole (``re.fullmatch``). Layer decay finds the blocks from
the tree itself: a ``block_<i>`` path component, or a scanned ``blocks`` stack whose
leaves hold the layers on axis 0; a tower is what holds the blocks' container
(``vision`` for ``vision/encoder/block_<i>``), its depth the number of blocks. Which of a
tower's other parameters come before its blocks (embeddings) and which after (final
norms, heads) is read from the order the forward pass uses them in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_jax.errors import UserError

FROZEN, TRAINED = "frozen", "trained"
BLOCK = re.compile(r"block_(\d+)")
STACK = "blocks"

Scale = float | np.ndarray  # a number, or one per layer of a scanned stack (axis 0)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def leaf_name(path) -> str:
    """``vision/encoder/block_0/...``: dict keys only, so a boxed (``nn.Partitioned``)
    parameter is named like its unboxed value."""
    return "/".join(
        str(k.key) if hasattr(k, "key") else str(k.idx)
        for k in path
        if hasattr(k, "key") or hasattr(k, "idx")
    )


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """(name, leaf) pairs; a boxed parameter is one leaf, box included."""
    flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_box)
    return [(leaf_name(path), leaf) for path, leaf in flat]


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf.value if _is_box(leaf) else leaf, "shape", ()))


def _map_named(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: fn(leaf_name(path), leaf), tree, is_leaf=_is_box
    )


# ------------------------------------------------------------------------- layers
class Tower(NamedTuple):
    root: tuple[str, ...]  # what holds the blocks' container: ("vision",)
    container: tuple[str, ...]  # ("vision", "encoder")
    depth: int
    scanned: bool


def _block_of(parts: list[str]) -> tuple[int, int | None] | None:
    """(index of the block component, the block's number or None for a scanned stack)."""
    for k, part in enumerate(parts):
        match = BLOCK.fullmatch(part)
        if match:
            return k, int(match.group(1))
    for k, part in enumerate(parts):
        if part == STACK:
            return k, None
    return None


def find_towers(shapes: Mapping[str, tuple[int, ...]]) -> dict[tuple[str, ...], Tower]:
    """The towers of a parameter tree (name -> shape), by their blocks' container."""
    numbered: dict[tuple[str, ...], set[int]] = {}
    stacked: dict[tuple[str, ...], set[int]] = {}
    for name, shape in shapes.items():
        parts = name.split("/")
        found = _block_of(parts)
        if found is None:
            continue
        k, number = found
        if number is not None:
            numbered.setdefault(tuple(parts[:k]), set()).add(number)
        else:  # a stack: every leaf holds all the layers on axis 0
            stacked.setdefault(tuple(parts[:k]), set()).add(shape[0] if shape else -1)
    towers = {c: Tower(c[:-1], c, max(ns) + 1, False) for c, ns in numbered.items()}
    for container, depths in stacked.items():
        if len(depths) == 1 and min(depths) > 0 and container not in towers:
            towers[container] = Tower(container[:-1], container, depths.pop(), True)
    return towers


def _block(name: str, towers: Mapping[tuple[str, ...], Tower]) -> tuple[Tower, int | None] | None:
    """(its tower, its block's number or None in a scanned stack) for a block parameter."""
    parts = name.split("/")
    found = _block_of(parts)
    if found is None or tuple(parts[: found[0]]) not in towers:
        return None
    return towers[tuple(parts[: found[0]])], found[1]


def layer_scales(
    shapes: Mapping[str, tuple[int, ...]], decay: float, order: Mapping[str, int]
) -> dict[str, Scale]:
    """Each parameter's layer-decay learning-rate scale (BEiT, big_vision): block i of a
    tower of depth L gets decay^(L - i), the tower's parameters used before its blocks
    (embeddings) decay^(L + 1), all else (final norms, heads, the logit scale) 1.

    ``order``: each parameter's position in the forward pass (``forward_order``).
    """
    towers = find_towers(shapes)
    never = float("inf")  # not read by the forward pass: counted as after the blocks
    scales: dict[str, Scale] = {}
    starts: dict[tuple[str, ...], float] = {}  # each tower's first block's position
    for name, shape in shapes.items():
        block = _block(name, towers)
        if block is None:
            continue
        tower, number = block
        if number is None:  # a scanned stack: one scale per layer, on axis 0
            exponents = tower.depth - np.arange(tower.depth)
            scales[name] = (decay**exponents).reshape((-1,) + (1,) * (len(shape) - 1))
        else:
            scales[name] = float(decay ** (tower.depth - number))
        start = min(starts.get(tower.container, never), order.get(name, never))
        starts[tower.container] = start
    for name in shapes:
        if name in scales:
            continue
        parts = tuple(name.split("/"))
        owners = [t for t in towers.values() if parts[: len(t.root)] == t.root]
        scales[name] = 1.0
        if owners:
            tower = max(owners, key=lambda t: len(t.root))
            if order.get(name, never) < starts[tower.container]:
                scales[name] = float(decay ** (tower.depth + 1))
    return scales


def forward_order(model: nn.Module, spec) -> dict[str, int]:
    """Each parameter's position in the model's forward pass: the index of the first
    operation that reads it (one abstract trace, nothing computed)."""
    from clip_jax.train.state import dummy_inputs, param_shapes

    images, tokens = dummy_inputs(spec)
    shapes = nn.unbox(param_shapes(model, spec))
    with nn.logical_axis_rules(()):
        jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, images, tokens))(shapes)
    params = named_leaves(shapes)
    names = {id(var): name for var, (name, _) in zip(jaxpr.jaxpr.invars, params, strict=True)}
    first: dict[str, int] = {}
    for index, eqn in enumerate(jaxpr.jaxpr.eqns):
        for var in eqn.invars:
            name = names.get(id(var))
            if name is not None:
                first.setdefault(name, index)
    return first


# --------------------------------------------------------------------- the groups
def _first_match(patterns: Mapping[str, float], name: str) -> float:
    for pattern, scale in patterns.items():
        if re.fullmatch(pattern, name):
            return float(scale)
    return 1.0


def is_frozen(options, name: str) -> bool:
    return any(re.fullmatch(p, name) for p in options.freeze)


def lr_scales(
    shapes: Mapping[str, tuple[int, ...]], options, order: Mapping[str, int] | None = None
) -> dict[str, Scale]:
    """Each parameter's learning-rate multiplier: its first matching ``train.lr_scale``
    pattern's, times its layer-decay scale (frozen parameters: 0)."""
    layers = (
        layer_scales(shapes, options.layer_decay, order or {})
        if options.layer_decay is not None
        else {}
    )
    scales: dict[str, Scale] = {}
    for name in shapes:
        if is_frozen(options, name):
            scales[name] = 0.0
        else:
            scales[name] = _first_match(options.lr_scale, name) * layers.get(name, 1.0)
    return scales


def scale_updates(
    scales_of: Callable[[tuple], Mapping[str, Scale]],
) -> optax.GradientTransformation:
    """Multiplies each update by its parameter's scale; no state.

    For Adam-style optimizers (the update is lr * m / (sqrt(v) + eps), plus lr * wd * p
    with decoupled weight decay) scaling the update is exactly scaling the learning rate:
    the moments do not depend on it.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        leaves = named_leaves(updates)
        scales = scales_of(tuple((name, _shape(leaf)) for name, leaf in leaves))

        def one(name, u):
            s = scales[name]
            if isinstance(s, float) and s == 1.0:
                return u
            return u * jnp.asarray(s, u.dtype)

        return _map_named(one, updates), state

    return optax.GradientTransformation(init, update)


def wrap(
    tx: optax.GradientTransformation,
    options,
    order: Callable[[], Mapping[str, int]] | None = None,
) -> optax.GradientTransformation:
    """``tx`` with ``options``' (``train``'s) freeze patterns, lr scales and layer decay.

    Unchanged when none is set, so the optimizer state (and old checkpoints) keep their
    structure. ``order`` gives the forward-pass order that layer decay needs
    (``forward_order``); it is called once, here, and only when layer decay is on.
    """
    if options.layer_decay is not None and order is None:
        raise ValueError("train.layer_decay needs the parameters' forward order")
    use_order = order() if options.layer_decay is not None else {}
    if options.freeze:

        def labels(params):
            # A label per parameter, box and all: a frozen leaf is masked whole, so its
            # (empty) state carries no sharding annotation either.
            return _map_named(
                lambda name, _: FROZEN if is_frozen(options, name) else TRAINED, params
            )

        tx = optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, labels)
    if not options.lr_scale and options.layer_decay is None:
        return tx

    @cache
    def scales_of(named_shapes: tuple) -> dict[str, Scale]:
        return lr_scales(dict(named_shapes), options, use_order)

    return optax.chain(tx, scale_updates(scales_of))


def check(options, params: Any) -> None:
    """Before training: every pattern names some parameter, and layer decay finds blocks.

    ``params``: the parameter tree, abstract or not, boxed or not.
    """
    names = [name for name, _ in named_leaves(params)]
    for key, patterns in (("train.freeze", options.freeze), ("train.lr_scale", options.lr_scale)):
        for pattern in patterns:
            if not any(re.fullmatch(pattern, name) for name in names):
                raise UserError(
                    f"{key}: {pattern!r} matches no parameter; patterns are matched whole "
                    f"against paths such as {_examples(names)}"
                )
    if options.layer_decay is not None:
        shapes = {name: _shape(leaf) for name, leaf in named_leaves(params)}
        if not find_towers(shapes):
            raise UserError(
                "train.layer_decay: the model has no transformer blocks (block_<i> or a "
                "scanned blocks stack) to decay over"
            )


def _examples(names: list[str]) -> str:
    example = next((n for n in names if _block_of(n.split("/"))), names[0] if names else "")
    tops = ", ".join(sorted({n.split("/")[0] for n in names}))
    return f"{example} (top-level names: {tops})"
