"""The chunked (ring) sigmoid loss against the gathered one, on 8 simulated CPU devices.

Equal value and gradients for several meshes and per-device batches, a compiled memory
bound at 8 devices, and the softmax loss on sharded inputs against one device.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.chunked_loss import chunked_sigmoid_loss
from clip_jax.losses import sigmoid_loss, softmax_loss
from clip_jax.schemas import SigmoidOptions, SoftmaxOptions
from clip_jax.sharding import Layout

MESHES = {
    "data2": ((2,), ("data",), ("data",)),
    "data4": ((4,), ("data",), ("data",)),
    "data8": ((8,), ("data",), ("data",)),
    # Two batch axes (one ring over all 4 of their devices) plus a non-batch axis.
    "data2_fsdp2_model2": ((2, 2, 2), ("data", "fsdp", "model"), ("data", "fsdp")),
}


def make_layout(shape: tuple[int, ...], names: tuple[str, ...], batch_axes) -> Layout:
    devices = np.array(jax.devices()[: math.prod(shape)]).reshape(shape)
    return Layout(Mesh(devices, names), rules=(), batch_axes=batch_axes)


def _normalise(x_BxD: jax.Array) -> jax.Array:
    return x_BxD / jnp.linalg.norm(x_BxD, axis=-1, keepdims=True)


def pairs(batch: int, dim: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """L2-normalised image / text embeddings; each text close to its image, so the
    positive pairs (the diagonal) matter as much as the negatives."""
    k_img, k_txt = jax.random.split(jax.random.key(seed))
    img_BxD = _normalise(jax.random.normal(k_img, (batch, dim)))
    txt_BxD = _normalise(img_BxD + 0.7 * jax.random.normal(k_txt, (batch, dim)) / dim**0.5)
    return img_BxD, txt_BxD


def grads(fn, *args):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*args)


# (mesh, per-device batch): every mesh, and batches 1, 3 and 8 at 8 devices; a subset
# elsewhere, since each case compiles two programs (~2 s on two cores).
CASES = [
    ("data2", 1),
    ("data2", 8),
    ("data4", 3),
    ("data8", 1),
    ("data8", 3),
    ("data8", 8),
    ("data2_fsdp2_model2", 1),
    ("data2_fsdp2_model2", 3),
]


@pytest.mark.parametrize(("mesh_name", "per_device"), CASES)
@pytest.mark.slow
def test_chunked_sigmoid_equals_gathered(mesh_name, per_device):
    layout = make_layout(*MESHES[mesh_name])
    batch = per_device * layout.batch_divisor
    sharding = NamedSharding(layout.mesh, P(layout.batch_axes, None))
    img_BxD, txt_BxD = (jax.device_put(x, sharding) for x in pairs(batch, 16))
    # Scale and bias away from their init, so negatives carry sizeable gradients too.
    log_scale, bias = jnp.float32(math.log(5.0)), jnp.float32(-2.0)

    chunked = chunked_sigmoid_loss(SigmoidOptions(), layout).fn
    gathered = sigmoid_loss(SigmoidOptions()).fn
    value, grad = grads(chunked, img_BxD, txt_BxD, log_scale, bias)
    expected_value, expected_grad = grads(gathered, img_BxD, txt_BxD, log_scale, bias)

    assert value.sharding.is_fully_replicated
    np.testing.assert_allclose(value, expected_value, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(
        ("img", "txt", "log_scale", "bias"), grad, expected_grad, strict=True
    ):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    # The embedding gradients come back sharded like the embeddings.
    assert grad[0].sharding.is_equivalent_to(sharding, 2)
    assert grad[1].sharding.is_equivalent_to(sharding, 2)


def test_chunked_sigmoid_init_scale_and_bias():
    """At the SigLIP init (t' = log 10, b = -10) too, where the loss is dominated by b."""
    layout = make_layout(*MESHES["data8"])
    sharding = NamedSharding(layout.mesh, P(layout.batch_axes, None))
    img_BxD, txt_BxD = (jax.device_put(x, sharding) for x in pairs(8 * 4, 16, seed=1))
    options = SigmoidOptions()
    args = (img_BxD, txt_BxD, jnp.float32(math.log(options.init_temperature)))
    args += (jnp.float32(options.init_bias),)
    value, grad = grads(chunked_sigmoid_loss(options, layout).fn, *args)
    expected_value, expected_grad = grads(sigmoid_loss(options).fn, *args)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for got, want in zip(grad, expected_grad, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _temp_bytes(fn, layout: Layout, batch: int, dim: int) -> int:
    """Compiled temporary memory of value_and_grad (as in training), per device."""
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=layout.batch_sharding(2))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=layout.replicated())
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
    compiled = step.lower(emb, emb, scalar, scalar).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_sigmoid_memory_is_a_fraction_of_gathered():
    layout = make_layout(*MESHES["data8"])
    batch, dim = 8 * 512, 256
    chunked = _temp_bytes(chunked_sigmoid_loss(SigmoidOptions(), layout).fn, layout, batch, dim)
    gathered = _temp_bytes(sigmoid_loss(SigmoidOptions()).fn, layout, batch, dim)
    assert chunked <= gathered / 4, (chunked, gathered)


@pytest.mark.slow
def test_softmax_across_devices_equals_single_device():
    layout = make_layout(*MESHES["data8"])
    img_BxD, txt_BxD = pairs(8 * 6, 16, seed=2)
    log_scale = jnp.float32(math.log(20.0))
    fn = softmax_loss(SoftmaxOptions()).fn
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))

    one = jax.devices()[0]
    value, grad = step(*jax.device_put((img_BxD, txt_BxD, log_scale, jnp.float32(0)), one))
    sharding = layout.batch_sharding(2)
    sharded = (jax.device_put(img_BxD, sharding), jax.device_put(txt_BxD, sharding))
    value_8, grad_8 = step(*sharded, log_scale, jnp.float32(0))

    assert len(value_8.sharding.device_set) == 8
    np.testing.assert_allclose(value_8, value, rtol=1e-5, atol=1e-6)
    for got, want in zip(grad_8, grad, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
