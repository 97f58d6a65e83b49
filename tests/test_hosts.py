"""`--hosts` without launching: parsing, the remote commands and what each shell makes of
them, the stop and kill commands, and how a run folder tells a multi-host run is at work.

The remote commands run here through real `bash`, `sh` (dash) and `zsh`/`fish` where
installed, so what the quoting protects against would really happen.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip_jax.errors import UserError
from clip_jax.run_folder import RunFolder, hosts_at_work, read_hosts
from clipctl import hosts
from tests.fake_cloud.harness import FAKES, HOSTILE, NEUTRAL, QUICKSTART

SHELLS = [s for s in ("bash", "sh", "zsh", "fish", "tcsh") if shutil.which(s)]


# ---------------------------------------------------------------- parsing, unit
@pytest.mark.parametrize(
    ("text", "plan"),
    [
        ("tpu:my-v4", hosts.HostPlan("tpu", tpu="my-v4")),
        ("tpu:my-v4@us-central2-b", hosts.HostPlan("tpu", tpu="my-v4", zone="us-central2-b")),
        ("ssh:a,me@b.lan", hosts.HostPlan("ssh", hosts=("a", "me@b.lan"))),
        ("slurm", hosts.HostPlan("slurm")),
        ("slurm:4", hosts.HostPlan("slurm", nodes=4)),
    ],
)
def test_parse_hosts(text, plan):
    assert hosts.parse_hosts(text) == plan


@pytest.mark.parametrize(
    "text",
    ["k8s:x", "tpu:", "tpu:a b", "ssh:", "ssh:a,,b", "ssh:-oProxyCommand=touch", "slurm:0",
     "ssh:a;b", "gpu", "ssh:gpu0:22", "ssh:me@gpu0:2222,gpu1"],
)  # fmt: skip
def test_bad_hosts_are_user_errors_naming_the_option(text):
    with pytest.raises(UserError) as caught:
        hosts.parse_hosts(text)
    assert caught.value.key == "--hosts"


def test_ssh_workers_find_the_first_host():
    plan = hosts.parse_hosts("ssh:me@gpu0,gpu1")
    assert hosts.distributed_overrides(plan, 1, 1234) == [
        "distributed.mode=explicit",
        "distributed.coordinator=gpu0:1234",
        "distributed.num_processes=2",
        "distributed.process_id=1",
    ]
    assert hosts.distributed_overrides(hosts.parse_hosts("tpu:t"), 0, 1) == [
        "distributed.mode=auto"
    ]
    assert hosts.coordinator_port("10.0.0.1:9999") == 9999
    assert hosts.coordinator_port(None) == hosts.DEFAULT_PORT


def test_an_ssh_host_may_be_an_ipv6_literal():
    assert hosts.parse_hosts("ssh:[::1],me@[fe80::1]").hosts == ("[::1]", "me@[fe80::1]")


def test_a_malformed_clipctl_remote_is_a_user_error(monkeypatch):
    monkeypatch.setenv(hosts.REMOTE_ENV, "/opt/my venv/clipctl'")
    with pytest.raises(UserError, match="CLIPCTL_REMOTE: cannot split"):
        hosts.remote_clipctl()


# ------------------------------------------------------- the commands, in real shells
@pytest.mark.parametrize("shell", SHELLS)
def test_remote_command_survives_every_login_shell_word_for_word(shell, tmp_path, monkeypatch):
    """Whatever the spec holds, the host's shell writes it back byte for byte (mode 0600),
    and the spec and pid files are gone when the worker ends."""
    monkeypatch.setenv(hosts.REMOTE_ENV, f"{sys.executable} {FAKES / 'worker.py'}")
    monkeypatch.setenv("FAKE_WORKER_DIR", str(tmp_path))
    toml = f'[run]\nname = "{HOSTILE}"\n'
    files = str(tmp_path / "spec it's")
    line = hosts.remote_command(toml, str(tmp_path), files, [HOSTILE])
    assert NEUTRAL.fullmatch(line)  # only words every shell reads the same way
    done = subprocess.run([shell, "-c", line], cwd=tmp_path, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("worker-*.json")]
    assert record["spec"] == toml and record["argv"][-1] == HOSTILE
    assert record["mode"] == 0o600
    assert not list(tmp_path.glob("PWNED*"))
    assert not list(tmp_path.glob("spec it's*"))  # cleaned up on exit


def test_a_spec_too_long_for_one_command_is_refused_clearly():
    with pytest.raises(UserError, match="too long to send to the hosts"):
        hosts.remote_command("x" * hosts.MAX_REMOTE_COMMAND, "/w", "/tmp/f", [])


def _holder(files: str, trap_term: bool = True) -> subprocess.Popen:
    """A stand-in for a host's clipctl: its command line names the spec file, and its pid
    is in the pid file, as remote_command leaves them."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code if trap_term else "", files + ".toml"])
    Path(files + ".pid").write_text(f"{proc.pid}\n")
    return proc


def test_a_host_is_sent_sigterm_once_and_sigkill_after(tmp_path):
    files = str(tmp_path / "w0")
    proc = _holder(files)
    time.sleep(0.2)  # the interpreter has its command line
    term = hosts.signal_command(files, "TERM")
    assert subprocess.run(["sh", "-c", term]).returncode == 0
    assert subprocess.run(["sh", "-c", term]).returncode != 0  # asked once only
    assert proc.poll() is None  # it ignores SIGTERM...
    subprocess.run(["sh", "-c", hosts.signal_command(files, "KILL")], check=True)
    assert proc.wait(timeout=10) == -signal.SIGKILL  # ...but not SIGKILL


def test_a_stop_waits_for_a_host_that_is_still_writing_its_pid_file(tmp_path):
    """The spec is there, the trainer is starting, its pid file comes a moment later."""
    files = str(tmp_path / "w0")
    Path(files + ".toml").write_text("[run]\n")
    stop = subprocess.Popen(["sh", "-c", hosts.signal_command(files, "TERM")])
    time.sleep(0.5)
    trainer = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", files + ".toml"]
    )
    time.sleep(0.2)  # its command line names the spec
    Path(files + ".pid").write_text(f"{trainer.pid}\n")
    try:
        assert stop.wait(timeout=10) == 0
        assert trainer.wait(timeout=10) == -signal.SIGTERM
    finally:
        trainer.kill()
    # a host whose run is over (no spec, no pid file) is not waited for
    started = time.monotonic()
    Path(files + ".toml").unlink()
    Path(files + ".pid.stopping").unlink()
    assert subprocess.run(["sh", "-c", hosts.signal_command(files, "TERM")]).returncode != 0
    assert time.monotonic() - started < 1.0


def test_a_stale_pid_file_never_signals_another_process(tmp_path):
    """The pid in a pid file left behind now belongs to an unrelated process."""
    files = str(tmp_path / "w0")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        Path(files + ".pid").write_text(f"{other.pid}\n")
        for name in ("TERM", "KILL"):
            subprocess.run(["sh", "-c", hosts.signal_command(files, name)], timeout=10)
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_stop_commands_run_all_at_once():
    started = time.monotonic()
    codes = hosts.run_all([["sleep", "0.5"]] * 4 + [["false"], ["no-such-program-here"]])
    assert codes == [0, 0, 0, 0, 1, -1]
    assert time.monotonic() - started < 1.5  # 4 x 0.5 s one after another would be 2 s


def test_ssh_and_gcloud_never_prompt_and_give_up_on_a_silent_host():
    plan = hosts.parse_hosts("tpu:pod")
    gcloud = hosts.gcloud_argv(plan, "true")
    assert "--quiet" in gcloud and "--ssh-flag=-o ServerAliveInterval=30" in gcloud
    assert hosts.ssh_argv("h", "true")[:7] == [
        "ssh", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=30", "-o",
        "ServerAliveCountMax=4",
    ]  # fmt: skip


def test_slurm_script_passes_force_on():
    plan = hosts.parse_hosts("slurm:2")
    assert "--force" not in hosts.slurm_script(plan, "s.toml", "/w", "/l")
    assert hosts.slurm_script(plan, "s.toml", "/w", "/l", force=True).split()[-1] == "--force"


def test_a_run_folder_is_the_same_run_on_another_topology(tmp_path):
    """Every process of a launch has its own distributed.process_id (and a resume may
    use another coordinator): the run folder takes them all, but not another spec."""
    from clip_jax.run_folder import RunFolderConflict, check_run_folder
    from clip_jax.spec import load_spec, to_toml

    def spec(*overrides):
        return load_spec(QUICKSTART, [f"run.output_dir={tmp_path}", *overrides])

    folder = RunFolder(tmp_path)
    folder.write_spec(
        to_toml(spec(*hosts.distributed_overrides(hosts.parse_hosts("ssh:a,b"), 0, 1)))
    )
    check_run_folder(folder, spec("distributed.mode=auto"), force=False)
    with pytest.raises(RunFolderConflict, match="train.steps"):
        check_run_folder(folder, spec("train.steps=7", "distributed.mode=auto"), force=False)


def test_on_tpu_vm_reads_only_local_signs(tmp_path):
    assert not hosts.on_tpu_vm(tmp_path, environ={})
    assert hosts.on_tpu_vm(tmp_path, environ={"TPU_ACCELERATOR_TYPE": "v4-8"})
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "0").touch()
    assert hosts.on_tpu_vm(tmp_path, environ={})
    other = tmp_path / "other"
    other.mkdir()
    (other / "accel0").touch()
    assert hosts.on_tpu_vm(other, environ={})


# ------------------------------------------------------- the CLI, through the fakes


# ------------------------------------------------- is a multi-host run still at work
def _gone_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(done.stdout)


def test_a_multi_host_run_is_running_while_its_launcher_is(tmp_path):
    """The trainers' pids are on other hosts: the launcher's says whether it runs."""
    folder = RunFolder(tmp_path)
    folder.write_status("running", pid=_gone_pid(), step=3, steps=10)
    assert folder.status()["state"] == "failed"  # single host: its process is gone
    hosts.write_record(tmp_path, "ssh:a,b", "0" * 12, [], started=time.time())
    assert folder.status()["state"] == "running"
    assert read_hosts(tmp_path)["launcher_pid"] == os.getpid()
    hosts.write_record(tmp_path, "ssh:a,b", "0" * 12, [], started=time.time(), ended=1.0)
    assert folder.status()["state"] == "failed"


def test_a_reused_launcher_pid_is_not_the_launcher(tmp_path):
    """hosts.json names a pid that now belongs to a process started after the launch."""
    folder = RunFolder(tmp_path)
    folder.write_status("running", pid=_gone_pid(), step=3, steps=10)
    record = {"hosts": "ssh:a,b", "launcher_pid": os.getpid(), "started": time.time()}
    assert hosts_at_work(record)
    record["started"] = 1.0  # 1970: this process started long after that launch
    (tmp_path / "hosts.json").write_text(json.dumps(record))
    assert not hosts_at_work(record)
    assert folder.status()["state"] == "failed"


def test_a_slurm_run_is_running_while_squeue_lists_its_job(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    folder = RunFolder(tmp_path)
    folder.write_status("running", pid=_gone_pid(), step=3, steps=10)
    (tmp_path / "hosts.json").write_text(json.dumps({"hosts": "slurm", "job_id": "42"}))
    monkeypatch.setenv("FAKE_SLURM_ALIVE", "42")
    assert folder.status()["state"] == "running"
    monkeypatch.setenv("FAKE_SLURM_ALIVE", "")  # cancelled, timed out: squeue forgot it
    assert folder.status()["state"] == "failed"
    assert hosts.stop_hosts(tmp_path) is False  # nothing to scancel
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue here: no evidence it died
    assert folder.status()["state"] == "running"


def test_stop_hosts_without_ssh_says_it_reached_nothing(tmp_path, monkeypatch):
    record = {"hosts": "ssh:a,b", "launch_id": "0" * 12, "launcher_pid": _gone_pid()}
    (tmp_path / "hosts.json").write_text(json.dumps(record))
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh: FileNotFoundError inside
    assert hosts.stop_hosts(tmp_path) is False


def test_the_runs_screen_lists_the_hosts_of_a_multi_host_run(tmp_path):
    from clipctl import runs
    from clipctl.widgets.run_details import RunDetails

    folder = RunFolder(tmp_path / "pod")
    folder.path.mkdir()
    folder.write_status("finished", step=10, steps=10)
    workers = [{"label": "0", "host": "node-a"}, {"label": "1", "host": "node-b"}]
    (folder.path / "hosts.json").write_text(
        json.dumps({"hosts": "ssh:node-a,node-b", "workers": workers})
    )
    summary = runs.summarize(folder.path)
    assert summary.hosts == ["node-a", "node-b"]
    shown = []
    details = RunDetails()
    details.update = shown.append
    details.show(summary)
    assert "hosts  2: node-a, node-b" in shown[0]
