"""What a spec's model costs, without data or a single allocated parameter.

Parameter counts come from ``jax.eval_shape`` of the initialiser; FLOPs per image-text
pair from XLA's cost analysis of the lowered training computation (forward + backward
of the loss); per-device parameter bytes from the strategy's rules and mesh shape, so a
pod spec can be sized on a laptop (``devices`` need not exist here).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.components import components, for_flop_count, with_portable_attention
from clip_jax.errors import UserError
from clip_jax.models.chunks import unchunked
from clip_jax.sharding import AXES, resolve_mesh_shape
from clip_jax.spec import RunSpec
from clip_jax.train.state import param_shapes

FLOPS_BATCH = 2  # the cost of one pair is measured on a small batch and divided


def _count(tree: Any) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def _per_device_bytes(boxed: Any, rules: dict[str, Any], mesh: dict[str, int]) -> int:
    total = 0
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        names = leaf.names if isinstance(leaf, nn.Partitioned) else (None,) * len(value.shape)
        shape = []
        for size, name in zip(value.shape, names, strict=True):
            axes = rules.get(name)
            axes = axes if isinstance(axes, tuple) else (axes,) if axes else ()
            shape.append(-(-size // math.prod(mesh[a] for a in axes)))
        total += math.prod(shape) * value.dtype.itemsize
    return total


def model_info(spec: RunSpec, devices: int | None = None) -> dict[str, Any]:
    """Parameter counts, training FLOPs per pair and per-device parameter bytes."""
    spec, portable = with_portable_attention(spec)  # a GPU run sized without one
    comps, model, loss = _model_of(spec)
    v, t = spec.model.vision, spec.model.text
    images = jax.ShapeDtypeStruct((FLOPS_BATCH, v.image_size, v.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((FLOPS_BATCH, t.context_length), jnp.int32)
    boxed = param_shapes(model, spec)
    params = nn.unbox(boxed)

    counted = for_flop_count(spec)  # unrolled, no remat: what XLA's analysis counts right
    if counted is spec:
        flop_comps, flop_model, flop_loss, flop_params = comps, model, loss, params
    else:
        flop_comps, flop_model, flop_loss = _model_of(counted)
        flop_params = nn.unbox(param_shapes(flop_model, counted))
    with unchunked():  # no loops either: one chunk per reduction, the same products
        cost = _train_cost(flop_comps, flop_model, flop_loss.fn, flop_params, images, tokens)

    count = devices or jax.device_count()
    mesh = dict(zip(AXES, resolve_mesh_shape(spec.sharding.mesh, count), strict=True))
    rules = dict(_rules_of(comps, count))
    vision, text = _count(params.get("vision", {})), _count(params.get("text", {}))
    aux = _count({k: v for k, v in params.items() if k.startswith("aux_")})
    total = _count(params)
    return {
        "parameters": {
            "total": total,
            "vision": vision,
            "text": text,
            "heads": total - vision - text - aux,  # projections, logit scale (and bias)
            **({"aux": aux} if aux else {}),  # the auxiliary terms' modules (decoder, heads)
        },
        "train_flops_per_pair": float(cost.get("flops", 0.0)) / FLOPS_BATCH,
        "devices": count,
        "mesh": mesh,
        "param_bytes_per_device": _per_device_bytes(boxed, rules, mesh),
        "param_bytes_total": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))),
        **({"xla_attention_for": portable} if portable else {}),
    }


def _model_of(spec: RunSpec) -> tuple:
    """(components, model with its auxiliary terms' modules, loss), built without a mesh:
    the spec may be sized for devices this machine does not have."""
    comps = components(spec)
    if spec.loss.name == "chunked_sigmoid":  # equal in value and FLOPs, and needs no mesh
        loss = _plain_sigmoid_loss(spec)
    else:
        loss = comps.registry.get("loss", spec.loss.name).factory(spec.loss, None)
    architecture = comps.registry.get("architecture", spec.model.architecture)
    model = architecture.factory(spec.model, loss.init_temperature, loss.init_bias)
    if comps.aux_terms:  # their modules train with the towers: FLOPs and parameters count them
        model = comps.with_aux_terms(model)
    return comps, model, loss


def _train_cost(comps, model, loss_fn, params, images, tokens) -> dict[str, Any]:
    """XLA's cost of the differentiated objective: the contrastive loss, plus every
    auxiliary term when the run has some (captioning, the teacher's terms with their
    teacher pass and views: the run's last stage, when all are on), which can cost
    several times the towers (siglip2-tiny: 307 against 103 MFLOP per pair)."""
    if comps.aux_terms:
        from clip_jax.heads import contrastive_objective
        from clip_jax.train.teacher import teacher_keys, teacher_of

        objective = contrastive_objective(model, loss_fn, aux_terms=comps.aux_terms)
        extras: dict[str, Any] = {}
        if "view_keys" in getattr(objective, "example_inputs", ()):
            keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), FLOPS_BATCH))
            teacher = jax.eval_shape(lambda p: teacher_of(p, teacher_keys(model)), params)
            extras = {"teacher": teacher, "view_keys": keys}

        def loss_of(params, images, tokens, **extras):
            dropout = jax.random.key(0)
            return objective(params, images, tokens, None, dropout, **extras)[0]
    else:

        def loss_of(params, images, tokens):
            return loss_fn(*model.apply({"params": params}, images, tokens))

        extras = {}
    lowered = jax.jit(jax.value_and_grad(loss_of)).lower(params, images, tokens, **extras)
    cost = lowered.cost_analysis() or {}
    return cost[0] if isinstance(cost, list) else cost


def _plain_sigmoid_loss(spec: RunSpec):
    from clip_jax.losses import sigmoid_loss

    return sigmoid_loss(spec.loss)


def _rules_of(comps, devices: int) -> tuple:
    """The strategy's logical rules; without building a mesh when it publishes them."""
    factory = comps.registry.get("sharding", comps.spec.sharding.strategy).factory
    factory = getattr(factory, "resolve", lambda: factory)()
    if hasattr(factory, "rules"):
        return factory.rules
    if devices != jax.device_count():
        raise UserError(
            f"sharding strategy {comps.spec.sharding.strategy!r} does not publish its rules: "
            f"it can only be sized for the {jax.device_count()} devices here"
        )
    return comps.layout.rules
