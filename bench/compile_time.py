"""Compile time of a training step against depth, with and without scanned layers.

    uv run python bench/compile_time.py [--width 256] [--depths 2,24]

For each depth, lowers and compiles value_and_grad of the sigmoid loss through a CLIP
whose two towers have that depth, and prints the seconds spent tracing+lowering and
compiling, then the deep/shallow ratio per mode. Scanned layers trace one block, so
their ratio should stay near 1; a Python loop of blocks grows with depth. It asserts
nothing: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.losses import sigmoid_loss
from clip_jax.models.clip import build_clip
from clip_jax.schemas import SigmoidOptions
from clip_jax.spec import validate


def compile_seconds(width: int, depth: int, scan: bool) -> tuple[float, float]:
    tower = {"width": width, "depth": depth, "heads": max(width // 64, 1), "scan_layers": scan}
    spec = validate(
        {
            "model": {
                "embed_dim": width,
                "vision": {**tower, "image_size": 64, "patch_size": 16},
                "text": {**tower, "vocab_size": 1024, "context_length": 16},
            }
        }
    )
    model = build_clip(spec.model, 10.0, -10.0)
    images = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"])
    loss = sigmoid_loss(SigmoidOptions()).fn

    def step(p, i, t):
        return loss(*model.apply({"params": p}, i, t))

    start = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(step)).lower(params, images, tokens)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    return traced, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depths", default="2,24")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    print(f"{'mode':<8} {'depth':>5} {'trace+lower s':>14} {'compile s':>10} {'total s':>8}")
    totals: dict[tuple[bool, int], float] = {}
    compile_seconds(args.width, 1, False)  # warm-up: the first compile pays one-time costs
    for scan in (True, False):
        for depth in depths:
            traced, compiled = compile_seconds(args.width, depth, scan)
            totals[scan, depth] = traced + compiled
            mode = "scan" if scan else "loop"
            print(
                f"{mode:<8} {depth:>5} {traced:>14.2f} {compiled:>10.2f} {traced + compiled:>8.2f}"
            )
    shallow, deep = depths[0], depths[-1]
    for scan in (True, False):
        ratio = totals[scan, deep] / totals[scan, shallow]
        mode = "scan" if scan else "loop"
        print(f"{mode}: {deep} layers / {shallow} layers = {ratio:.2f}x")


if __name__ == "__main__":
    main()
