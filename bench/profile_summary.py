"""Where a profiled train step's time went: busy time by kind of work, and the top ops.

    uv run python bench/profile_summary.py TRACE_DIR [--steps N] [--top 15] [--json]

Reads the Perfetto trace that ``jax.profiler.trace(..., create_perfetto_trace=True)``
writes (``bench/train_throughput.py --profile DIR`` makes one), so it needs nothing but
the standard library: a GPU session can bring its trace home and read it here. On an
accelerator it sums the device's kernels (processes named ``/device:...``); on a CPU,
the ops XLA's worker threads ran. Kinds are matched on the op's name, so they are a
first reading, not an accounting: look at the top ops too.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import Counter
from pathlib import Path

KINDS = [  # first match wins
    ("attention (fused)", r"fmha|flash|cudnn|attention"),
    ("matrix products", r"gemm|cublas|cutlass|nvjet|xmma|wgmma|matmul|\bdot|convolution"),
    ("copies, transposes", r"copy|transpose|memcpy|memset|dynamic.update.slice"),
    ("reductions", r"reduce|reduction"),
    ("XNNPACK fusions (CPU)", r"ynn"),  # products with their elementwise work
    ("other fusions (elementwise)", r"fusion|loop|elementwise"),
]

IDLE = re.compile(r"\bwait\b|await", re.IGNORECASE)


def trace_file(trace_dir: Path) -> Path:
    found = sorted(Path(trace_dir).glob("**/perfetto_trace.json.gz"))
    if not found:
        raise SystemExit(f"error: no perfetto_trace.json.gz under {trace_dir}")
    return found[-1]  # the latest trace


def op_times(trace_dir: Path) -> tuple[Counter, str]:
    """Total microseconds per op name, and which timeline they came from."""
    with gzip.open(trace_file(trace_dir), "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e.get("tid")): e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if devices:
        source = ", ".join(sorted(processes[pid] for pid in devices))
        keep = lambda e: e["pid"] in devices  # noqa: E731
    else:  # a CPU: XLA's own threads, not Python's
        source = "XLA's CPU threads"
        keep = lambda e: threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")  # noqa: E731
    spans = [e for e in events if e.get("ph") == "X" and keep(e)]
    times = self_times(spans)
    for name in [n for n in times if IDLE.search(n)]:  # a thread waiting is not work
        del times[name]
    return times, source


def self_times(spans: list[dict]) -> Counter:
    """Microseconds per name, each span less the spans nested in it on its thread (a CPU
    thunk executor's span holds the ops it ran; a GPU stream's kernels do not nest)."""
    times: Counter = Counter()
    by_thread: dict = {}
    for e in spans:
        by_thread.setdefault((e["pid"], e.get("tid")), []).append(e)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
        open_spans: list[tuple[float, str]] = []  # (end, name), outermost first
        for e in thread:
            start, dur = float(e["ts"]), float(e.get("dur", 0.0))
            while open_spans and open_spans[-1][0] <= start:
                open_spans.pop()
            if open_spans:  # nested: not its parent's own time
                times[open_spans[-1][1]] -= dur
            times[e["name"]] += dur
            open_spans.append((start + dur, e["name"]))
    return times


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def summarize(trace_dir: Path, steps: int = 1, top: int = 15) -> dict:
    times, source = op_times(trace_dir)
    busy = sum(times.values())
    kinds: Counter = Counter()
    for name, us in times.items():
        kinds[kind_of(name)] += us
    per_step = lambda us: us / steps / 1e3  # noqa: E731  (ms)
    return {
        "source": source,
        "steps": steps,
        "busy_ms_per_step": per_step(busy),
        "kinds": [
            {"kind": k, "ms_per_step": per_step(us), "share": us / busy if busy else 0.0}
            for k, us in kinds.most_common()
        ],
        "top_ops": [
            {"op": n, "kind": kind_of(n), "ms_per_step": per_step(us), "share": us / busy}
            for n, us in times.most_common(top)
        ],
    }


def show(summary: dict) -> None:
    print(
        f"profile ({summary['source']}): {summary['busy_ms_per_step']:,.1f} ms busy per step "
        f"over {summary['steps']} steps"
    )
    for k in summary["kinds"]:
        print(f"  {k['kind']:<30} {k['ms_per_step']:>9,.2f} ms  {k['share']:6.1%}")
    print("  top ops:")
    for o in summary["top_ops"]:
        print(f"    {o['share']:6.1%} {o['ms_per_step']:>9,.2f} ms  {o['op'][:90]}")


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace_dir", type=Path)
    parser.add_argument("--steps", type=int, default=1, help="steps the trace holds")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    summary = summarize(args.trace_dir, args.steps, args.top)
    print(json.dumps(summary, indent=2)) if args.json else show(summary)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
