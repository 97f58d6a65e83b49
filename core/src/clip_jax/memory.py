"""Will it fit? The compiled per-device memory of the train step, and the largest batch.

An SPMD program's memory per device is what XLA's memory analysis reports for one
partition of it, so the real train step (``make_train_step`` on the real state
shardings) is lowered for ``jax.ShapeDtypeStruct`` arguments that carry their
shardings and compiled; nothing is allocated. Peak = arguments + outputs - aliased
(the donated state) + temporaries + code.

A mesh of N devices needs N devices to compile for: the local ones when there are
enough (a subset is fine), else a subprocess with N simulated CPU devices
(``--xla_force_host_platform_device_count``). A CPU compile estimates an accelerator's
program: fusion, layouts and bf16 handling differ there (``FOOTNOTE``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from clip_jax.errors import UserError
from clip_jax.estimator import Estimator
from clip_jax.fits import ACCELERATORS, local_device_memory

FOOTNOTE = (
    "compiled by XLA for {devices}: an estimate for TPU/GPU, whose "
    "fusion, layouts and bf16 handling differ"
)
PORTABLE_ATTENTION = (
    "{keys} = 'cudnn' estimated with XLA's attention (no GPU here), which keeps the "
    "(L x L) scores that the fused kernel does not: the GPU's peak is lower"
)
SCANNED_REMAT = (
    "{keys} with unrolled layers estimated as scanned: XLA's CPU compiler undoes remat in "
    "unrolled layers (no memory saved on a CPU), GPU and TPU compilers keep it"
)


def print_progress(message: str) -> None:
    """A ``progress`` for a log or a pipe (not a terminal): one plain line per message on
    stderr, so that a long estimate shows what it is compiling and what each gave."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- report
def report(
    path: str,
    overrides: Sequence[str] = (),
    devices: int | None = None,
    batch: int | None = None,
    memory: dict | str | None = "local",
    search: bool = False,
    strategies: Sequence[str] | None = None,
    microbatches: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per-device memory of the spec's train step on ``devices`` devices (default: the
    local ones) at ``batch`` (default ``train.batch_size``), per strategy (default the
    spec's; ``["all"]``: every registered one) and micro-batch count (default the spec's);
    with ``search``, the largest batch that fits ``memory`` (a ``device_memory`` dict,
    ``"local"``: the local device's, or None). More devices than this process has are
    simulated on CPU in a subprocess."""
    import jax

    if devices is not None and devices < 1:
        raise UserError(f"--devices must be at least 1 (got {devices})")
    request = {
        "path": str(path),
        "overrides": list(overrides),
        "devices": devices or jax.device_count(),
        "batch": batch,
        "memory": local_device_memory() if memory == "local" else memory,
        "search": search,
        "strategies": list(strategies) if strategies else None,
        "microbatches": list(microbatches) if microbatches else None,
    }
    if request["devices"] <= jax.device_count():
        return _report(**request, progress=progress)
    return run_worker(request, simulate=True, progress=progress)


def _report(
    path, overrides, devices, batch, memory, search, strategies, microbatches, progress=None
) -> dict[str, Any]:
    if microbatches and min(microbatches) < 1:
        raise UserError(f"--microbatches must be at least 1 (got {min(microbatches)})")
    if search and not memory:
        raise UserError(
            "--max-batch needs the device's memory and no local accelerator reports it: pass "
            f"--device NAME ({', '.join(ACCELERATORS)}) or --device-memory SIZE"
        )
    estimator = Estimator(path, overrides, devices, progress)
    spec = estimator.spec()
    every = list(strategies or []) == ["all"]
    if not strategies:
        strategies = [spec.sharding.strategy]
    elif every:
        from clip_jax.plugins import get_registry

        strategies = get_registry().names("sharding")
    counts = microbatches or [spec.train.microbatches]
    batch = batch or spec.train.batch_size
    limit = memory["bytes"] if memory else None
    estimates, largest, skipped = [], [], []
    sized: dict[tuple, str] = {}  # layout key -> the first strategy with that layout
    for strategy in strategies:
        same = _same_layout(estimator, strategy, sized) if every else None
        if same is not None:
            reason = f"same layout as {same} on this mesh"
            estimator.progress(f"{strategy}: {reason}, not compiled")
            skipped += [
                {"strategy": strategy, "microbatches": count, "error": reason, "same_as": same}
                for count in counts
            ]
            continue
        for count in counts:
            try:
                found = estimator.estimate(strategy, batch, count)
                fits = None if limit is None else found.peak <= limit
                estimates.append({**found.to_dict(), "fits": fits})
                if search:
                    largest.append(estimator.max_batch(strategy, count, limit, start=batch))
            except UserError as exc:
                if len(strategies) * len(counts) == 1:
                    raise
                skipped.append({"strategy": strategy, "microbatches": count, "error": str(exc)})
    return {
        "devices": devices,
        "platform": estimator.platform,
        "device_kind": estimator.devices[0].device_kind,
        "device_memory": memory,
        "estimates": estimates,
        "max_batch": largest if search else None,
        "skipped": skipped,
        "compiles": estimator.compiles,
        "note": _note(estimator, devices),
    }


def _same_layout(estimator: Estimator, strategy: str, sized: dict[tuple, str]) -> str | None:
    """The strategy already sized whose layout ``strategy`` has on this mesh (None: a
    new one, now recorded). One whose mesh cannot be built is estimated, which says why."""
    try:
        key = estimator.layout_key(strategy)
    except UserError:
        return None
    if key in sized:
        return sized[key]
    sized[key] = strategy
    return None


def _note(estimator: Estimator, devices: int) -> str | None:
    notes = []
    if estimator.platform == "cpu":
        cpus = "1 CPU device" if devices == 1 else f"{devices} simulated CPU devices"
        notes.append(FOOTNOTE.format(devices=cpus))
    if estimator.portable:
        notes.append(PORTABLE_ATTENTION.format(keys=", ".join(estimator.portable)))
    if estimator.scanned:
        notes.append(SCANNED_REMAT.format(keys=", ".join(estimator.scanned)))
    return "; ".join(notes) or None


# ---------------------------------------------------------------- subprocess
PROGRESS = "progress: "


def run_worker(
    request: dict[str, Any],
    simulate: bool,
    progress: Callable[[str], None] | None = None,
    on_process: Callable[[subprocess.Popen], None] | None = None,
) -> dict[str, Any]:
    """``_report`` in a fresh process: with ``simulate``, on ``request["devices"]`` CPU
    devices; else on the local devices (None: all; ``"memory": "local"`` allowed), with
    nothing allocated up front, so that a run can start beside it."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if simulate:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        count = f"--xla_force_host_platform_device_count={request['devices']}"
        env |= {"XLA_FLAGS": f"{flags} {count}".strip(), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-m", "clip_jax.memory"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if on_process is not None:
        on_process(process)
    errors: list[str] = []

    def read_stderr() -> None:
        for line in process.stderr:
            if line.startswith(PROGRESS):
                if progress is not None:
                    progress(line[len(PROGRESS) :].rstrip("\n"))
            else:
                errors.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    process.stdin.write(json.dumps(request))
    process.stdin.close()
    out = process.stdout.read()
    process.wait()
    reader.join()
    lines = out.strip().splitlines()
    answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if process.returncode == 0 and answer is not None:
        return answer
    if answer is not None and "error" in answer:
        raise UserError(answer["error"])
    if process.returncode < 0:
        raise RuntimeError(f"the memory estimate was stopped (signal {-process.returncode})")
    tail = "".join(errors[-8:]).strip()
    raise RuntimeError(f"the memory estimate failed (exit {process.returncode}):\n{tail}")


def _main() -> None:
    """``python -m clip_jax.memory``: a ``run_worker`` request on stdin, JSON on stdout."""
    request = json.loads(sys.stdin.read())

    def progress(message: str) -> None:
        print(PROGRESS + message, file=sys.stderr, flush=True)

    try:
        if request.get("devices") is None:
            import jax

            request["devices"] = jax.device_count()
        if request.get("memory") == "local":
            request["memory"] = local_device_memory()
        answer = _report(**request, progress=progress)
    except UserError as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(2)
    print(json.dumps(answer))


if __name__ == "__main__":
    _main()
