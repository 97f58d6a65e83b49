"""How fast a spec trains, and how close that is to what the hardware can do.

    uv run python bench/train_throughput.py [SPEC] [key.path=value ...]
        [--steps 20] [--run-steps 60] [--no-run] [--profile DIR] [--json]

Prints, for the spec's compiled train step fed one fixed batch: images/s, the model's
training FLOPs per step (XLA's count of the lowered step without remat, i.e. model
FLOPs, not recomputation), the achieved FLOP/s, and its ratio to a matrix-product peak
measured in this process for the dtype the products use (bf16 x bf16 -> f32 when any
tower multiplies in bfloat16, else f32 x f32): on an accelerator that ratio is the
MFU. Then, unless ``--no-run``, a short real run of the trainer on the spec's data
(in a temporary folder) and where its time went, from the trainer's own metrics.
It asserts nothing; the step benchmark needs no TensorFlow, so it runs as is on a GPU
machine. ``--profile DIR`` also traces a few steps with ``jax.profiler`` into DIR and
prints where their time went (``bench/profile_summary.py``, which reads the trace again
anywhere). ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if __name__ == "__main__":  # as `clipctl run` does: huge pages for XLA's scratch memory
    from clip_jax.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clip_jax.components import components, for_flop_count  # noqa: E402
from clip_jax.host_memory import huge_pages_on  # noqa: E402
from clip_jax.models.chunks import unchunked  # noqa: E402
from clip_jax.spec import load_spec  # noqa: E402
from clip_jax.train.state import create_state, make_train_step, state_shardings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_summary import show as show_profile  # noqa: E402
from profile_summary import summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROFILED_STEPS = 3


def matmul_peak(dtype: str, repeats: int = 5) -> float:
    """Best FLOP/s of one large square product in ``dtype`` inputs, float32 accumulation."""
    n = 4096 if jax.devices()[0].platform == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    product = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    product(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def product_dtype(spec) -> str:
    towers = (spec.model.vision, spec.model.text)
    uses_bf16 = any(
        (getattr(t, "matmul_dtype", None) or getattr(t, "dtype", "float32")) == "bfloat16"
        for t in towers
    )
    return "bfloat16" if uses_bf16 else "float32"


def fixed_batch(comps):
    spec = comps.spec
    v, t, batch = spec.model.vision, spec.model.text, spec.train.batch_size
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, v.image_size, v.image_size, 3)).astype(np.float32)
    tokens = rng.integers(1, min(200, t.vocab_size), size=(batch, t.context_length))
    return (
        jax.device_put(images, comps.layout.batch_sharding(4)),
        jax.device_put(tokens.astype(np.int32), comps.layout.batch_sharding(2)),
    )


def compiled_step(comps):
    tx, schedule = comps.optimizer()
    init, _, shardings = state_shardings(comps.model, tx, comps.layout, comps.spec)
    state = create_state(init, shardings, seed=0)
    step = make_train_step(
        comps.model,
        comps.loss.fn,
        tx,
        schedule,
        shardings,
        comps.layout,
        objective=comps.objective(),
        teacher=comps.teacher,
    )
    return step, state


def model_flops(spec_path: str, overrides: list[str]) -> float:
    """FLOPs of one train step as the model defines it: XLA's count of the lowered step
    with every tower unscanned, without remat (recomputation is not model work) and the
    chunked heads in one chunk (``components.for_flop_count``)."""
    comps = components(for_flop_count(load_spec(spec_path, overrides)))
    step, state = compiled_step(comps)
    images, tokens = fixed_batch(comps)
    with unchunked():
        lowered = step.lower(state, images, tokens)
    flops = _flops(lowered.cost_analysis())
    if not flops:  # XLA's GPU backend counts only a compiled program
        flops = _flops(lowered.compile().cost_analysis())
    return flops


def _flops(cost) -> float:
    cost = (cost[0] if cost else {}) if isinstance(cost, list) else (cost or {})
    return float(cost.get("flops", 0.0))


def step_benchmark(
    spec_path: str, overrides: list[str], steps: int, profile: Path | None = None
) -> dict:
    comps = components(load_spec(spec_path, overrides))
    comps.check()  # e.g. cuDNN attention on a machine without a GPU: a clear message
    batch = comps.spec.train.batch_size
    step, state = compiled_step(comps)
    images, tokens = fixed_batch(comps)
    start = time.perf_counter()
    lowered = step.lower(state, images, tokens)
    step = lowered.compile()
    state, metrics = step(state, images, tokens)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    # This program is the model's own (no remat, no scan, no chunked head's loop): its
    # count is the model FLOPs, and a second compile (minutes for clip-b16 on a GPU) is
    # saved.
    plain = for_flop_count(comps.spec) is comps.spec and not comps.aux_terms
    flops = (_flops(lowered.cost_analysis()) or _flops(step.cost_analysis())) if plain else None
    print(f"first step (compile included): {compile_s:.1f} s", file=sys.stderr, flush=True)
    best = math.inf
    for _ in range(3):  # best of three rounds: the least disturbed by the rest of the machine
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, images, tokens)
        jax.block_until_ready(metrics)
        best = min(best, (time.perf_counter() - start) / steps)
    if profile is not None:
        state = traced(step, state, (images, tokens), profile)
    del state
    return {
        "batch_size": batch,
        "step_s": best,
        "images_per_s": batch / best,
        "compile_s": compile_s,
        "product_dtype": product_dtype(comps.spec),
        "model_flops": flops,
    }


def traced(step, state, batch: tuple, folder: Path):
    """A few steps under jax.profiler; the state they leave. A profiler that cannot
    start (e.g. no CUPTI on a GPU machine) is reported and the benchmark's figures stand."""
    try:
        with jax.profiler.trace(str(folder), create_perfetto_trace=True):
            for _ in range(PROFILED_STEPS):
                state, metrics = step(state, *batch)
            jax.block_until_ready(metrics)
    except Exception as error:  # noqa: BLE001 - the profile is an extra
        print(f"profile: not taken ({error})", file=sys.stderr, flush=True)
    return state


def real_run(spec_path: str, overrides: list[str], steps: int) -> dict:
    """A short run of the real trainer; its time split from its own metrics.jsonl."""
    from clip_jax.train.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        run_overrides = [
            *overrides,
            f"run.output_dir={tmp}/run",
            f"train.steps={steps}",
            f"train.checkpoint_every={steps}",
            "eval.every=0",
        ]
        spec = load_spec(spec_path, run_overrides)
        train(spec, stream=open(os.devnull, "w"))  # noqa: SIM115
        lines = Path(tmp, "run", "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train_records = [r for r in records if r.get("split") == "train"][1:]  # first: warm-up
    if not train_records:
        return {}

    def mean(key: str) -> float | None:
        values = [r[key] for r in train_records if key in r]
        return float(np.mean(values)) if values else None

    return {
        "steps": steps,
        "log_every": spec.train.log_every,
        "images_per_s": mean("images_per_s"),
        # The least disturbed interval, to set against the bare step's best round.
        "best_images_per_s": max(r["images_per_s"] for r in train_records),
        "data_wait_frac": mean("time/data_wait_frac"),
        "step_s": mean("time/step_s"),
        "eval_s": mean("time/eval_s"),
        "checkpoint_s": mean("time/checkpoint_s"),
    }


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", nargs="?", default=str(ROOT / "templates/quickstart.toml"))
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--run-steps", type=int, default=60, help="steps of the real run")
    parser.add_argument("--no-run", action="store_true", help="skip the real run")
    parser.add_argument("--profile", type=Path, help="trace a few steps into this folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if "=" in args.spec:  # overrides only: the quickstart
        args.overrides.insert(0, args.spec)
        args.spec = str(ROOT / "templates/quickstart.toml")

    device = jax.devices()[0]
    result: dict = {
        "device": f"{jax.device_count()} x {getattr(device, 'device_kind', device.platform)}",
        "spec": args.spec,
        "overrides": args.overrides,
        "host_huge_pages": huge_pages_on(),
    }
    step = step_benchmark(args.spec, args.overrides, args.steps, args.profile)
    flops = step.pop("model_flops") or model_flops(args.spec, args.overrides)
    peak = matmul_peak(step["product_dtype"]) * jax.device_count()
    achieved = flops / step["step_s"]
    result["step"] = step | {
        "model_flops_per_step": flops,
        "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peak,
        "fraction_of_peak": achieved / peak,
    }
    if args.profile is not None:
        try:
            result["profile"] = summarize(args.profile, PROFILED_STEPS)
        except SystemExit as error:  # no trace was written
            print(f"profile: {error}", file=sys.stderr)
    if not args.no_run:
        result["run"] = real_run(args.spec, args.overrides, args.run_steps)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
        if "profile" in result:
            show_profile(result["profile"])
    return result


def show(result: dict) -> None:
    s = result["step"]
    pages = "huge pages" if result["host_huge_pages"] else "4 KiB pages"
    print(
        f"device: {result['device']} ({pages} for host scratch) | spec {result['spec']} "
        f"{' '.join(result['overrides'])}"
    )
    print(
        f"train step: {s['images_per_s']:,.1f} images/s (batch {s['batch_size']}, "
        f"{s['step_s'] * 1e3:,.1f} ms/step; first step incl. compile {s['compile_s']:.1f} s)"
    )
    print(
        f"model FLOPs: {s['model_flops_per_step'] / 1e9:,.1f} GFLOP/step -> "
        f"{s['achieved_flops_per_s'] / 1e9:,.0f} GFLOP/s achieved"
    )
    print(
        f"{s['product_dtype']} matmul peak (measured here): "
        f"{s['matmul_peak_flops_per_s'] / 1e9:,.0f} GFLOP/s -> "
        f"{100 * s['fraction_of_peak']:.1f}% of peak"
    )
    run = result.get("run")
    if run:
        step_rate = s["images_per_s"]
        print(
            f"real run ({run['steps']} steps, log every {run['log_every']}): "
            f"{run['images_per_s']:,.1f} images/s = {run['images_per_s'] / step_rate:.2f}x "
            f"the bare step; its best interval {run['best_images_per_s']:,.1f} = "
            f"{run['best_images_per_s'] / step_rate:.2f}x (best against best)"
        )
        parts = [
            f"{name} {run[key]:.3f}{unit}"
            for name, key, unit in (
                ("input wait", "data_wait_frac", " of wall time"),
                ("step", "step_s", " s"),
                ("eval", "eval_s", " s"),
                ("checkpoint", "checkpoint_s", " s"),
            )
            if run.get(key) is not None
        ]
        if parts:
            print("  per log interval: " + " | ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1:])
