"""Where a multi-host run goes (`clipctl run SPEC --hosts ...`) and the commands that start it.

``--hosts`` names the machines: ``tpu:NAME[@ZONE]`` (every worker of a TPU VM slice,
through ``gcloud compute tpus tpu-vm ssh --worker=all``), ``ssh:HOST1,HOST2,...`` (GPU
nodes over plain SSH; the first host is the coordinator) or ``slurm[:NODES]`` (an sbatch
script submitted to the cluster). This module turns that into argv lists and touches
nothing: ``clipctl.launch_command`` runs them and watches the workers.

What every host needs (the honest assumption, said once): the same working directory
exists on every host (a shared NFS home, or the same checkout on each), ``clipctl`` is on
the hosts' PATH (or ``CLIPCTL_REMOTE`` names it), and ``run.output_dir`` and the data are
shared (NFS or gs://), as orbax's multi-host checkpoints need anyway. The spec itself
travels: the launcher resolves it here (templates, presets, overrides) and sends its
TOML text inside the remote command, so hosts need neither the template nor the
overrides.

Nothing from a spec or an override runs as shell code, whatever the hosts' login shell
(bash, zsh, fish, tcsh...): every remote command is one POSIX ``sh`` script, built with
``shlex.quote`` for ``sh`` itself, and what reaches the login shell is only
``echo <base64> | base64 -d | sh`` (letters, digits, ``+/=|-`` and spaces, which every
shell reads the same way). Locally nothing runs through a shell.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clip_jax import storage
from clip_jax.errors import UserError
from clip_jax.run_folder import HOSTS, hosts_at_work, read_hosts

HOSTS_FILE = HOSTS  # in the run folder: the plan, the launcher's pid, the workers
HOSTS_DIR = "hosts"  # in the run folder: worker-<i>.log, and slurm's script
DEFAULT_PORT = 8476  # the coordinator's port when distributed.coordinator names none
REMOTE_ENV = "CLIPCTL_REMOTE"  # the clipctl command on the hosts (default: clipctl)
KINDS = ("tpu", "ssh", "slurm")
# One argument of a command line may hold at most 128 KiB on Linux (MAX_ARG_STRLEN), here
# and in the host's sshd: a longer remote command is refused before anything starts.
MAX_REMOTE_COMMAND = 120_000
# A host that stops answering is given up after 30 s x 4 (the local ssh then exits 255).
KEEPALIVE = ("-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=4")
COMMAND_TIMEOUT_S = 60.0  # a stop or kill command that takes longer did not get through
_SSH_HOST = re.compile(r"([A-Za-z0-9._-]+@)?([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])")


class HostsError(UserError):
    """A ``--hosts`` value that names no machines we know how to reach."""

    def __init__(self, message: str) -> None:
        super().__init__(message, key="--hosts")


@dataclass(frozen=True)
class HostPlan:
    """Parsed ``--hosts``: the kind of launch and the machines it names."""

    kind: str
    hosts: tuple[str, ...] = ()  # ssh: the hosts, coordinator first
    tpu: str | None = None  # tpu: the TPU VM's name
    zone: str | None = None  # tpu: its zone (gcloud's default zone when None)
    nodes: int | None = None  # slurm: --nodes (the cluster's default when None)

    @property
    def program(self) -> str:
        """The local program the launch needs on PATH."""
        return {"tpu": "gcloud", "ssh": "ssh", "slurm": "sbatch"}[self.kind]


@dataclass
class Worker:
    """One launched process (one host; for a TPU slice, gcloud standing for every worker)."""

    label: str  # "0", "1"... or "all" for gcloud --worker=all
    host: str
    argv: list[str]  # starts the worker (ssh/gcloud ... '<remote command>')
    stop_argv: list[str]  # asks it to stop gracefully (SIGTERM to the remote clipctl)
    kill_argv: list[str] = field(default_factory=list)  # when it does not stop in time

    @property
    def log_name(self) -> str:
        return f"{HOSTS_DIR}/worker-{self.label}.log"


def parse_hosts(text: str) -> HostPlan:
    """``--hosts`` as a HostPlan; a HostsError (exit 2) names what is wrong with it."""
    kind, _, rest = text.strip().partition(":")
    if kind == "tpu":
        name, _, zone = rest.partition("@")
        if not _plain(name) or (zone and not _plain(zone)):
            raise HostsError(f"{text!r}: write tpu:NAME or tpu:NAME@ZONE (e.g. tpu:my-v4-32)")
        return HostPlan("tpu", tpu=name, zone=zone or None)
    if kind == "ssh":
        hosts = tuple(h.strip() for h in rest.split(","))
        if not rest or not all(_plain(h) and _SSH_HOST.fullmatch(h) for h in hosts):
            raise HostsError(
                f"{text!r}: write ssh:HOST1,HOST2,... (the first host coordinates); a host "
                "is HOST or USER@HOST, without a port (set one in ~/.ssh/config)"
            )
        return HostPlan("ssh", hosts=hosts)
    if kind == "slurm":
        if rest and not (rest.isdigit() and int(rest) > 0):
            raise HostsError(f"{text!r}: write slurm, or slurm:NODES with a number of nodes")
        return HostPlan("slurm", nodes=int(rest) if rest else None)
    raise HostsError(
        f"unknown host kind {kind!r} in {text!r}: use tpu:NAME[@ZONE], ssh:HOST1,HOST2,... "
        "or slurm[:NODES]"
    )


def _plain(word: str) -> bool:
    """A host, user@host, TPU or zone name: no spaces, quotes or shell characters, and not
    an option (``-oProxyCommand=...`` must never reach ssh as a host)."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_@[]:")
    return bool(word) and not word.startswith("-") and set(word) <= allowed


def remote_clipctl() -> list[str]:
    """The words that run clipctl on a host: ``CLIPCTL_REMOTE`` (e.g. a venv's
    ``/home/me/venv/bin/clipctl``), split like a shell would, or ``clipctl``."""
    try:
        return shlex.split(os.environ.get(REMOTE_ENV, "")) or ["clipctl"]
    except ValueError as exc:  # an unclosed quote
        raise UserError(f"{REMOTE_ENV}: cannot split it into words ({exc})") from None


def distributed_overrides(plan: HostPlan, index: int, port: int) -> list[str]:
    """How a worker finds its peers: explicit over SSH, JAX's own detection on a TPU
    slice (the TPU metadata) and under Slurm (srun's environment)."""
    if plan.kind != "ssh":
        return ["distributed.mode=auto"]
    coordinator = plan.hosts[0].rpartition("@")[2]  # user@host: jax dials the host
    return [
        "distributed.mode=explicit",
        f"distributed.coordinator={coordinator}:{port}",
        f"distributed.num_processes={len(plan.hosts)}",
        f"distributed.process_id={index}",
    ]


def shell_neutral(script: str) -> str:
    """The one line a login shell gets: ``script`` runs in ``sh``, whatever that shell is."""
    encoded = base64.b64encode(script.encode()).decode()
    return f"echo {encoded} | base64 -d | sh"


def remote_command(
    spec_toml: str, workdir: str, files: str, args: Sequence[str], force: bool = False
) -> str:
    """What a host runs: write the resolved spec (0600), start clipctl and record its pid.

    ``files`` is the host's path prefix for this launch's spec and pid files; ``sh``
    stays clipctl's parent and removes them when it exits, so a stale pid file does not
    outlive the run. ``kill -TERM $(cat PIDFILE)`` reaches the trainer, which saves a
    checkpoint and exits 130 (``signal_command``).
    """
    q = shlex.quote
    spec, pid = files + ".toml", files + ".pid"
    command = ["env", "PYTHONUNBUFFERED=1", *remote_clipctl(), "run", spec, *args]
    if force:
        command.append("--force")
    cleanup = f"rm -f {q(spec)} {q(pid)} {q(pid + '.stopping')}"
    script = "\n".join(
        [
            f"cd {q(workdir)} || exit 2",
            "umask 077",  # the spec (its tracker settings...) is for this user only
            f"trap {q(cleanup)} EXIT",
            f"printf %s {q(spec_toml)} > {q(spec)} || exit 2",
            f"{shlex.join(command)} < /dev/null &",
            f"echo $! > {q(pid)}",
            "wait $!",
            "",
        ]
    )
    line = shell_neutral(script)
    if len(line) > MAX_REMOTE_COMMAND:
        raise UserError(
            f"the resolved spec is too long to send to the hosts in one command "
            f"({len(spec_toml)} characters; about {MAX_REMOTE_COMMAND * 3 // 4} fit): "
            "shorten it (long lists belong in files the spec names)"
        )
    return line


def signal_command(files: str, signal_name: str) -> str:
    """What signals the clipctl a host started, through its pid file.

    Only a process whose command line names this launch's spec file is signalled: a pid
    file left behind never reaches an unrelated process that reused the pid. SIGTERM is
    sent once per host: the pid file is renamed as it is used, so asking again (gcloud
    reaches every worker, and some may not have started yet) never hits a trainer a
    second time while it saves its checkpoint. A host caught between writing its spec and
    its pid file is waited for. SIGKILL takes either name.
    """
    q = shlex.quote
    spec, pid, sent = q(files + ".toml"), q(files + ".pid"), q(files + ".pid.stopping")
    ours = f'grep -qaF -- {spec} "/proc/$p/cmdline" 2>/dev/null'
    if signal_name == "KILL":
        script = (
            f'for f in {pid} {sent}; do test -f "$f" && p=$(cat "$f") && {ours} '
            '&& kill -KILL "$p"; done; true'
        )
    else:
        # A host that has its spec but no pid file yet is starting its clipctl (the pid
        # is written just after): wait for it, up to 5 s, rather than miss it.
        starting = f"[ -f {spec} ] && [ ! -f {pid} ] && [ ! -f {sent} ]"
        script = (
            f'i=0; while {starting} && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i+1)); done; '
            f"test -f {pid} && p=$(cat {pid}) && {ours} && mv -f {pid} {sent} "
            f'&& kill -{signal_name} "$p"'
        )
    return shell_neutral(script + "\n")


def ssh_argv(host: str, command: str) -> list[str]:
    """``ssh`` that never prompts (BatchMode), gives up on a silent host, runs ``command``."""
    return ["ssh", "-o", "BatchMode=yes", *KEEPALIVE, host, command]


def gcloud_argv(plan: HostPlan, command: str) -> list[str]:
    """``gcloud ... tpu-vm ssh --worker=all``: the same command on every worker, with no
    prompt (``--quiet``) and the same keep-alive as plain ssh."""
    zone = ["--zone", plan.zone] if plan.zone else []
    keepalive = [f"--ssh-flag={KEEPALIVE[i]} {KEEPALIVE[i + 1]}" for i in (0, 2)]
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        plan.tpu or "",
        *zone,
        "--worker=all",
        "--quiet",
        *keepalive,
        "--command",
        command,
    ]


def worker_files(plan: HostPlan, launch_id: str) -> list[tuple[str, str, str]]:
    """(label, host, path prefix of its spec and pid files) for each tpu or ssh worker."""
    if plan.kind == "tpu":  # one name: each TPU VM worker is its own machine
        return [("all", plan.tpu or "", f"/tmp/clipctl-{launch_id}")]
    # one per host: hosts may be one machine (the tests' 127.0.0.1 and localhost)
    return [(str(i), host, f"/tmp/clipctl-{launch_id}-w{i}") for i, host in enumerate(plan.hosts)]


def reach(plan: HostPlan, host: str, command: str) -> list[str]:
    """The argv that runs a remote ``command`` on ``host`` (for tpu: on every worker)."""
    return gcloud_argv(plan, command) if plan.kind == "tpu" else ssh_argv(host, command)


def workers(
    plan: HostPlan, spec_toml: str, workdir: str, launch_id: str, port: int, force: bool
) -> list[Worker]:
    """The processes that start a tpu or ssh launch (slurm: ``slurm_script``)."""
    found = []
    for index, (label, host, files) in enumerate(worker_files(plan, launch_id)):
        args = distributed_overrides(plan, index, port)
        command = remote_command(spec_toml, workdir, files, args, force)
        stop, kill = (reach(plan, host, signal_command(files, s)) for s in ("TERM", "KILL"))
        found.append(Worker(label, host, reach(plan, host, command), stop, kill))
    return found


def sbatch_argv(script: str, logs: str) -> list[str]:
    """``sbatch`` printing only the job id; the batch step's own output goes to ``logs``."""
    return ["sbatch", "--parsable", f"--output={logs}/sbatch.log", script]


def slurm_script(
    plan: HostPlan, spec_file: str, workdir: str, logs: str, force: bool = False
) -> str:
    """The sbatch script: one task per node, each ``clipctl run`` with JAX reading its
    peers from srun's environment (``distributed.mode=auto``). Slurm clusters share a
    filesystem, so the resolved spec is a file in the run folder (``spec_file``)."""
    q = shlex.quote
    nodes = [f"#SBATCH --nodes={plan.nodes}"] if plan.nodes else []
    command = [*remote_clipctl(), "run", spec_file, *distributed_overrides(plan, 0, 0)]
    if force:
        command.append("--force")
    return "\n".join(
        [
            "#!/bin/bash",
            "#SBATCH --job-name=clipctl",
            *nodes,
            "#SBATCH --ntasks-per-node=1",
            "set -eu",
            f"cd {q(workdir)}",
            "export PYTHONUNBUFFERED=1",
            f"exec srun --kill-on-bad-exit=1 --output={q(logs + '/worker-%t.log')} "
            + shlex.join(command),
            "",
        ]
    )


def coordinator_port(coordinator: str | None) -> int:
    """The port of the spec's distributed.coordinator (``host:port``), else DEFAULT_PORT."""
    port = (coordinator or "").rpartition(":")[2]
    return int(port) if port.isdigit() else DEFAULT_PORT


# ------------------------------------------------------------- running short commands
def quiet_run(argv: list[str], timeout: float = COMMAND_TIMEOUT_S) -> int:
    """Run a short stop/kill command; its exit code (-1 when it could not run in time)."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return -1
    return done.returncode


def run_all(commands: Sequence[list[str]]) -> list[int]:
    """``quiet_run`` every command at once (one slow host does not delay the others)."""
    if not commands:
        return []
    with ThreadPoolExecutor(max_workers=min(len(commands), 32)) as pool:
        return list(pool.map(quiet_run, commands))


# ------------------------------------------------------------- the run folder's record
def write_record(
    run_dir: Path, hosts_text: str, launch_id: str, found: list[Worker], **fields: Any
) -> None:
    """``hosts.json``: what `clipctl stop` and the runs screen need to reach every host
    (read back by ``clip_jax.run_folder.read_hosts``)."""
    import json

    record = {
        "hosts": hosts_text,
        "launch_id": launch_id,
        "launcher_pid": os.getpid(),
        "workers": [{"label": w.label, "host": w.host, "log": w.log_name} for w in found],
        **fields,
    }
    storage.write_atomic(storage.path(run_dir) / HOSTS_FILE, json.dumps(record, indent=2) + "\n")


def stop_hosts(run_dir: str | Path) -> bool:
    """Stop every host of a multi-host run; False when it is not one or has ended.

    The launcher supervising the workers gets SIGTERM and asks each host to stop (its
    pid file), so the trainers save one checkpoint together. Where the launcher is gone
    (killed), the hosts are asked directly, all at once. A Slurm job is signalled through
    ``scancel`` (srun passes SIGTERM on to every task). Nothing read from hosts.json
    runs as a command: the plan is parsed again and the commands are rebuilt.
    """
    record = read_hosts(run_dir)
    if record is None or record.get("ended"):
        return False
    try:
        plan = parse_hosts(str(record.get("hosts", "")))
    except HostsError:
        return False
    if plan.kind == "slurm":
        if not hosts_at_work(record):  # the job is over: nothing to cancel
            return False
        return quiet_run(["scancel", "--signal=TERM", str(record["job_id"])]) == 0
    if hosts_at_work(record):
        try:
            os.kill(record["launcher_pid"], signal.SIGTERM)
            return True
        except ProcessLookupError:
            pass
    launch_id = str(record.get("launch_id", ""))
    if not re.fullmatch(r"[0-9a-f]{12}", launch_id):
        return False
    commands = [
        reach(plan, host, signal_command(files, "TERM"))
        for _, host, files in worker_files(plan, launch_id)
    ]
    return any(code == 0 for code in run_all(commands))


def on_tpu_vm(dev: str | Path = "/dev", environ: dict[str, str] | None = None) -> bool:
    """Whether this machine is a Cloud TPU VM (for the TUI to offer ``--hosts tpu:``).

    Looks only at local signs, never the network: the TPU runtime's environment
    (``TPU_ACCELERATOR_TYPE``, ``TPU_WORKER_ID``) or the TPU device files (``/dev/accel*``
    on v2-v4, ``/dev/vfio/<n>`` on v5 and later).
    """
    env = os.environ if environ is None else environ
    if env.get("TPU_ACCELERATOR_TYPE") or env.get("TPU_WORKER_ID"):
        return True
    dev = Path(dev)
    if any(dev.glob("accel[0-9]*")):
        return True
    return any(p.name.isdigit() for p in (dev / "vfio").glob("*"))
