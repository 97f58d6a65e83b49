"""Run folders for people and the TUI: list, summarize, launch, stop, resume, evaluate.

Everything here reads the run folder contract (``clip_jax.run_folder``) and starts
training or evaluation as separate processes, so this module (and whoever imports it, the
TUI included) never imports jax, TensorFlow or Textual. A launched run is its own session:
it keeps training when the TUI closes or the SSH connection drops.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clip_jax import storage
from clip_jax.errors import RunFolderError
from clip_jax.run_folder import (
    CHECKPOINTS,
    SPEC,
    STATUS,
    RunFolder,
    RunFolderConflict,
    check_run_folder,
)

ACTIVE = frozenset({"starting", "running"})
ENDED = frozenset({"finished", "interrupted", "failed"})
LAUNCH_LOG = "launch.log"
EXIT_USER_ERROR = 2  # what clipctl exits with on a UserError (clipctl.errors)
LAUNCH_MARK = " launched: "  # in launch.log, before each launch's output


class RunRefused(RunFolderError, ValueError):
    """A launch, resume or stop that would harm a run: the message says why and what to do.

    A RunFolderError (a UserError: clipctl reports it in one line, exit 2) and a
    ValueError for older callers.
    """


# Processes this interpreter launched: polled so that they never linger as zombies
# (a zombie answers kill(pid, 0) and would look alive).
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


# ------------------------------------------------------------------- reading
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
    from clipctl.hosts import read_record

    if storage.is_url(path):
        return []
    record = read_record(path) or {}
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


# ---------------------------------------------------------------- launching
def launch(
    spec_path: str | Path,
    overrides: Sequence[str] = (),
    force: bool = False,
    runs_log_name: str = LAUNCH_LOG,
    hosts: str | None = None,
) -> RunSummary:
    """Start ``clipctl run SPEC OVERRIDES`` as its own session and return its summary.

    The spec is validated here first (a ``clip_jax.spec.SpecError`` propagates, nothing is
    started), so a bad spec is reported at once rather than in a log. Refused with
    RunRefused (a ValueError and a UserError): a folder whose run is still running, or
    that holds a run made from another spec (unless ``force``). The process outlives
    this one; its output is appended to ``<output_dir>/<runs_log_name>``. ``hosts``: a
    ``--hosts`` value (``clipctl.hosts``), checked here; the run starts on every host.
    """
    if hosts:
        from clipctl.hosts import parse_hosts

        parse_hosts(hosts)  # a HostsError (exit 2 in the CLI, a message in the TUI)
    extra = ("--hosts", hosts) if hosts else ()
    return _launch(Path(spec_path), tuple(overrides), force, runs_log_name, None, extra)


def resume(run_dir: str | Path) -> RunSummary:
    """Relaunch a stopped or failed run from its own spec.resolved.toml.

    The same spec on the same folder makes the trainer restore the latest checkpoint
    and continue the step count. Refused with RunRefused (a ValueError) while the run
    is running, when it has already finished, when the folder is not a run, or when it
    was moved away from its spec's run.output_dir.
    """
    path = Path(run_dir)
    _refuse_url(run_dir, "resumed")
    folder = RunFolder(path)
    if not folder.exists():
        raise RunRefused(f"{path} is not a run folder (no {SPEC})")
    current = summarize(path)
    if current.state in ACTIVE:
        raise RunRefused(
            f"run {path} is {current.state} (pid {current.pid}); stop it before resuming it"
        )
    if current.state == "finished":
        raise RunRefused(f"run {path} already finished at step {current.step}; nothing to resume")
    cwd = _working_dir(path, str(_read_spec(folder).get("run", {}).get("output_dir", "")))
    return _launch(folder.spec_path.resolve(), (), False, LAUNCH_LOG, cwd=cwd)


def stop(run_dir: str | Path) -> bool:
    """Ask a running run to stop gracefully (SIGTERM); False when there is nothing to stop.

    The trainer finishes its step, saves a checkpoint and writes state "interrupted",
    so the run can be resumed where it stopped. Only the process recorded in the run's
    status is signalled, and only while it is alive and still the one that wrote it.
    """
    _refuse_url(run_dir, "stopped")
    from clipctl.hosts import stop_hosts

    if stop_hosts(run_dir):  # a multi-host run: its launcher stops every host
        return True
    summary = summarize(run_dir)
    if summary.state not in ACTIVE or summary.pid is None:
        return False
    try:
        os.kill(summary.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def wait_for_state(
    run_dir: str | Path, states: Collection[str], timeout: float = 600.0, poll_s: float = 0.2
) -> RunSummary:
    """Poll until the run's state is one of ``states``; TimeoutError after ``timeout`` s.

    For scripts and tests that act on a run's outcome (``clipctl stop --wait``).
    """
    deadline = time.monotonic() + timeout
    while True:
        summary = summarize(run_dir)
        if summary.state in states:
            return summary
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"run {run_dir} is still {summary.state} after {timeout:g} s "
                f"(waiting for {', '.join(sorted(states))})"
            )
        time.sleep(poll_s)


def evaluate(run_dir: str | Path, timeout: float | None = None) -> dict[str, Any]:
    """Evaluate the run's latest checkpoint in a subprocess and return its metrics.

    A subprocess keeps jax out of the caller (the TUI stays light and responsive).
    Raises a UserError with the command's ``error:`` lines when it reports the user's
    mistake (exit 2: a broken run folder, no checkpoint...), else RuntimeError with the
    end of its error output.
    """
    path = Path(run_dir).resolve()
    try:
        output_dir = str(_read_spec(RunFolder(path)).get("run", {}).get("output_dir", ""))
        cwd = _working_dir(path, output_dir)
    except ValueError:
        cwd = None  # a moved folder: relative data paths resolve from here
    command = [sys.executable, "-m", "clipctl.cli", "eval", str(path), "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL
    )
    if done.returncode == EXIT_USER_ERROR:
        raise RunFolderError(_error_lines(done.stderr) or done.stderr.strip())
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"evaluating {run_dir} failed (exit {done.returncode}): {tail}")
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"evaluating {run_dir} printed no result: {done.stdout!r}") from None


# ------------------------------------------------------------------ helpers
def _refuse_url(run_dir: str | Path, action: str) -> None:
    """A run folder on a URL (gs://) belongs to a process that may be on any machine."""
    if storage.is_url(run_dir):
        raise RunRefused(
            f"{run_dir} is on {storage.path(run_dir).scheme}://: its run cannot be {action} "
            "from here (its process may be on another machine); do it where the run "
            "was launched (Ctrl-C or SIGTERM stops it and saves a checkpoint; rerunning "
            "the same `clipctl run` resumes it)"
        )


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


def _launch(
    spec_path: Path,
    overrides: tuple[str, ...],
    force: bool,
    log_name: str,
    cwd: Path | None,
    options: tuple[str, ...] = (),
) -> RunSummary:
    from clip_jax import spec as spec_lib

    spec = spec_lib.load_spec(spec_path, overrides)
    base = cwd or Path.cwd()
    out = base / spec.run.output_dir
    folder = RunFolder(out)
    current = summarize(out)
    if current.state in ACTIVE:
        raise RunRefused(
            f"{spec.run.output_dir} holds a run that is {current.state} (pid {current.pid}); "
            "stop it first or choose another run.output_dir"
        )
    try:
        check_run_folder(folder, spec, force)
    except RunFolderConflict as exc:
        raise RunRefused(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "clipctl.cli", "run", str(spec_path), *overrides, *options]
    if force:
        command.append("--force")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(out / log_name, "ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n=== {stamp}{LAUNCH_MARK}{shlex.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
            env=env,
        )
    _launched[process.pid] = process
    # The child writes "running" once it has imported the trainer (seconds from now);
    # until then the folder says "starting" with the child's pid, so it can be stopped.
    if RunFolder(out).status().get("pid") != process.pid:
        previous = [r for r in _records(folder) if r.get("split") == "train"]
        folder.write_status(
            "starting",
            pid=process.pid,
            step=int(previous[-1]["step"]) if previous else 0,
            steps=spec.train.steps,
        )
    return summarize(out)


def _reap() -> None:
    for pid, process in list(_launched.items()):
        if process.poll() is not None:
            del _launched[pid]


def _working_dir(run_dir: Path, output_dir: str) -> Path | None:
    """The folder to run from so that the spec's relative run.output_dir is ``run_dir``.

    Relative paths in a spec (output and data folders) are relative to where the run was
    launched; relaunching from anywhere else must start there again.
    """
    here = run_dir.resolve()
    out = Path(os.path.normpath(output_dir)) if output_dir else None
    if out is None:
        raise RunRefused(f"{run_dir}/{SPEC} names no run.output_dir")
    if out.is_absolute():
        if out.resolve() != here:
            raise RunRefused(_moved(run_dir, output_dir))
        return None
    if (Path.cwd() / out).resolve() == here:
        return None
    n = len(out.parts)
    if ".." not in out.parts and here.parts[-n:] == out.parts:
        return Path(*here.parts[:-n])
    raise RunRefused(_moved(run_dir, output_dir))


def _moved(run_dir: Path, output_dir: str) -> str:
    return (
        f"{run_dir} was made for run.output_dir = {output_dir!r}, which is not this folder "
        "(was it moved?); run `clipctl run` on its spec.resolved.toml with "
        "run.output_dir set to the new place and --force"
    )


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
