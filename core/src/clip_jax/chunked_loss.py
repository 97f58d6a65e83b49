"""Chunked sigmoid loss: the SigLIP loss on the global batch without the global logits.

The gathered ``sigmoid_loss`` lets XLA all-gather the text embeddings, so every device
holds b x B logits (and their gradient) and all B x D text embeddings: at a fixed
per-device batch b its memory grows with the device count. Here each device keeps its b
image embeddings while the text embeddings travel the ring of all batch devices with
``jax.lax.ppermute``; a device only ever holds one b x b block of logits and one b x D
block of texts, whatever the number of devices.

The backward pass is a second ring (``jax.custom_vjp``) rather than autodiff through the
forward loop: autodiff would keep every hop's text block (n x b x D, the gathered
embeddings again) for the backward pass. In the backward ring each text block carries
its gradient accumulator along, and one last hop brings the finished gradient home.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from clip_jax.losses import Loss
from clip_jax.schemas import SigmoidOptions
from clip_jax.sharding import Layout

# hop(carry, travel, txt_bxD, first) -> (carry, travel); ``first``: the device's own texts.
Hop = Callable[[Any, Any, jax.Array, bool], tuple[Any, Any]]


def _ring(txt_bxD: jax.Array, axes: tuple[str, ...], n: int, hop: Hop) -> tuple[Any, Any]:
    """Runs ``hop`` once per device of the ring, the texts moving one device per hop.

    At hop k a device holds the texts of the device k places before it. The next block
    is sent before the current one is used, so XLA can overlap the transfer with the
    hop's matmuls. ``travel`` is per-block state that moves with the texts; it comes back
    after its last hop, one device short of the block's owner. Hop 0 runs outside the
    loop: its results seed the carry (a loop carry cannot start as None, and it must be
    device-varying like the hops' results).
    """
    perm = [(i, (i + 1) % n) for i in range(n)]
    rotate = lambda x: jax.lax.ppermute(x, axes, perm)

    def step(state, first):
        txt, carry, travel = state
        nxt = rotate(txt)
        carry, travel = hop(carry, travel, txt, first)
        return nxt, carry, (None if travel is None else rotate(travel))

    if n == 1:
        return hop(None, None, txt_bxD, True)
    state = step((txt_bxD, None, None), True)
    if n > 2:
        state = jax.lax.fori_loop(1, n - 1, lambda _, s: step(s, False), state)
    txt, carry, travel = state
    return hop(carry, travel, txt, False)


def chunked_sigmoid_loss(options: SigmoidOptions, layout: Layout) -> Loss:
    """Factory for loss ``chunked_sigmoid``: equals ``sigmoid_loss`` on the global batch.

    ``fn`` takes global embeddings (any sharding; they are resharded over
    ``layout.batch_axes``) and returns a replicated scalar. Mesh axes that are not
    batch axes (e.g. ``model``) see replicated embeddings and compute the same value.
    The global batch must divide by the number of batch devices. Reverse-mode only
    (``jax.custom_vjp``): ``jax.grad`` works, ``jax.jvp`` does not.
    """
    mesh, axes = layout.mesh, tuple(layout.batch_axes)
    n = math.prod(mesh.shape[a] for a in axes)
    emb = P(axes, None)

    def logits(img_bxD, txt_bxD, log_scale, bias):
        return jnp.exp(log_scale) * (img_bxD @ txt_bxD.T) + bias

    # Every pair's term is -log sigmoid(-z) = softplus(z), except a positive pair's:
    # -log sigmoid(z) = softplus(z) - z. So each hop sums softplus over its b x b block
    # and hop 0 (the device's own texts) subtracts its diagonal logits, computed from the
    # b x D embeddings: no b x b label matrix, one elementwise pass per block. (For a
    # confident positive, z >> 0, softplus(z) - z cancels: an absolute error of about
    # eps * z per positive pair, far below the loss's own float32 rounding.)
    def local_loss(img_bxD, txt_bxD, log_scale, bias):
        def hop(total, travel, txt_bxD, first):
            part = jnp.sum(jax.nn.softplus(logits(img_bxD, txt_bxD, log_scale, bias)))
            if first:
                diag = jnp.exp(log_scale) * jnp.sum(img_bxD * txt_bxD)
                part = part - diag - img_bxD.shape[0] * bias
            return (part if total is None else total + part), travel

        total, _ = _ring(txt_bxD, axes, n, hop)
        return jax.lax.psum(total, axes) / (n * img_bxD.shape[0])

    def local_grads(img_bxD, txt_bxD, log_scale, bias, g):
        # d loss / d z = sigmoid(z), minus 1 on hop 0's diagonal. The constant factors
        # (the logit scale, g / B) are applied once at the end, to b x D arrays.
        def hop(acc, d_txt_bxD, txt_bxD, first):
            d_logits_bxb = jax.nn.sigmoid(logits(img_bxD, txt_bxD, log_scale, bias))
            if first:
                d_logits_bxb = d_logits_bxb - jnp.eye(*d_logits_bxb.shape, dtype=d_logits_bxb.dtype)
            new = (d_logits_bxb @ txt_bxD, jnp.sum(d_logits_bxb))  # d img, d bias
            d_txt = d_logits_bxb.T @ img_bxD
            if acc is None:
                return new, d_txt
            return jax.tree.map(jnp.add, acc, new), d_txt_bxD + d_txt

        (d_img, d_bias), d_txt = _ring(txt_bxD, axes, n, hop)
        if n > 1:  # each finished block sits one device short of its owner
            d_txt = jax.lax.ppermute(d_txt, axes, [(i, (i + 1) % n) for i in range(n)])
        norm = g / (n * img_bxD.shape[0])
        d_img, d_txt = (jnp.exp(log_scale) * norm) * d_img, (jnp.exp(log_scale) * norm) * d_txt
        # sum_ij d_logits_ij * scale * sim_ij = sum(img * d_img): no b x b product needed.
        d_log_scale = jnp.sum(img_bxD * d_img)
        return (
            d_img.astype(img_bxD.dtype),
            d_txt.astype(txt_bxD.dtype),
            jax.lax.psum(d_log_scale, axes).astype(log_scale.dtype),
            jax.lax.psum(norm * d_bias, axes).astype(bias.dtype),
        )

    forward = jax.shard_map(local_loss, mesh=mesh, in_specs=(emb, emb, P(), P()), out_specs=P())
    backward = jax.shard_map(
        local_grads,
        mesh=mesh,
        in_specs=(emb, emb, P(), P(), P()),
        out_specs=(emb, emb, P(), P()),
    )

    @jax.custom_vjp
    def fn(img_emb_BxD, txt_emb_BxD, log_scale, bias):
        return forward(img_emb_BxD, txt_emb_BxD, log_scale, bias)

    def fn_fwd(img_emb_BxD, txt_emb_BxD, log_scale, bias):
        residuals = (img_emb_BxD, txt_emb_BxD, log_scale, bias)
        return forward(*residuals), residuals

    def fn_bwd(residuals, g):
        return backward(*residuals, g)

    fn.defvjp(fn_fwd, fn_bwd)
    return Loss(fn, options.init_temperature, options.init_bias)
