"""Where the quickstart's time goes: input pipeline vs. jit train step, in images/s.

    uv run python bench/throughput.py [SPEC] [key.path=value ...]

Prints measured figures and their ratio (pipeline headroom over the model); it asserts
nothing. The input side reads the spec's real training shards through tf.data; the
model side feeds one fixed batch to the compiled step so that only compute is timed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
from train_throughput import compiled_step, fixed_batch

from clip_jax.components import components
from clip_jax.data import pipeline
from clip_jax.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def pipeline_rate(comps, batches: int = 40) -> float:
    spec, source = comps.spec, comps.data
    dataset = pipeline.make_dataset(
        source.train_files,
        image_size=spec.model.vision.image_size,
        batch_size=spec.train.batch_size,
        image_key=source.keys.image_key,
        caption_key=source.keys.caption_key,
    )
    iterator = pipeline.iterate(dataset)
    for _ in range(5):  # fill the shuffle buffer and warm the threads
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * spec.train.batch_size / (time.perf_counter() - start)


def step_rate(comps, steps: int = 20) -> tuple[float, float]:
    step, state = compiled_step(comps)  # the same step and fixed batch as train_throughput.py
    images, tokens = fixed_batch(comps)
    batch = comps.spec.train.batch_size
    start = time.perf_counter()
    state, metrics = step(state, images, tokens)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, images, tokens)
    jax.block_until_ready(metrics)
    return steps * batch / (time.perf_counter() - start), compile_s


def main(argv: list[str]) -> None:
    spec_path = argv[0] if argv and "=" not in argv[0] else str(ROOT / "templates/quickstart.toml")
    overrides = [a for a in argv if "=" in a]
    comps = components(load_spec(spec_path, overrides))
    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].platform}; spec {spec_path} {overrides}"
    )
    model_ips, compile_s = step_rate(comps)
    print(f"train step: {model_ips:,.0f} images/s (first step incl. compile {compile_s:.1f} s)")
    input_ips = pipeline_rate(comps)
    print(f"input pipeline: {input_ips:,.0f} images/s")
    print(f"pipeline / step ratio: {input_ips / model_ips:.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
