"""Reading run folders for people and the TUI: one run at a glance, every run under a root.

Everything here reads the run folder contract (``clip_jax.run_folder``) and never imports
jax, TensorFlow or Textual. ``clipctl.runs`` (launch, stop, resume, evaluate) re-exports it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clip_jax import storage
from clip_jax.run_folder import CHECKPOINTS, SPEC, STATUS, RunFolder, read_hosts

ACTIVE = frozenset({"starting", "running"})
ENDED = frozenset({"finished", "interrupted", "failed"})
LAUNCH_LOG = "launch.log"
LAUNCH_MARK = " launched: "  # in launch.log, before each launch's output

# Processes this interpreter launched (``clipctl.runs.launch``): polled before a run is
# read, so that they never linger as zombies (a zombie answers kill(pid, 0), looks alive).
_launched: dict[int, subprocess.Popen] = {}


@dataclass
class RunSummary:
    """One run folder at a glance: what the runs table and the TUI's runs screen show."""

    path: Path
    name: str
    state: str
    step: int
    steps: int | None
    updated: float | None
    loss: float | None
    learning_rate: float | None
    images_per_s: float | None
    eta_s: float | None
    evaluation: dict[str, Any] | None
    checkpoints: list[int] = field(default_factory=list)
    pid: int | None = None
    error: str | None = None
    # From the last train record: records skipped by reason, the guards' counts.
    skipped: dict[str, int] = field(default_factory=dict)
    guards: dict[str, int] = field(default_factory=dict)
    # A multi-host launch (`clipctl run --hosts`): its hosts, worker 0 (coordinator) first.
    hosts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (the path as a string)."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def summarize(run_dir: str | Path, root: str | Path | None = None) -> RunSummary:
    """Read a run folder into a RunSummary, so callers never parse its files themselves.

    ``name`` is the folder's path relative to ``root`` when given, else its own name. A
    run whose status says starting/running but whose process is gone is "failed".
    """
    _reap()
    path = storage.path(run_dir)  # a local folder or a URL (gs://)
    folder = RunFolder(path)
    status = folder.status()
    state = str(status.get("state", "unknown"))
    pid = status.get("pid") if isinstance(status.get("pid"), int) else None
    error = status.get("error")
    if state == "failed" and not error:  # "running" or "starting", process gone
        error = _launch_error(path) or (
            f"its process (pid {pid}) ended without a word: see {LAUNCH_LOG} and run.log"
        )
    records = _records(folder)
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "validation"]
    last = train[-1] if train else {}
    steps = status.get("steps")
    spec = _read_spec(folder)
    if not isinstance(steps, int):
        steps = spec.get("train", {}).get("steps")
    # status.json says step 0 while a resumed run restores; the metrics know better.
    step = max([_int(status.get("step"))] + [_int(r.get("step")) for r in records])
    images_per_s = _number(last.get("images_per_s"))
    return RunSummary(
        path=path,
        name=_name(path, root),
        state=state,
        step=step,
        steps=steps if isinstance(steps, int) else None,
        updated=_number(status.get("updated")),
        loss=_number(last.get("loss")),
        learning_rate=_number(last.get("learning_rate")),
        images_per_s=images_per_s,
        eta_s=_eta(state, step, steps, images_per_s, spec),
        evaluation=evals[-1] if evals else None,
        checkpoints=_checkpoint_steps(folder),
        pid=pid,
        error=str(error) if error and state == "failed" else None,
        skipped=_counts(last, "skipped/"),
        guards=_counts(last, "guard/"),
        hosts=_hosts(path),
    )


def _hosts(path) -> list[str]:
    """The hosts of a multi-host run, from its hosts.json (none for a one-host run)."""
    if storage.is_url(path):
        return []
    record = read_hosts(path) or {}
    workers = record.get("workers")
    if not isinstance(workers, list):
        return []
    return [str(w.get("host", "?")) for w in workers if isinstance(w, dict)]


def _counts(record: dict[str, Any], prefix: str) -> dict[str, int]:
    """``{name: n}`` for a record's non-zero ``prefix<name>`` numbers."""
    counts = {k[len(prefix) :]: _number(v) for k, v in record.items() if k.startswith(prefix)}
    return {k: int(v) for k, v in counts.items() if v}


def find_runs(root: str | Path = "runs") -> list[RunSummary]:
    """Every run folder under ``root`` (nested too), sorted by name, for the runs list.

    A run folder is one holding spec.resolved.toml or status.json; a run's checkpoints/
    is never searched. A missing root has no runs.
    """
    root = storage.path(root)
    found: list[RunSummary] = []
    for here, dirs, files in storage.walk(root):
        if SPEC in files or STATUS in files:
            found.append(summarize(here, root))
            if CHECKPOINTS in dirs:
                dirs.remove(CHECKPOINTS)
        dirs.sort()
    return sorted(found, key=lambda run: run.name)


def metrics(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The run's metric records (optionally one split), for curves."""
    records = _records(RunFolder(run_dir))
    return [r for r in records if split is None or r.get("split") == split]


def _records(folder: RunFolder) -> list[dict[str, Any]]:
    """The run's metric records that are records: a hand-edited or damaged
    metrics.jsonl (a line that is a number, a list) is not worth a crash of the TUI."""
    try:
        return [r for r in folder.metrics() if isinstance(r, dict)]
    except (OSError, ValueError):  # unreadable, or not text
        return []


def _launch_error(path: Path) -> str:
    """The ``error:`` lines of the latest launch in launch.log: a launched run that found
    a mistake (a glob matching nothing, a missing tokenizer) said so there and exited."""
    try:
        text = (path / LAUNCH_LOG).read_text(errors="replace")
    except OSError:
        return ""
    return _error_lines(text.rpartition(LAUNCH_MARK)[2])


def _error_lines(output: str) -> str:
    """What a clipctl command reported (its ``error: ...`` lines), without the prefix."""
    prefix = "error: "
    return "\n".join(line[len(prefix) :] for line in output.splitlines() if line.startswith(prefix))


def _reap() -> None:
    for pid, process in list(_launched.items()):
        if process.poll() is not None:
            del _launched[pid]


def _read_spec(folder: RunFolder) -> dict[str, Any]:
    try:
        return folder.read_spec()
    except (OSError, ValueError):
        return {}


def _checkpoint_steps(folder: RunFolder) -> list[int]:
    try:
        return sorted(int(p.name) for p in folder.checkpoints.iterdir() if p.name.isdigit())
    except OSError:
        return []


def _eta(
    state: str, step: int, steps: Any, images_per_s: float | None, spec: dict[str, Any]
) -> float | None:
    if state == "finished":
        return 0.0
    batch = spec.get("train", {}).get("batch_size")
    if state not in ACTIVE or not isinstance(steps, int) or not isinstance(batch, int):
        return None
    if not images_per_s or images_per_s <= 0:
        return None
    return max(steps - step, 0) * batch / images_per_s


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _name(path: Path, root: str | Path | None) -> str:
    if root is not None:
        relative = os.path.relpath(path, root)
        if relative != ".":
            return Path(relative).as_posix()
    return path.resolve().name


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS`` for ETAs in tables; "-" when unknown."""
    if seconds is None:
        return "-"
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
