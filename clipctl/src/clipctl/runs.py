"""Run folders for people and the TUI: launch, stop, resume, evaluate (and, re-exported
from ``clipctl.run_summary``, list and summarize).

Training and evaluation start as separate processes, so this module (and whoever imports
it, the TUI included) never imports jax, TensorFlow or Textual. A launched run is its own
session: it keeps training when the TUI closes or the SSH connection drops.
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
from pathlib import Path
from typing import Any

from clip_jax import storage
from clip_jax.errors import RunFolderError
from clip_jax.run_folder import (
    SPEC,
    RunFolder,
    RunFolderConflict,
    check_run_folder,
    hosts_at_work,
    read_hosts,
)
from clipctl.run_summary import (  # noqa: F401 (the reading half of this module's API)
    ACTIVE,
    ENDED,
    LAUNCH_LOG,
    LAUNCH_MARK,
    RunSummary,
    _error_lines,
    _launch_error,
    _launched,
    _read_spec,
    _records,
    find_runs,
    format_duration,
    metrics,
    summarize,
)

EXIT_USER_ERROR = 2  # what clipctl exits with on a UserError (clipctl.errors)


class RunRefused(RunFolderError, ValueError):
    """A launch, resume or stop that would harm a run: the message says why and what to do.

    A RunFolderError (a UserError: clipctl reports it in one line, exit 2) and a
    ValueError for older callers.
    """


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
    was moved away from its spec's run.output_dir. A multi-host run (its hosts.json) is
    relaunched on the same hosts (``--hosts``): its spec alone names one process of it.
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
    return _launch(folder.spec_path.resolve(), (), False, LAUNCH_LOG, cwd, _same_hosts(path))


def _same_hosts(path: Path) -> tuple[str, ...]:
    """``("--hosts", VALUE)`` to resume a multi-host run where it ran; () for one host."""
    from clipctl.hosts import parse_hosts

    record = read_hosts(path)
    if record is None:
        return ()
    if hosts_at_work(record):
        raise RunRefused(f"run {path} is still at work on {record.get('hosts')}; stop it first")
    hosts_text = str(record.get("hosts", ""))
    parse_hosts(hosts_text)  # a damaged hosts.json: a HostsError names it
    return ("--hosts", hosts_text)


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
