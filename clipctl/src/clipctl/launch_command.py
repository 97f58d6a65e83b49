"""`clipctl run SPEC --hosts ...`: start one run on every host and watch it to the end.

Everything that can be refused is refused before any host is contacted (exit 2): the
``--hosts`` value, the spec, a missing ``gcloud``/``ssh``/``sbatch``, a run folder that is
running or holds another spec's run. Then this process stays in the foreground as the
run's supervisor: each worker's output goes to ``<run_dir>/hosts/worker-<i>.log`` and to
the console with a ``[worker i]`` prefix; ``hosts.json`` records the plan and this
process's pid, so ``clipctl stop RUN`` (SIGTERM here) or Ctrl-C asks every host to stop
gracefully through its pid file; a host that has not stopped ``CLIPCTL_STOP_GRACE_S``
seconds later (default 180: it saves a checkpoint first) gets SIGKILL. When a worker
fails, the others are stopped and the run is marked failed with that worker's error.
Slurm runs are submitted and left to Slurm.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import click

from clip_jax.errors import UserError
from clipctl import hosts
from clipctl.errors import CommandFailed
from clipctl.spec_args import load

EXIT_INTERRUPTED = 130
EXIT_SSH_FAILED = 255  # ssh's (and gcloud's) own failure: the host's state is unknown
GRACE_ENV = "CLIPCTL_STOP_GRACE_S"
STOP_GRACE_S = 180.0  # a stopping run saves a checkpoint first; then the hosts get SIGKILL
KILL_MARGIN_S = 30.0  # after the SIGKILLs, local ssh/gcloud still running are killed
ABANDON_S = 30.0  # after an error here, how long the started hosts are asked to stop
RETRY_S = 2.0  # a host whose pid file is not written yet is asked again after this


def run_on_hosts(
    spec: str, overrides: tuple[str, ...], hosts_text: str, force: bool, dry_run: bool
) -> None:
    """Launch (or, with ``dry_run``, print) the run on every host of ``hosts_text``."""
    plan = hosts.parse_hosts(hosts_text)
    resolved = load(spec, overrides)
    from clip_jax.spec import to_toml

    spec_toml = to_toml(resolved)
    workdir = os.getcwd()
    if "://" in resolved.run.output_dir:
        raise UserError(
            "--hosts keeps the workers' logs and hosts.json (what `clipctl stop` reads) in "
            "the run folder, so it needs a local or shared (NFS) folder for now, not a URL",
            key="run.output_dir",
        )
    run_dir = Path(resolved.run.output_dir)
    if plan.kind == "slurm":
        _submit_slurm(plan, hosts_text, resolved, spec_toml, workdir, force, dry_run)
        return
    port = hosts.coordinator_port(resolved.distributed.coordinator)
    launch_id = secrets.token_hex(6)
    found = hosts.workers(plan, spec_toml, workdir, launch_id, port, force)
    if dry_run:
        for worker in found:
            click.echo(shlex.join(worker.argv))
        return
    _require(plan.program)
    grace = stop_grace_s()
    if _already_finished(resolved, force):
        return
    Supervisor(run_dir, hosts_text, launch_id, found, resolved.train.steps, grace).run()


def stop_grace_s() -> float:
    """Seconds a stopping host has to save its checkpoint (``CLIPCTL_STOP_GRACE_S``)."""
    text = os.environ.get(GRACE_ENV, "").strip()
    try:
        grace = float(text) if text else STOP_GRACE_S
    except ValueError:
        grace = -1.0
    if not grace >= 0:  # also NaN
        raise UserError(f"{GRACE_ENV}={text!r}: write a number of seconds (e.g. 300)")
    return grace


def _require(program: str) -> None:
    if shutil.which(program) is None:
        hint = {
            "gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk)",
            "ssh": "install an OpenSSH client",
            "sbatch": "run this on a Slurm login node",
        }[program]
        raise hosts.HostsError(f"`{program}` is not on PATH: {hint}")


def _already_finished(resolved: Any, force: bool) -> bool:
    """Refuse a folder that is busy or holds another spec's run; True when this spec's
    run already finished (said on stderr, nothing is started)."""
    from clip_jax.run_folder import RunFolder, check_run_folder, hosts_at_work, read_hosts
    from clipctl import runs

    current = runs.summarize(resolved.run.output_dir)
    # `clipctl resume` and the TUI mark the folder "starting" with this process's pid.
    busy = current.state in runs.ACTIVE and current.pid != os.getpid()
    if busy or hosts_at_work(read_hosts(resolved.run.output_dir)):
        raise runs.RunRefused(
            f"{resolved.run.output_dir} holds a run that is {current.state}; stop it first "
            "(`clipctl stop`) or choose another run.output_dir"
        )
    folder = RunFolder(resolved.run.output_dir)
    check_run_folder(folder, resolved, force)  # a RunFolderConflict: exit 2
    if current.state == "finished" and current.step >= resolved.train.steps:
        click.echo(f"run already finished at step {current.step}", err=True)
        return True
    return False


def _submit_slurm(
    plan: hosts.HostPlan,
    hosts_text: str,
    resolved: Any,
    spec_toml: str,
    workdir: str,
    force: bool,
    dry: bool,
) -> None:
    """Write the resolved spec and an sbatch script into the run folder and submit it."""
    logs = Path(workdir) / resolved.run.output_dir / hosts.HOSTS_DIR
    spec_file, script_file = logs / "spec.toml", logs / "job.sbatch"
    script = hosts.slurm_script(plan, str(spec_file), workdir, str(logs), force)
    argv = hosts.sbatch_argv(str(script_file), str(logs))
    if dry:
        click.echo(script, nl=False)
        click.echo(shlex.join(argv))
        return
    _require("sbatch")
    if _already_finished(resolved, force):
        return
    logs.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(spec_toml)
    script_file.write_text(script)
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise CommandFailed(f"sbatch refused the job: {done.stderr.strip() or done.stdout}")
    job = done.stdout.strip().split(";")[0]
    hosts.write_record(logs.parent, hosts_text, "", [], job_id=job, started=time.time())
    click.echo(
        f"submitted Slurm job {job}; worker logs go to {logs}/worker-<task>.log; "
        f"stop it with `clipctl stop {resolved.run.output_dir}`"
    )


class Supervisor:
    """Starts the workers, copies their output, and stops them all when one must stop."""

    def __init__(
        self,
        run_dir: Path,
        hosts_text: str,
        launch_id: str,
        workers: list,
        steps: int,
        grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.run_dir, self.workers, self.steps, self.grace_s = run_dir, workers, steps, grace_s
        self.record = (hosts_text, launch_id, workers)  # what hosts.json holds
        self.started = time.time()
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        self.tails: list[deque[str]] = [deque(maxlen=40) for _ in workers]
        self.stop_requested = threading.Event()
        self.killed_here = False  # local ssh/gcloud killed: their hosts' state is unknown
        self.console = threading.Lock()

    def run(self) -> None:
        """Supervise until every worker has exited; exit 130 when stopped, raise on failure."""
        from clip_jax.run_folder import RunFolder

        # First: a stop that comes while the record is written must not kill us silently.
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        # A dropped SSH connection to this machine must not orphan the hosts: keep
        # supervising (the logs go on in the run folder) and stay reachable by `clipctl stop`.
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            (self.run_dir / hosts.HOSTS_DIR).mkdir(parents=True, exist_ok=True)
            hosts.write_record(self.run_dir, *self.record, started=self.started)
            folder = RunFolder(self.run_dir)
            folder.write_status("starting", pid=os.getpid(), step=self._step(), steps=self.steps)
            try:
                failed = self._supervise()
            except BaseException:
                self._stop_started()  # never leave a started host running unsupervised
                raise
            finally:
                for proc in self.procs:  # never leave a local ssh/gcloud behind
                    if proc.poll() is None:
                        proc.kill()
                # Ended only when every host's end is known: else `clipctl stop` still
                # reaches the hosts directly.
                if self._remote_state_known():
                    hosts.write_record(
                        self.run_dir, *self.record, started=self.started, ended=time.time()
                    )
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self._finish(folder, failed)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested.set()

    def _remote_state_known(self) -> bool:
        """Whether each host's clipctl is known to have ended (its ssh gave its exit code)."""
        if self.killed_here or len(self.procs) < len(self.workers):
            return False
        return all(p.poll() not in (None, EXIT_SSH_FAILED) for p in self.procs)

    def _supervise(self) -> int | None:
        """Run the loop; the index of the worker that failed first, or None."""
        for index, worker in enumerate(self.workers):
            log = open(self.run_dir / worker.log_name, "ab")  # noqa: SIM115 (the pump closes it)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== {stamp} launched on {worker.host}\n".encode())
            try:
                proc = subprocess.Popen(
                    worker.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches us, not ssh: we stop gracefully
                )
            except BaseException:
                log.close()
                raise
            self.procs.append(proc)
            pump = threading.Thread(target=self._pump, args=(index, proc, log), daemon=True)
            pump.start()
            self.pumps.append(pump)
        failed: int | None = None
        asked: set[int] = set()  # workers whose stop command got through
        stopping_since: float | None = None
        killed = False
        next_try = 0.0
        while any(proc.poll() is None for proc in self.procs):
            if failed is None and stopping_since is None:
                failed = next((i for i, p in enumerate(self.procs) if _failed(p)), None)
            if stopping_since is None and (failed is not None or self.stop_requested.is_set()):
                stopping_since = time.monotonic()
            now = time.monotonic()
            if stopping_since is not None and now >= next_try:
                asked |= self._ask_to_stop([i for i in range(len(self.procs)) if i not in asked])
                next_try = time.monotonic() + RETRY_S
            waited = now - stopping_since if stopping_since is not None else 0.0
            if not killed and waited > self.grace_s:
                hosts.run_all([w.kill_argv for w in self.workers])
                killed = True
            if waited > self.grace_s + KILL_MARGIN_S:  # a host that does not even answer
                self.killed_here = True
                for proc in self.procs:
                    if proc.poll() is None:
                        proc.kill()
            time.sleep(0.2)
        for pump in self.pumps:  # the last lines (a worker's error) reach log and tail
            pump.join(timeout=10)
        if failed is None and not self.stop_requested.is_set():
            failed = next((i for i, p in enumerate(self.procs) if _failed(p)), None)
        return failed

    def _ask_to_stop(self, waiting: list[int]) -> set[int]:
        """Send the stop command to the ``waiting`` workers, all at once; those reached.
        A worker whose ssh is gone is asked too: its trainer may still run."""
        codes = hosts.run_all([self.workers[i].stop_argv for i in waiting])
        return {i for i, code in zip(waiting, codes, strict=True) if code == 0}

    def _stop_started(self) -> None:
        """After an error here: ask the workers already started to stop until each one is
        reached (its pid file may not be written yet) or ABANDON_S have passed."""
        self.killed_here = True  # what the hosts do now is not known here
        asked: set[int] = set()
        deadline = time.monotonic() + ABANDON_S
        while time.monotonic() < deadline:
            waiting = [i for i, p in enumerate(self.procs) if i not in asked and p.poll() is None]
            if not waiting:
                return
            asked |= self._ask_to_stop(waiting)
            time.sleep(RETRY_S / 4)

    def _pump(self, index: int, proc: subprocess.Popen, log: Any) -> None:
        """Copy one worker's output to its log file and the console, line by line."""
        label = self.workers[index].label
        with log:
            for raw in iter(proc.stdout.readline, b""):
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip("\n")
                self.tails[index].append(line)
                with self.console, contextlib.suppress(OSError, ValueError):
                    # gone with a closed terminal: the log file still gets every line
                    sys.stdout.write(f"[worker {label}] {line}\n")
                    sys.stdout.flush()

    def _step(self) -> int:
        from clipctl import runs

        return runs.summarize(self.run_dir).step

    def _finish(self, folder: Any, failed: int | None) -> None:
        """Leave the run folder true, and exit the way `clipctl run` does."""
        status = folder.status()
        ours = status.get("pid") == os.getpid()  # no worker took the run over
        if failed is not None:
            worker, code = self.workers[failed], self.procs[failed].returncode
            reason = _error_of(self.tails[failed])
            error = (
                f"worker {worker.label} ({worker.host}) exited with code {code}: {reason} "
                f"(see {worker.log_name}); the other hosts were stopped"
            )
            folder.write_status("failed", pid=os.getpid(), step=self._step(), error=error)
            if code == 2:  # that host found a mistake in the input (data, paths...)
                raise UserError(error)
            raise CommandFailed(error)
        # Every host stopped (130) though not asked here: preempted, or stopped on the host.
        stopped = any(p.returncode == EXIT_INTERRUPTED for p in self.procs)
        if self.stop_requested.is_set() or stopped:
            if ours or status.get("state") in ("starting", "running"):
                folder.write_status("interrupted", pid=os.getpid(), step=self._step())
            click.echo("stopped on every host; rerun the same command to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)


def _failed(proc: subprocess.Popen) -> bool:
    """Ended in an error: neither done (0) nor stopped gracefully (130)."""
    return proc.poll() is not None and proc.returncode not in (0, EXIT_INTERRUPTED)


def _error_of(tail: deque[str]) -> str:
    """A worker's own ``error:`` lines, else its last line of output."""
    errors = [line[len("error: ") :] for line in tail if line.startswith("error: ")]
    lines = [line for line in tail if line.strip()]
    return "; ".join(errors) or (lines[-1].strip() if lines else "no output")
