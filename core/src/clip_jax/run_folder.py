"""The run folder: the contract between the trainer, the CLI, the TUI and the tests.

    spec.resolved.toml   what actually ran
    metrics.jsonl        one JSON object per line: {"step", "split", ...}
    status.json          {"state": starting|running|finished|interrupted|failed, "step", "steps",
                          "pid", "error" (failed only)}: the trainer leaves it true on every
                          exit (clip_jax.train.events.reported)
    checkpoints/         orbax CheckpointManager directory
    tokenizer.json       the run's tokenizer
    run.log              human log

Reading a run folder never imports jax.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clip_jax.errors import UserError

SPEC = "spec.resolved.toml"
METRICS = "metrics.jsonl"
STATUS = "status.json"
CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer.json"
LOG = "run.log"


class RunFolder:
    """``writable=False`` (every process but the first of a multi-process run) reads only."""

    def __init__(self, path: str | Path, writable: bool = True):
        self.path = Path(path)
        self.writable = writable

    @property
    def spec_path(self) -> Path:
        return self.path / SPEC

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    def exists(self) -> bool:
        return self.spec_path.exists()

    def read_spec(self) -> dict[str, Any]:
        return tomllib.loads(self.spec_path.read_text())

    def write_spec(self, text: str) -> None:
        if not self.writable:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.spec_path, text)

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> Iterator[dict[str, Any]]:
        try:
            # A damaged file stays readable: undecodable bytes spoil only their line.
            lines = (self.path / METRICS).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash

    def append_metrics(self, record: dict[str, Any]) -> None:
        if not self.writable:
            return
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop what an interrupted run logged after its last checkpoint."""
        if not self.writable:
            return
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        _atomic_write(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in kept))

    def last_eval(self) -> dict[str, Any] | None:
        evals = [r for r in self.metrics() if r.get("split") == "validation"]
        return evals[-1] if evals else None

    def finished_result(self, spec_text: str, steps: int) -> dict[str, Any] | None:
        """The final evaluation if this folder holds *this* spec's finished run, else None."""
        if self.status().get("state") != "finished" or not self.exists():
            return None
        if self.spec_path.read_text() != spec_text:
            return None
        final = self.last_eval()
        return final if final is not None and final.get("step") == steps else None

    # ------------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        try:
            status = json.loads((self.path / STATUS).read_text())
        except (OSError, ValueError):
            status = None
        if not isinstance(status, dict):  # missing, or not what the trainer writes
            return {"state": "new" if not self.exists() else "unknown"}
        if status.get("state") in ("running", "starting") and not owns_run(
            status.get("pid"), status.get("updated")
        ):
            status["state"] = "failed"  # the process died without saying so
        return status

    def write_status(self, state: str, pid: int | None = None, **fields: Any) -> None:
        """Record the run's state; ``pid`` is the process that owns the run (default: this one)."""
        if not self.writable:
            return
        record = {"state": state, "pid": pid or os.getpid(), "updated": time.time(), **fields}
        _atomic_write(self.path / STATUS, json.dumps(record) + "\n")

    def log(self, line: str) -> None:
        if not self.writable:
            return
        with open(self.log_path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def owns_run(pid: int | None, updated: Any) -> bool:
    """Whether ``pid`` is alive and is the process that wrote the status at ``updated``.

    A pid can be reused by an unrelated process after the run died; one that started
    after the status was written is not the run's (Linux /proc; elsewhere kill(pid, 0)).
    """
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started, zombie = _process_start(pid)
    if zombie:
        return False
    return not (started is not None and isinstance(updated, int | float) and started > updated + 5)


def _process_start(pid: int) -> tuple[float | None, bool]:
    """(start time as a Unix time, is a zombie) from /proc; (None, False) when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None, False
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        ticks = int(fields[19])  # field 22 of stat; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None, fields[:1] == ["Z"]
    return boot + ticks / os.sysconf("SC_CLK_TCK"), fields[0] == "Z"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # writers never share a temp file
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFolderConflict(UserError):
    """The output folder holds a run made from another spec."""


def check_run_folder(folder: RunFolder, spec: Any, force: bool) -> None:
    """Refuse to put a run made from ``spec`` into a folder that holds another spec's run."""
    if not folder.exists() or force:
        return
    from clip_jax import spec as spec_lib

    stored = folder.read_spec()
    # Compare resolved specs: options added since the run was made take their defaults.
    with contextlib.suppress(spec_lib.SpecError):
        stored = spec_lib.to_dict(spec_lib.validate(stored, pretrained=False))
    changed = spec_lib.diff(stored, spec_lib.to_dict(spec))
    if changed:
        raise RunFolderConflict(
            f"{folder.path} holds a run made from another spec (differs in: "
            f"{', '.join(changed)}). Choose another run.output_dir, or pass --force to "
            "continue that run with this spec."
        )
