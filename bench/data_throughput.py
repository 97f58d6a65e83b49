"""The input pipeline at real image sizes: 256 px JPEGs -> 224 px batches, per host core.

    uv run python bench/data_throughput.py [--step-rate IMAGES_PER_S] [--json]

Writes ``--examples`` synthetic 256x256 JPEGs with captions (the embedded dataset's
generator, in the img2dataset layout `clipctl data synth` writes) into tfrecord shards in
a temporary folder, or reads ``--data`` shards, and runs them through the training
pipeline (``pipeline.make_dataset`` + ``iterate`` as one logical reader uses them:
shuffled, repeated, decoded, resized, normalised, batched) with 1 and 2 tf.data threads.
It prints images/s, images per CPU-second (the process's CPU time: tf.data's threads and
the consumer thread alike), the per-stage split, and the host cores a train step rate
needs: ``--step-rate``, or by default clip-b16 on a TPU v4-8 host at 50% MFU (training
FLOPs per pair from ``clip_jax.info.model_info``, the chips' bf16 peak). It asserts
nothing; the figures are only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path

from clip_jax.data import pipeline, synth_writer
from clip_jax.data.tf_setup import import_tf
from clip_jax.schemas import PreprocessOptions, RecordKeys

ROOT = Path(__file__).resolve().parents[1]
# A TPU v4 chip: 275 TFLOP/s bf16 peak; a v4-8 host holds 4 chips and its VM has 240 vCPUs.
V4_PEAK_FLOPS = 275e12
V4_CHIPS_PER_HOST = 4
V4_HOST_VCPUS = 240


def cpu_seconds() -> float:
    """CPU time of this process (all threads), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(batches, batch_size: int, seconds: float, repeats: int) -> dict:
    """Median images/s and images per CPU-second over ``repeats`` windows of ``seconds``."""
    rates, per_cpu = [], []
    for _ in range(repeats):
        count, wall, cpu = 0, time.perf_counter(), cpu_seconds()
        while time.perf_counter() - wall < seconds:
            next(batches)
            count += batch_size
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        rates.append(count / wall)
        per_cpu.append(count / cpu)
    return {
        "images_per_s": statistics.median(rates),
        "images_per_cpu_s": statistics.median(per_cpu),
        "cpu_per_wall": statistics.median(rates) / statistics.median(per_cpu),
    }


def write_shards(out: Path, examples: int, size: int) -> list[str]:
    """``examples`` captioned size x size JPEGs in >= 8 train shards (and 8 tiny validation ones)."""
    synth_writer.write_synthetic(out, examples, synth_writer.MIN_SHARDS, image_size=size)
    return pipeline.expand_files(str(out / "train" / "*.tfrecord"))


def reader_pipeline(files, args, threads: int):
    """The real pipeline, as one logical reader of a training run builds it."""
    dataset = pipeline.make_dataset(
        files,
        image_size=args.image_size,
        batch_size=args.batch_size,
        train=True,
        seed=0,
        shuffle_buffer=args.shuffle_buffer,
        threads=threads,
    )
    return pipeline.iterate(dataset)


def stage_pipeline(files, args, stage: str):
    """make_dataset's reading, shuffling and parsing, its map cut after ``stage``.

    Each element keeps one value that depends on every pixel the stage made, so no
    work is pruned, and nothing image-sized is batched: the ``batch`` stage (stacking
    float32 images, the numpy hand-off) is the real pipeline minus the last of these.
    """
    tf = import_tf()
    pre = PreprocessOptions()
    features = {"jpg": tf.io.FixedLenFeature([], tf.string)}

    def cut(position, record):
        image = tf.io.parse_single_example(record, features)["jpg"]
        if stage == "read+parse":
            return position, tf.cast(tf.strings.length(image), tf.float32)
        image = pipeline.decode_image(tf, image)
        if stage != "decode":
            image = pipeline.resize_image(tf, image, args.image_size, pre)
        if stage == "normalise":
            image = pipeline.normalize_image(tf, image, pre)
        return position, tf.cast(image[-1, -1, -1], tf.float32)

    ds = tf.data.TFRecordDataset(list(files), num_parallel_reads=min(len(files), 8))
    ds = ds.shuffle(args.shuffle_buffer, seed=0, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().batch(args.batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.deterministic = True
    return ds.with_options(options).prefetch(2).as_numpy_iterator()


def warmed(batches, count: int = 3):
    for _ in range(count):  # fill the shuffle buffer, start the threads
        next(batches)
    return batches


def train_rate(args) -> tuple[float, dict]:
    """Images/s a step needs: ``--step-rate``, or the model on the accelerators at ``--mfu``."""
    if args.step_rate:
        return args.step_rate, {"step_rate": "given (--step-rate)"}
    from clip_jax.info import model_info
    from clip_jax.spec import load_spec

    spec = load_spec(args.spec, [f"model.preset={args.preset}"])
    flops = model_info(spec, devices=1)["train_flops_per_pair"]
    peak = args.chips * args.peak_tflops * 1e12
    return args.mfu * peak / flops, {
        "model": f"{args.preset} ({args.spec}), {spec.model.vision.image_size} px",
        "train_flops_per_pair": flops,
        "accelerator": f"{args.chips} chips x {args.peak_tflops:g} TFLOP/s bf16 peak "
        "(TPU v4-8 host by default)",
        "mfu": args.mfu,
        "step_rate": "mfu x peak / train_flops_per_pair (XLA cost analysis, fwd + bwd)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-rate", type=float, help="images/s to feed (default: model)")
    parser.add_argument("--preset", default="clip-b16")
    parser.add_argument("--spec", default=str(ROOT / "templates" / "clip-b32.toml"))
    parser.add_argument("--chips", type=int, default=V4_CHIPS_PER_HOST)
    parser.add_argument("--peak-tflops", type=float, default=V4_PEAK_FLOPS / 1e12)
    parser.add_argument("--mfu", type=float, default=0.5)
    parser.add_argument("--host-cores", type=int, default=V4_HOST_VCPUS)
    parser.add_argument("--data", help="glob of tfrecord shards to read instead (jpg, txt)")
    parser.add_argument("--examples", type=int, default=1024, help="synthetic JPEGs to write")
    parser.add_argument("--source-size", type=int, default=256, help="synthetic JPEG side")
    parser.add_argument("--image-size", type=int, default=224, help="model input side")
    parser.add_argument("--batch-size", type=int, default=128, help="one reader's batch")
    parser.add_argument("--shuffle-buffer", type=int, default=RecordKeys().shuffle_buffer)
    parser.add_argument("--seconds", type=float, default=4.0, help="per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="windows per figure (median)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage split")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    say = (lambda *a: None) if args.json else print

    with tempfile.TemporaryDirectory(prefix="clip-jax-data-bench-") as tmp:
        if args.data:
            files, source = pipeline.expand_files(args.data), args.data
        else:
            start = time.perf_counter()
            files = write_shards(Path(tmp), args.examples, args.source_size)
            source = (
                f"{args.examples} synthetic {args.source_size}x{args.source_size} JPEGs "
                f"(quality 95) in {len(files)} shards"
            )
            say(f"wrote {source} in {time.perf_counter() - start:.1f} s")
        say(
            f"pipeline: {args.image_size} px, crop, bicubic, batch {args.batch_size}, "
            f"shuffle buffer {args.shuffle_buffer}; median of {args.repeats} x {args.seconds:g} s"
        )
        runs = {}
        for threads in (1, 2):
            figures = measure(
                warmed(reader_pipeline(files, args, threads)),
                args.batch_size,
                args.seconds,
                args.repeats,
            )
            figures["images_per_s_per_thread"] = figures["images_per_s"] / threads
            runs[str(threads)] = figures
            say(
                f"{threads} tf.data thread{'s' if threads > 1 else ' '}: "
                f"{figures['images_per_s']:7,.0f} images/s "
                f"({figures['images_per_s_per_thread']:,.0f} per thread), "
                f"{figures['images_per_cpu_s']:,.0f} images per CPU-second "
                f"(CPU/wall {figures['cpu_per_wall']:.2f})"
            )
        say(f"2 threads / 1 thread: {runs['2']['images_per_s'] / runs['1']['images_per_s']:.2f}x")

        stages = {}
        if not args.no_stages:
            previous = 0.0
            for stage in ("read+parse", "decode", "resize+crop", "normalise"):
                figures = measure(
                    warmed(stage_pipeline(files, args, stage)),
                    args.batch_size,
                    args.seconds,
                    args.repeats,
                )
                total = 1e3 / figures["images_per_cpu_s"]
                stages[stage] = total - previous
                previous = total
            stages["batch"] = 1e3 / runs["1"]["images_per_cpu_s"] - previous
    whole = sum(stages.values())
    if stages:
        say("CPU-ms per image by stage (1 thread; cumulative pipelines, differences):")
        for stage, ms in stages.items():
            say(f"  {stage:12s} {ms:6.3f} ms  {ms / whole:6.1%}")

    per_core = runs["1"]["images_per_cpu_s"]
    per_reader = 2 * per_core  # a reader's pipeline has 2 tf.data threads: 2 cores at most
    rate, assumptions = train_rate(args)
    cores = rate / per_core
    readers = math.ceil(rate / per_reader)
    say(f"train step to feed: {rate:,.0f} images/s")
    for key, value in assumptions.items():
        say(f"  {key}: {value:,.4g}" if isinstance(value, float) else f"  {key}: {value}")
    say(
        f"host cores needed: {cores:.1f} at {per_core:,.0f} images per core-second, "
        f"{cores / args.host_cores:.1%} of a {args.host_cores}-vCPU host "
        "(no headroom; this machine's cores, the consumer thread included)"
    )
    say(
        f"logical readers needed per host: {readers} (`data.readers`; each reader's "
        f"pipeline has 2 tf.data threads, so at most about {per_reader:,.0f} images/s)"
    )
    if args.json:
        result = {
            "source": source,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "threads": runs,
            "stage_cpu_ms_per_image": stages,
            "train_images_per_s": rate,
            "assumptions": assumptions,
            "images_per_core_s": per_core,
            "host_cores_needed": cores,
            "host_cores": args.host_cores,
            "readers_needed": readers,
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
