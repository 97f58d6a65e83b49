"""bench/profile_summary.py reads a Perfetto trace: nested spans count once, waits not."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from profile_summary import summarize  # noqa: E402


def _write_trace(folder: Path, process: str, spans: list[tuple[int, str, float, float]]) -> None:
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": process}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "tf_XLAEigen/1"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:python"}},
    ]
    events = [
        {"ph": "X", "pid": 1, "tid": t, "name": n, "ts": ts, "dur": d} for t, n, ts, d in spans
    ]
    events.append({"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction", "ts": 0, "dur": 999})
    target = folder / "plugins" / "profile" / "run"
    target.mkdir(parents=True)
    with gzip.open(target / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_a_cpu_trace_counts_each_ops_own_time_and_no_waiting(tmp_path):
    _write_trace(
        tmp_path,
        "/host:CPU",
        [
            (7, "ThunkExecutor::Execute", 0, 100),  # holds the two ops below
            (7, "ynn_fusion.3", 10, 50),
            (7, "transpose_fusion.1", 70, 20),
            (7, "ThunkExecutor::Execute (wait for completion)", 100, 400),
        ],
    )
    summary = summarize(tmp_path, steps=2)
    assert summary["source"] == "XLA's CPU threads"
    assert summary["busy_ms_per_step"] == (100 / 2) / 1e3
    own = {o["op"]: o["ms_per_step"] * 2e3 for o in summary["top_ops"]}
    assert own == {"ynn_fusion.3": 50, "transpose_fusion.1": 20, "ThunkExecutor::Execute": 30}


def test_a_device_trace_sums_its_kernels_by_kind(tmp_path):
    _write_trace(
        tmp_path,
        "/device:GPU:0",
        [
            (7, "nvjet_tst_128x256_64x4_bf16", 0, 60),
            (8, "cudnn_generated_fort_native_sdpa_sm90", 0, 25),  # another stream, overlapping
            (7, "loop_add_fusion", 60, 15),
        ],
    )
    kinds = {k["kind"]: k["share"] for k in summarize(tmp_path)["kinds"]}
    assert kinds == {
        "matrix products": 0.6,
        "attention (fused)": 0.25,
        "other fusions (elementwise)": 0.15,
    }
