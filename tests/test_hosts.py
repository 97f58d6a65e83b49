"""`clipctl run SPEC --hosts ...`: parsing, quoting, dry runs, stop and failure, and one real
two-host run, all through the fake `ssh` / `gcloud` / `sbatch` in tests/fake_cloud.

The fakes record their argv and run the remote command here through `bash -c`, as sshd
would on a host, so what the quoting protects against would really happen.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip_jax.errors import UserError
from clip_jax.run_folder import RunFolder
from clipctl import hosts

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "templates" / "quickstart.toml"
FAKES = ROOT / "tests" / "fake_cloud"
HOSTILE = "x; touch PWNED; $(touch PWNED2) `touch PWNED3` ' \" \\"


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
     "ssh:a;b", "gpu"],
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


def test_remote_command_survives_bash_word_for_word(tmp_path, monkeypatch):
    """Whatever the spec holds, the host's shell writes it back byte for byte."""
    monkeypatch.setenv(hosts.REMOTE_ENV, "true")  # only the shell line is under test
    toml = f'[run]\nname = "{HOSTILE}"\n'
    files = str(tmp_path / "spec it's")
    line = hosts.remote_command(toml, str(tmp_path), files, [HOSTILE])
    done = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert Path(files + ".toml").read_text() == toml
    assert Path(files + ".pid").read_text().strip().isdigit()
    assert not list(tmp_path.glob("PWNED*"))


def test_a_host_is_sent_sigterm_once_and_sigkill_after(tmp_path):
    files = str(tmp_path / "w0")
    ignores_term = "trap '' TERM; echo $$ > " + shlex.quote(files + ".pid") + "; sleep 10 & wait"
    proc = subprocess.Popen(["bash", "-c", ignores_term])
    wait_for(lambda: Path(files + ".pid").exists(), what="the pid file")
    term = hosts.signal_command(files, "TERM")
    assert subprocess.run(["bash", "-c", term]).returncode == 0
    assert subprocess.run(["bash", "-c", term]).returncode != 0  # asked once only
    assert proc.poll() is None  # it ignores SIGTERM...
    subprocess.run(["bash", "-c", hosts.signal_command(files, "KILL")], check=True)
    assert proc.wait(timeout=10) == -signal.SIGKILL  # ...but not SIGKILL


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
@pytest.fixture(autouse=True)
def _remove_host_files(tmp_path):
    """The fake hosts are this machine: remove the spec and pid files this test's
    launches left in /tmp (their names are in the commands the fakes recorded)."""
    yield
    log = tmp_path / "cloud.log"
    for launch_id in (
        set(re.findall(r"clipctl-([0-9a-f]{12})", log.read_text())) if log.exists() else ()
    ):
        for path in Path("/tmp").glob(f"clipctl-{launch_id}*"):
            path.unlink(missing_ok=True)


def fake_env(tmp_path, mode="exit", remote=None, **extra) -> dict[str, str]:
    """The environment of a launch whose ssh/gcloud/sbatch are the fakes."""
    (tmp_path / "workers").mkdir(exist_ok=True)
    worker = shlex.join([sys.executable, str(FAKES / "worker.py")])
    return {
        **os.environ,
        "PATH": f"{FAKES}{os.pathsep}{os.environ['PATH']}",
        "FAKE_CLOUD_LOG": str(tmp_path / "cloud.log"),
        "FAKE_WORKER_DIR": str(tmp_path / "workers"),
        "FAKE_WORKER_MODE": mode,
        hosts.REMOTE_ENV: remote or worker,
        **extra,
    }


def clipctl(tmp_path, *args, env, wait=True, timeout=120):
    """`clipctl ARGS` in a fresh interpreter, from tmp_path (the hosts' working folder)."""
    command = [sys.executable, "-m", "clipctl.cli", *map(str, args)]
    if not wait:
        return subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def calls(tmp_path) -> list[dict]:
    log = tmp_path / "cloud.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def worker_records(tmp_path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "workers").glob("*.json"))]


def test_unknown_host_kind_and_missing_gcloud_exit_2_before_anything_starts(tmp_path):
    env = fake_env(tmp_path)
    run_dir = tmp_path / "run"
    bad = clipctl(
        tmp_path, "run", QUICKSTART, f"run.output_dir={run_dir}", "--hosts", "k8s:a", env=env
    )
    assert bad.returncode == 2
    assert "error: --hosts: unknown host kind 'k8s'" in bad.stderr
    no_path = {**env, "PATH": os.path.dirname(sys.executable)}  # python, but no gcloud
    missing = clipctl(
        tmp_path, "run", QUICKSTART, f"run.output_dir={run_dir}", "--hosts", "tpu:t", env=no_path
    )
    assert missing.returncode == 2
    assert "`gcloud` is not on PATH" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr
    assert not run_dir.exists() and calls(tmp_path) == []


def test_a_url_run_folder_is_refused_before_anything_starts():
    from click.testing import CliRunner

    from clipctl.cli import cli

    args = ["run", str(QUICKSTART), "run.output_dir=gs://bucket/run", "--hosts", "ssh:a,b"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "run.output_dir: --hosts keeps the workers' logs" in result.output
    dry_without_hosts = CliRunner().invoke(cli, ["run", str(QUICKSTART), "--dry-run"])
    assert dry_without_hosts.exit_code == 2 and "add --hosts" in dry_without_hosts.output


def test_dry_run_prints_the_commands_and_starts_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from clipctl.cli import cli

    for name, value in fake_env(tmp_path).items():
        monkeypatch.setenv(name, value)  # the fakes would record any call
    run_dir = tmp_path / "run"
    args = ["run", str(QUICKSTART), f"run.output_dir={run_dir}", f"run.name={HOSTILE}"]

    def dry(hosts_text):
        result = CliRunner().invoke(cli, [*args, "--dry-run", "--hosts", hosts_text])
        assert result.exit_code == 0, result.output
        return result.output

    lines = [shlex.split(line) for line in dry("ssh:gpu0,gpu1").split("\nssh ")]
    assert [line[-2] for line in lines] == ["gpu0", "gpu1"]
    assert "distributed.coordinator=gpu0:8476" in lines[1][-1]
    assert "distributed.process_id=1" in lines[1][-1]
    assert dry("tpu:pod@europe-west4-a").startswith(
        "gcloud compute tpus tpu-vm ssh pod --zone europe-west4-a --worker=all --command "
    )
    slurm = dry("slurm:2")
    assert "#SBATCH --nodes=2" in slurm and "distributed.mode=auto" in slurm
    assert slurm.splitlines()[-1].startswith("sbatch --parsable")
    assert not run_dir.exists() and calls(tmp_path) == []
    assert not list(tmp_path.glob("PWNED*"))


def test_hostile_values_travel_quoted_through_ssh_and_gcloud(tmp_path):
    """run.name='x; touch PWNED' reaches every host as data, never as shell code."""
    env = fake_env(tmp_path)
    run_dir = tmp_path / "run"
    args = ("run", QUICKSTART, f"run.output_dir={run_dir}", f"run.name={HOSTILE}")
    done = clipctl(tmp_path, *args, "--hosts", "ssh:127.0.0.1,localhost", env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(c["argv"][2] for c in calls(tmp_path)) == ["127.0.0.1", "localhost"]
    tpu = clipctl(tmp_path, *args, "--hosts", "tpu:pod", env=env)
    assert tpu.returncode == 0, tpu.stderr
    assert calls(tmp_path)[-1]["program"] == "gcloud"
    assert not list(tmp_path.glob("PWNED*"))
    records = worker_records(tmp_path)
    assert len(records) == 3
    for record in records:
        assert f'name = "{HOSTILE}"' in record["spec"].replace('\\"', '"').replace("\\\\", "\\")
        assert record["cwd"] == str(tmp_path)
    ids = sorted(r["argv"][-1] for r in records if "distributed.mode=explicit" in r["argv"])
    assert ids == ["distributed.process_id=0", "distributed.process_id=1"]
    for name in ("worker-0.log", "worker-1.log", "worker-all.log"):
        assert "started" in (run_dir / "hosts" / name).read_text()
    assert "[worker 1] worker" in done.stdout


def wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_stop_reaches_every_host(tmp_path):
    env = fake_env(tmp_path, mode="wait")
    run_dir = tmp_path / "run"
    launcher = clipctl(
        tmp_path, "run", QUICKSTART, f"run.output_dir={run_dir}", "--hosts", "ssh:h0,h1",
        env=env, wait=False,
    )  # fmt: skip
    try:
        wait_for(lambda: len(worker_records(tmp_path)) == 2, what="both workers")
        launcher.send_signal(signal.SIGHUP)  # the terminal went away: it keeps watching
        time.sleep(0.5)
        assert launcher.poll() is None
        stopped = clipctl(tmp_path, "stop", run_dir, env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert launcher.wait(timeout=60) == 130
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert len(list((tmp_path / "workers").glob("stopped-*"))) == 2
    assert RunFolder(run_dir).status()["state"] == "interrupted"
    assert hosts.read_record(run_dir)["ended"]
    stop_calls = [c["argv"][-1] for c in calls(tmp_path) if "kill -TERM" in c["argv"][-1]]
    assert len(stop_calls) == 2
    again = clipctl(tmp_path, "stop", run_dir, env=env)
    assert again.returncode == 2 and "not running" in again.stderr


def test_stop_reaches_the_hosts_when_the_launcher_was_killed(tmp_path):
    env = fake_env(tmp_path, mode="wait")
    run_dir = tmp_path / "run"
    launcher = clipctl(
        tmp_path, "run", QUICKSTART, f"run.output_dir={run_dir}", "--hosts", "ssh:h0,h1",
        env=env, wait=False,
    )  # fmt: skip
    try:
        wait_for(lambda: len(worker_records(tmp_path)) == 2, what="both workers")
    finally:
        launcher.kill()
        launcher.wait()
    stopped = clipctl(tmp_path, "stop", run_dir, env=env)
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: len(list((tmp_path / "workers").glob("stopped-*"))) == 2, what="stops")


def test_dry_run_imports_neither_jax_nor_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "from clipctl.cli import cli\n"
        f"cli(['run', {str(QUICKSTART)!r}, '--hosts', 'ssh:a,b', '--dry-run'],"
        " standalone_mode=False)\n"
        "heavy = [m for m in ('jax', 'tensorflow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ssh -o BatchMode=yes a ")


def test_a_host_that_fails_stops_the_others_and_fails_the_run(tmp_path):
    env = fake_env(tmp_path, mode="wait", FAKE_SSH_UNREACHABLE="badhost")
    run_dir = tmp_path / "run"
    done = clipctl(
        tmp_path, "run", QUICKSTART, f"run.output_dir={run_dir}", "--hosts", "ssh:h0,badhost",
        env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "worker 1 (badhost) exited with code 255" in done.stderr
    status = RunFolder(run_dir).status()
    assert status["state"] == "failed"
    assert "Could not resolve hostname badhost" in status["error"]
    assert "Could not resolve" in (run_dir / "hosts" / "worker-1.log").read_text()
    # worker 0 was asked to stop through its pid file and is not left running
    assert any("kill -TERM" in c["argv"][-1] for c in calls(tmp_path) if "h0" in c["argv"])
    for record in worker_records(tmp_path):
        with pytest.raises(ProcessLookupError):
            os.kill(record["pid"], 0)


def test_slurm_writes_and_submits_a_script_that_stop_cancels(tmp_path):
    env = fake_env(tmp_path)
    run_dir = tmp_path / "run"
    done = clipctl(
        tmp_path, "run", QUICKSTART, f"run.output_dir={run_dir}", f"run.name={HOSTILE}",
        "--hosts", "slurm:2", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "submitted Slurm job 4242" in done.stdout
    script = run_dir / "hosts" / "job.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "srun" in script.read_text() and "#SBATCH --nodes=2" in script.read_text()
    assert RunFolder(run_dir / "hosts").path.joinpath("spec.toml").exists()
    assert calls(tmp_path)[0]["argv"][-1] == str(script)
    stopped = clipctl(tmp_path, "stop", run_dir, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert calls(tmp_path)[-1] == {"program": "scancel", "argv": ["--signal=TERM", "4242"]}


# ------------------------------------------------------------ two real hosts, slow
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_steps(run_dir) -> list[int]:
    return [r["step"] for r in RunFolder(run_dir).metrics() if r["split"] == "train"]


@pytest.mark.slow
def test_two_hosts_train_stop_and_resume(small_run, tmp_path):
    """Two real `clipctl run` workers through the fake ssh: stopped together by
    `clipctl stop`, resumed by the same command, finished."""
    run_dir = tmp_path / "run"
    remote = shlex.join([sys.executable, "-m", "clipctl.cli"])
    env = fake_env(tmp_path, remote=remote, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    overrides = [o for o in small_run if not o.startswith("run.output_dir")] + [
        f"run.output_dir={run_dir}",
        f"run.name={HOSTILE}",
        "data.readers=2",
        "train.steps=30",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "eval.retrieval=false",
        f"distributed.coordinator=127.0.0.1:{free_port()}",
    ]
    command = ("run", QUICKSTART, *overrides, "--hosts", "ssh:127.0.0.1,localhost")
    launcher = clipctl(tmp_path, *command, env=env, wait=False)
    try:
        wait_for(
            lambda: max(train_steps(run_dir), default=0) >= 3 or launcher.poll() is not None,
            timeout=240,
            what="step 3",
        )
        assert launcher.poll() is None, launcher.communicate()[1].decode()[-3000:]
        stopped = clipctl(tmp_path, "stop", run_dir, env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert launcher.wait(timeout=180) == 130
    finally:
        if launcher.poll() is None:
            launcher.kill()
    status = RunFolder(run_dir).status()
    assert status["state"] == "interrupted"
    stopped_at = status["step"]
    assert 3 <= stopped_at < 30
    assert (RunFolder(run_dir).checkpoints / str(stopped_at)).exists()
    for index in (0, 1):  # both stopped gracefully: each said so in its log
        assert (
            "rerun the same command to resume"
            in (run_dir / "hosts" / f"worker-{index}.log").read_text()
        )

    resumed = clipctl(tmp_path, *command, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resumed from the checkpoint at step {stopped_at}"
        in RunFolder(run_dir).log_path.read_text()
    )
    assert train_steps(run_dir) == list(range(1, 31))
    assert RunFolder(run_dir).status()["state"] == "finished"
    assert not list(tmp_path.glob("PWNED*"))
    finished = clipctl(tmp_path, *command, env=env)
    assert finished.returncode == 0 and "already finished at step 30" in finished.stderr


def test_a_multi_host_run_is_running_while_its_launcher_is(tmp_path):
    """The trainers' pids are on other hosts: the launcher's (or Slurm's) says it runs."""
    import json
    import subprocess
    import sys

    from clip_jax.run_folder import RunFolder

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    folder = RunFolder(tmp_path)
    folder.write_status("running", pid=int(gone.stdout), step=3, steps=10)
    assert folder.status()["state"] == "failed"  # single host: its process is gone
    record = {"hosts": "ssh:a,b", "launcher_pid": os.getpid(), "workers": []}
    (tmp_path / "hosts.json").write_text(json.dumps(record))
    assert folder.status()["state"] == "running"
    (tmp_path / "hosts.json").write_text(json.dumps({**record, "ended": 1.0}))
    assert folder.status()["state"] == "failed"
    (tmp_path / "hosts.json").write_text(json.dumps({"hosts": "slurm", "job_id": "42"}))
    assert folder.status()["state"] == "running"


def test_the_runs_screen_lists_the_hosts_of_a_multi_host_run(tmp_path):
    import json

    from clip_jax.run_folder import RunFolder
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
