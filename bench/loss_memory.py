"""Memory of the chunked (ring) sigmoid loss against the gathered one, per device count.

    uv run python bench/loss_memory.py [--batch 16384] [--dim 768] [--devices 2 4 8]

For each device count, both losses are jitted as in training (value and gradients with
respect to both embeddings, the logit scale and the bias) on batch-sharded inputs, and
the script prints XLA's compiled temporary memory per device, the ratio
chunked / gathered, and a measured step time. It prints figures and asserts nothing.
The devices are simulated CPU devices (8, set below before jax is imported) sharing
this host's cores, so the times compare the two losses, not real accelerators.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from clip_jax.chunked_loss import chunked_sigmoid_loss  # noqa: E402
from clip_jax.losses import sigmoid_loss  # noqa: E402
from clip_jax.schemas import SigmoidOptions  # noqa: E402
from clip_jax.sharding import Layout  # noqa: E402

MIB = 2**20


def measure(fn, layout: Layout, batch: int, dim: int, repeats: int) -> tuple[float, float]:
    """(temporary MiB per device, seconds per value_and_grad step)."""
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
    emb = layout.batch_sharding(2)
    img_BxD, txt_BxD = (
        jax.device_put(x / jnp.linalg.norm(x, axis=-1, keepdims=True), emb)
        for x in jax.random.normal(jax.random.key(0), (2, batch, dim))
    )
    scalars = jax.device_put((jnp.float32(math.log(10.0)), jnp.float32(-10.0)), layout.replicated())
    compiled = step.lower(img_BxD, txt_BxD, *scalars).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / MIB

    jax.block_until_ready(compiled(img_BxD, txt_BxD, *scalars))  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(compiled(img_BxD, txt_BxD, *scalars))
    return temp_mib, (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16384, help="global batch size")
    parser.add_argument("--dim", type=int, default=768, help="embedding width")
    parser.add_argument("--devices", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per loss")
    args = parser.parse_args()

    print(
        f"global batch {args.batch}, dim {args.dim}, float32, value_and_grad; "
        f"{jax.device_count()} simulated {jax.devices()[0].platform} devices on "
        f"{os.cpu_count()} cores"
    )
    header = (
        f"{'devices':>7} {'b/dev':>6} {'chunked MiB':>12} {'gathered MiB':>13} "
        f"{'ratio':>6} {'chunked s':>10} {'gathered s':>11}"
    )
    print(header)
    for n in args.devices:
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        layout = Layout(mesh, rules=(), batch_axes=("data",))
        options = SigmoidOptions()
        chunked_mib, chunked_s = measure(
            chunked_sigmoid_loss(options, layout).fn, layout, args.batch, args.dim, args.repeats
        )
        gathered_mib, gathered_s = measure(
            sigmoid_loss(options).fn, layout, args.batch, args.dim, args.repeats
        )
        print(
            f"{n:>7} {args.batch // n:>6} {chunked_mib:>12.1f} {gathered_mib:>13.1f} "
            f"{chunked_mib / gathered_mib:>6.3f} {chunked_s:>10.3f} {gathered_s:>11.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
