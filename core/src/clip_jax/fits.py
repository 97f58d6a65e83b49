"""Will it fit? The parts without jax: accelerators' memory, the largest-batch search
and the printed report (``clipctl info``'s), for ``clip_jax.memory``, the CLI and the TUI.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Callable
from typing import Any

from clip_jax.errors import UserError

GIB = 2**30
# What jax may use on a GPU by default: it preallocates this fraction of the memory
# (XLA_PYTHON_CLIENT_MEM_FRACTION); TPUs give it all of their HBM.
GPU_MEMORY_FRACTION = 0.75
# Memory per jax device, GiB: TPUs' HBM (a TPU v3 device is one core, half of its
# chip's 32 GiB), GPUs' total as nvidia-smi reports it (H100 81,559 MiB, H200 143,771).
ACCELERATORS: dict[str, tuple[float, str]] = {
    "tpu-v3": (16, "tpu"),
    "tpu-v4": (32, "tpu"),
    "tpu-v5e": (16, "tpu"),
    "tpu-v5p": (95, "tpu"),
    "tpu-v6e": (32, "tpu"),
    "a100-40g": (40, "gpu"),
    "a100-80g": (80, "gpu"),
    "h100": (79.6, "gpu"),
    "h200": (140.4, "gpu"),
    "l4": (22.5, "gpu"),
}
MAX_PROBES = 40
MEMORY_ENV = "CLIP_JAX_DEVICE_MEMORY"
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


# --------------------------------------------------------------- device memory
def parse_size(text: str, what: str = "--device-memory") -> int:
    """Bytes from ``16GiB``, ``16G`` (binary), ``80GB`` (decimal), ``512MiB``, ``1e9``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)(b?)\s*", text, re.I)
    if not match or (match[3] and not match[2]):
        raise UserError(f"{what}: {text!r} is not a size such as 16GiB, 80GB or 512MiB")
    number, prefix, binary, byte = match.groups()
    prefix = prefix.lower()
    scale = _UNITS[prefix] if binary or not byte else 1000 ** " kmgt".index(prefix or " ")
    size = int(float(number) * scale)
    if size <= 0:
        raise UserError(f"{what}: {text!r} must be more than 0 bytes")
    return size


def device_memory(
    name: str | None = None, size: str | None = None, what: str = "--device-memory"
) -> dict | None:
    """``{"bytes", "label"}`` of a named accelerator (``ACCELERATORS``) or a size; None
    when neither is given."""
    if name and size:
        raise UserError("pass --device or --device-memory, not both")
    if size:
        return {"bytes": parse_size(size, what), "label": ""}
    if not name:
        return None
    key = name.lower()
    if key not in ACCELERATORS:
        import difflib

        close = difflib.get_close_matches(key, ACCELERATORS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"--device: unknown accelerator {name!r}{hint} (known: {', '.join(ACCELERATORS)}; "
            "or give a size with --device-memory)"
        )
    gib, kind = ACCELERATORS[key]
    if kind == "gpu":
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
        return {
            "bytes": int(gib * GIB * fraction),
            "label": f"{key}: {fraction:.0%} of {gib:g} GiB (XLA_PYTHON_CLIENT_MEM_FRACTION)",
        }
    return {"bytes": int(gib * GIB), "label": f"{key}: {gib:g} GiB HBM"}


def local_device_memory() -> dict | None:
    """The memory jax may use on a local device: ``$CLIP_JAX_DEVICE_MEMORY`` (an
    accelerator name or a size) when set, else what the backend reports (not CPU's)."""
    chosen = os.environ.get(MEMORY_ENV, "").strip()
    if chosen:
        found = device_memory(chosen) if chosen.lower() in ACCELERATORS else None
        found = found or device_memory(size=chosen, what=MEMORY_ENV)
        detail = f" ({found['label']})" if found["label"] else ""
        return {**found, "label": f"{MEMORY_ENV}={chosen}{detail}"}
    import jax

    device = jax.local_devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    return {"bytes": int(limit), "label": f"local {device.device_kind}"} if limit else None


# ---------------------------------------------------------------------- search
def largest_batch(
    peak_of: Callable[[int], int], unit: int, limit: int, start: int | None = None
) -> tuple[int, int | None, dict[int, int]]:
    """(the largest multiple of ``unit`` whose ``peak_of`` fits ``limit``, 0 if none;
    the smallest that does not, None if none was found; the peaks probed).

    Each probe is a compile (seconds). Peak memory is close to affine in the batch, so
    the search follows the line through its probes and checks the neighbour of each
    guess; when the line misleads it (the bracket not halved, or the batch neither
    doubled nor halved before there is a bracket) the next probe doubles, halves or
    bisects. It starts from ``start`` (a batch already compiled, e.g. the spec's), else
    from ``unit``. Memory need not be monotone in the batch: the answer fits and the next
    multiple of ``unit`` does not, as probed.
    """
    peaks: dict[int, int] = {}

    def fits(batch: int) -> bool:
        peaks[batch] = peak_of(batch)
        return peaks[batch] <= limit

    def line(b1: int, b2: int) -> int | None:
        """Where the line through two probes crosses the limit, down to a unit."""
        p1, p2 = peaks[b1], peaks[b2]
        if p2 <= p1:
            return None
        return int(b1 + (limit - p1) * (b2 - b1) / (p2 - p1)) // unit * unit

    def bracket() -> tuple[int, int | None]:
        under = [b for b, p in peaks.items() if p <= limit]
        over = [b for b, p in peaks.items() if p > limit]
        return max(under, default=0), min(over, default=None)

    fits(max(unit, (start or unit) // unit * unit))
    follow_line = True  # after a line that misled: doubling, halving or bisection
    while len(peaks) < MAX_PROBES:
        lo, hi = bracket()
        if hi is not None and hi - lo <= unit or hi == unit:
            break
        if hi is None:  # everything fits so far: grow
            probes = sorted(peaks)[-2:]
            guess, fallback = (line(*probes) if len(probes) == 2 else None), 2 * lo
            guess = min(guess, 64 * lo) if guess is not None and guess > lo else None
        elif lo == 0:  # nothing fits yet: shrink
            probes = sorted(peaks)[:2]
            guess, fallback = (line(*probes) if len(probes) == 2 else None), hi // 2
            guess = max(guess, unit) if guess is not None and guess < hi else None
        else:  # a bracket
            guess, fallback = line(lo, hi), (lo + hi) // 2
        lowest, highest = lo + unit, hi - unit if hi is not None else None
        if guess is None or not follow_line:
            guess = max(fallback // unit * unit, lowest)
            fits(guess if highest is None else min(guess, highest))
            follow_line = True
            continue
        guess = max(guess, lowest) if highest is None else min(max(guess, lowest), highest)
        neighbour = guess + unit if fits(guess) else guess - unit
        if neighbour > lo and (hi is None or neighbour < hi):
            fits(neighbour)
        # It misled when it did not halve the bracket, or grow / shrink two-fold to one.
        new_lo, new_hi = bracket()
        if hi is None:
            follow_line = new_hi is not None or new_lo >= 2 * lo
        elif lo == 0:
            follow_line = new_lo > 0 or new_hi <= hi // 2
        else:
            follow_line = new_hi - new_lo <= (hi - lo) / 2
    lo, hi = bracket()
    return lo, hi, peaks


# -------------------------------------------------------------------- report
def size(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / GIB:,.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:,.2f} MiB"


def _table(rows: list[tuple[str, ...]], left: int = 1) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def format_report(report: dict[str, Any]) -> str:
    """The report as tables: estimates, largest batches, strategies skipped, footnote."""
    memory = report["device_memory"]
    limit = memory["bytes"] if memory else None
    lines = [f"memory / device on {report['devices']} devices"]
    if memory:
        lines[0] += f", of {size(limit)}" + (f" ({memory['label']})" if memory["label"] else "")
    rows = [("strategy", "mesh", "micro", "batch", "/device", "arguments", "temps", "peak", "")]
    for e in report["estimates"]:
        verdict = "" if e["fits"] is None else "fits" if e["fits"] else "DOES NOT FIT"
        share = f"{e['peak'] / limit:.0%} {verdict}" if limit else ""
        rows.append(
            (e["strategy"], "x".join(map(str, e["mesh"].values())), str(e["microbatches"]))
            + (f"{e['batch']:,}", f"{e['per_device_batch']:,}", size(e["arguments"]))
            + (size(e["temporaries"]), size(e["peak"]), share)
        )
    lines += _table(rows, left=2)
    if report.get("max_batch"):
        lines += ["", "largest batch that fits"]
        rows = [("strategy", "micro", "batch", "/device", "peak", "next", "its peak", "compiles")]
        for m in report["max_batch"]:
            batch = f"{m['batch']:,}" if m["batch"] else "none"
            above = f"{m['next_batch']:,}" if m["next_batch"] else "-"
            rows.append(
                (m["strategy"], str(m["microbatches"]), batch, f"{m['per_device_batch']:,}")
                + (size(m["peak"]), above, size(m["next_peak"]), str(m["compiles"]))
            )
        lines += _table(rows)
    # once per strategy and reason, not per micro-batch count
    lines += dict.fromkeys(f"{s['strategy']}: not sized: {s['error']}" for s in report["skipped"])
    if report.get("note"):
        lines.append(textwrap.fill(f"* {report['note']}", 80, subsequent_indent="  "))
    return "\n".join(lines)
