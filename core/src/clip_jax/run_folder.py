"""The run folder: the contract between the trainer, the CLI, the TUI and the tests.

    spec.resolved.toml   what actually ran
    metrics.jsonl        one JSON object per line: {"step", "split", ...}
    status.json          {"state": starting|running|finished|interrupted|failed, "step", "steps",
                          "pid", "error" (failed only)}: the trainer leaves it true on every
                          exit (clip_jax.train.events.reported)
    checkpoints/         orbax CheckpointManager directory
    tokenizer.json       the run's tokenizer
    run.log              human log
    hosts.json           multi-host runs only: the hosts, the launcher's pid (clipctl.hosts)

Reading a run folder never imports jax, nor TensorFlow when the folder is local.

``run.output_dir`` may be a URL (``gs://bucket/runs/x``): the files go through
``clip_jax.storage``. There, appends (metrics.jsonl, run.log) and "running" statuses are
written when one comes ``flush_s`` seconds or more after the last write, at every
checkpoint and evaluation (``train.events.RunFolderWriter``), and when the process
exits normally; the state changes (finished, failed...) are written at once, after the
records before them. So a run killed outright loses at most the records after its last
checkpoint, which a resume drops anyway (``truncate_metrics``). A store error on any
of these writes is a warning and is tried again; the process that trains owns the files
(another's appends to a URL file are overwritten: ``storage.Appender``). Liveness of a
URL run cannot be checked from here: its status is as written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clip_jax import storage
from clip_jax.errors import UserError
from clip_jax.storage import StoragePath

SPEC = "spec.resolved.toml"
METRICS = "metrics.jsonl"
STATUS = "status.json"
CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer.json"
LOG = "run.log"
HOSTS = "hosts.json"  # a multi-host launch's plan and launcher (clipctl.hosts)


class RunFolder:
    """``writable=False`` (every process but the first of a multi-process run) reads only."""

    def __init__(
        self, path: str | os.PathLike, writable: bool = True, flush_s: float = storage.FLUSH_S
    ):
        self.path = storage.path(path)
        self.writable = writable
        self.remote = isinstance(self.path, storage.UrlPath)
        self.flush_s = flush_s
        self._metrics = storage.Appender(self.path / METRICS, flush_s)
        self._log = storage.Appender(self.path / LOG, flush_s)
        self._pending_status: str | None = None  # a "running" status not yet written
        self._status_written = float("-inf")

    @property
    def spec_path(self) -> StoragePath:
        return self.path / SPEC

    @property
    def checkpoints(self) -> StoragePath:
        return self.path / CHECKPOINTS

    @property
    def tokenizer(self) -> StoragePath:
        return self.path / TOKENIZER

    @property
    def log_path(self) -> StoragePath:
        return self.path / LOG

    def exists(self) -> bool:
        return self.spec_path.exists()

    def read_spec(self) -> dict[str, Any]:
        return tomllib.loads(self.spec_path.read_text())

    def write_spec(self, text: str) -> None:
        if not self.writable:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        storage.write_atomic(self.spec_path, text)

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> Iterator[dict[str, Any]]:
        self._metrics.flush()  # this process reads what it appended
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
        """Append one record. On a URL only the process that trains may: another
        process's records there are overwritten by its next rewrite (``storage.Appender``)."""
        if not self.writable:
            return
        self._metrics.append(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop what an interrupted run logged after its last checkpoint."""
        if not self.writable:
            return
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        storage.write_atomic(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        self._metrics.reset()

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
        if (
            status.get("state") in ("running", "starting")
            and not self.remote  # a URL run's process may be on another machine
            and not owns_run(status.get("pid"), status.get("updated"))
            and not self._hosts_at_work()
        ):
            status["state"] = "failed"  # the process died without saying so
        return status

    def _hosts_at_work(self) -> bool:
        """Whether a multi-host launch still runs this run: its trainers' pids are then on
        other machines and say nothing here (``hosts_at_work``)."""
        return hosts_at_work(read_hosts(self.path))

    def write_status(self, state: str, pid: int | None = None, **fields: Any) -> None:
        """Record the run's state; ``pid`` is the process that owns the run (default: this one)."""
        if not self.writable:
            return
        record = {"state": state, "pid": pid or os.getpid(), "updated": time.time(), **fields}
        text = json.dumps(record) + "\n"
        if self.remote and state == "running":
            self._pending_status = text
            if time.monotonic() - self._status_written >= self.flush_s:
                self.flush_or_warn()
            return
        self._pending_status = None  # superseded
        self.flush()  # the records before a state change are there when it is read
        storage.write_atomic(self.path / STATUS, text)

    def log(self, line: str) -> None:
        if not self.writable:
            return
        self._log.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def flush(self) -> None:
        """Write what waits to be written (on a URL; a local folder has nothing waiting);
        raises OSError if the store refuses, with nothing lost from what waits."""
        self._metrics.flush()
        self._log.flush()
        if self._pending_status is not None:
            storage.write_atomic(self.path / STATUS, self._pending_status)
            self._pending_status = None
            self._status_written = time.monotonic()

    def flush_or_warn(self) -> None:
        """``flush()`` for a run that must go on: a store error is one warning
        (``storage.Appender.flush_or_warn``), what waits keeps waiting, and the next
        timed try comes ``flush_s`` later."""
        self._status_written = time.monotonic()
        if not (self._metrics.flush_or_warn() and self._log.flush_or_warn()):
            return  # warned; the status waits for the records before it
        try:
            self.flush()
        except OSError as exc:
            logging.getLogger(__name__).warning(
                "could not write %s (%s); trying again in %gs",
                self.path / STATUS,
                exc,
                self.flush_s,
            )


def read_hosts(path: str | os.PathLike) -> dict[str, Any] | None:
    """A multi-host launch's ``hosts.json`` (None: a one-host run, or unreadable)."""
    try:
        record = json.loads((storage.path(path) / HOSTS).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def hosts_at_work(record: dict[str, Any] | None) -> bool:
    """Whether the multi-host launch of ``record`` (``read_hosts``) is still at work: the
    one answer `clipctl stop`, relaunches and the runs list share.

    A Slurm job is at work while ``squeue`` lists it; a tpu/ssh launch while its launcher
    (``clipctl run --hosts``, on this machine) is the process that wrote the record.
    """
    if record is None or record.get("ended"):
        return False
    job = str(record.get("job_id") or "")
    if job:
        return job.isdigit() and _slurm_job_alive(job)
    return owns_run(record.get("launcher_pid"), record.get("started"))


def _slurm_job_alive(job: str) -> bool:
    """Whether Slurm still has ``job`` (pending, running, completing...). Where squeue
    cannot answer (not installed here, too slow, slurmctld down) the job counts as alive:
    a run is never declared dead on no evidence."""
    import subprocess

    try:
        done = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return True
    if done.returncode != 0:  # a job purged from squeue is an "invalid job id"
        return "invalid job id" not in done.stderr.lower()
    return bool(done.stdout.strip())


def _pid_exists(pid: Any) -> bool:
    """Whether a process ``pid`` exists on this machine (one we may not signal counts)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def owns_run(pid: int | None, updated: Any) -> bool:
    """Whether ``pid`` is alive and is the process that wrote the status at ``updated``.

    A pid can be reused by an unrelated process after the run died; one that started
    after the status was written is not the run's (Linux /proc; elsewhere kill(pid, 0)).
    """
    if not _pid_exists(pid):
        return False
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
    # Where the processes run is not what the run is: every process of a multi-host run
    # has its own process_id, and a run may resume on another topology.
    changed = [key for key in changed if not key.startswith("distributed.")]
    # Nor is what watches it: a tracker can be added to a run when it resumes.
    changed = [key for key in changed if key.split(".")[0] != "logging"]
    if changed:
        raise RunFolderConflict(
            f"{folder.path} holds a run made from another spec (differs in: "
            f"{', '.join(changed)}). Choose another run.output_dir, or pass --force to "
            "continue that run with this spec."
        )
