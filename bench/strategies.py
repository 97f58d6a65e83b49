"""Step time and per-device parameter bytes of each sharding strategy (8 simulated devices).

    uv run python bench/strategies.py [key.path=value ...]

Prints measured figures only. On simulated CPU devices the step times show the cost of
the extra collectives, not the speed-up a real mesh gives; the per-device bytes are
what the strategies are for.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from clip_jax.components import components  # noqa: E402
from clip_jax.spec import load_spec  # noqa: E402
from clip_jax.train.state import create_state, make_train_step, state_shardings  # noqa: E402

TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "templates", "quickstart.toml")
STRATEGIES = {
    "dp": ["sharding.mesh.data=8"],
    "fsdp": ["sharding.mesh.fsdp=8"],
    "tp": ["sharding.mesh.data=4", "sharding.mesh.model=2"],
    "fsdp_tp": ["sharding.mesh.fsdp=4", "sharding.mesh.model=2"],
}


def measure(strategy: str, overrides: list[str], steps: int = 10) -> tuple[float, float, int]:
    spec = load_spec(TEMPLATE, [f"sharding.strategy={strategy}", *STRATEGIES[strategy], *overrides])
    comps = components(spec)
    tx, schedule = comps.optimizer()
    init, _, shardings = state_shardings(comps.model, tx, comps.layout, spec)
    state = create_state(init, shardings, seed=0)
    device0 = jax.devices()[0]
    param_bytes = sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(state["params"])
        for shard in leaf.addressable_shards
        if shard.device == device0
    )
    step = make_train_step(comps.model, comps.loss.fn, tx, schedule, shardings, comps.layout)
    rng = np.random.default_rng(0)
    v, t, batch = spec.model.vision, spec.model.text, spec.train.batch_size
    images = jax.device_put(
        rng.normal(size=(batch, v.image_size, v.image_size, 3)).astype(np.float32),
        comps.layout.batch_sharding(4),
    )
    tokens = jax.device_put(
        rng.integers(3, 500, size=(batch, t.context_length)).astype(np.int32),
        comps.layout.batch_sharding(2),
    )
    state, metrics = step(state, images, tokens)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, images, tokens)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state["params"]))
    return step_s, param_bytes, total


def main(overrides: list[str]) -> None:
    print(f"{jax.device_count()} x {jax.devices()[0].platform}; quickstart {overrides}")
    print(f"{'strategy':<9} {'step ms':>8} {'params/device KiB':>18} {'of total':>9}")
    for strategy in STRATEGIES:
        step_s, per_device, total = measure(strategy, overrides)
        print(
            f"{strategy:<9} {step_s * 1000:8.1f} {per_device / 1024:18.1f} "
            f"{per_device / total:9.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
