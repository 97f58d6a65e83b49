"""`clipctl run SPEC --hosts ...` end to end through the fake `ssh` / `gcloud` / `sbatch` /
`squeue` in tests/fake_cloud: refusals, dry runs, hostile values, stop, failures and
resume (tests/test_hosts_e2e.py: two real trainers).

The fakes run each remote command here through `bash -c`, as sshd would on a host.
"""

import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip_jax.run_folder import RunFolder, read_hosts
from clipctl import hosts
from tests.fake_cloud.harness import (
    HOSTILE,
    QUICKSTART,
    alive,
    calls,
    clipctl,
    fake_env,
    launch_files,
    script_of,
    stopped_workers,
    wait_for,
    worker_records,
)


@pytest.fixture(autouse=True)
def _remove_host_files(tmp_path):
    """The fake hosts are this machine: whatever a failing test's launches left in /tmp
    goes (a passing one leaves nothing: the workers remove their files)."""
    yield
    for path in launch_files(tmp_path):
        path.unlink(missing_ok=True)


def launch(tmp_path, env, hosts_text="ssh:h0,h1", *extra):
    """A `clipctl run --hosts` in the background, on the run folder tmp_path/run."""
    args = ("run", QUICKSTART, f"run.output_dir={tmp_path / 'run'}", *extra)
    return clipctl(tmp_path, *args, "--hosts", hosts_text, env=env, wait=False)


def processes_naming(text: str) -> list[int]:
    """The pids of this machine's processes whose command line holds ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def finish(launcher, timeout=60) -> int:
    try:
        return launcher.wait(timeout=timeout)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


# ------------------------------------------------------------- refused, or dry
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


def test_url_folders_long_specs_and_bad_settings_are_refused_before_anything_starts(
    tmp_path, monkeypatch
):
    from click.testing import CliRunner

    from clipctl.cli import cli

    for name, value in fake_env(tmp_path).items():
        monkeypatch.setenv(name, value)  # the fakes would record any call

    def run(*args):
        return CliRunner().invoke(cli, ["run", str(QUICKSTART), *args])

    url = run("run.output_dir=gs://bucket/run", "--hosts", "ssh:a,b")
    assert url.exit_code == 2
    assert "run.output_dir: --hosts keeps the workers' logs" in url.output
    dry_without_hosts = run("--dry-run")
    assert dry_without_hosts.exit_code == 2 and "add --hosts" in dry_without_hosts.output
    out = f"run.output_dir={tmp_path / 'run'}"
    huge = run(out, f"run.name={'x' * 150_000}", "--hosts", "ssh:a,b", "--dry-run")
    assert huge.exit_code == 2 and "too long to send to the hosts" in huge.output
    monkeypatch.setenv("CLIPCTL_STOP_GRACE_S", "soon")
    grace = run(out, "--hosts", "ssh:a,b")
    assert grace.exit_code == 2 and "CLIPCTL_STOP_GRACE_S='soon'" in grace.output
    monkeypatch.setenv("CLIPCTL_REMOTE", "'unclosed")
    remote = run(out, "--hosts", "ssh:a,b")
    assert remote.exit_code == 2 and "CLIPCTL_REMOTE: cannot split" in remote.output
    assert calls(tmp_path) == [] and not (tmp_path / "run").exists()


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
    assert "distributed.coordinator=gpu0:8476" in script_of(lines[1][-1])
    assert "distributed.process_id=1" in script_of(lines[1][-1])
    assert dry("tpu:pod@europe-west4-a").startswith(
        "gcloud compute tpus tpu-vm ssh pod --zone europe-west4-a --worker=all --quiet "
    )
    slurm = dry("slurm:2")
    assert "#SBATCH --nodes=2" in slurm and "distributed.mode=auto" in slurm
    assert slurm.splitlines()[-1].startswith("sbatch --parsable")
    assert not run_dir.exists() and calls(tmp_path) == []
    assert not list(tmp_path.glob("PWNED*"))


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
    assert done.stdout.startswith("ssh -o BatchMode=yes -o ServerAliveInterval=30 ")


# ------------------------------------------------------------------- launches
def test_hostile_values_travel_quoted_through_ssh_and_gcloud(tmp_path):
    """run.name='x; touch PWNED' reaches every host as data, never as shell code; the spec
    files on the hosts are private (0600) and removed when the workers end."""
    env = fake_env(tmp_path)
    run_dir = tmp_path / "run"
    args = ("run", QUICKSTART, f"run.output_dir={run_dir}", f"run.name={HOSTILE}")
    done = clipctl(tmp_path, *args, "--hosts", "ssh:127.0.0.1,localhost", env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(c["argv"][-2] for c in calls(tmp_path)) == ["127.0.0.1", "localhost"]
    tpu = clipctl(tmp_path, *args, "--hosts", "tpu:pod", env=env)
    assert tpu.returncode == 0, tpu.stderr
    assert calls(tmp_path)[-1]["program"] == "gcloud"
    assert not list(tmp_path.glob("PWNED*"))
    records = worker_records(tmp_path)
    assert len(records) == 3
    for record in records:
        assert f'name = "{HOSTILE}"' in record["spec"].replace('\\"', '"').replace("\\\\", "\\")
        assert record["cwd"] == str(tmp_path)
        assert record["mode"] == 0o600
    ids = sorted(r["argv"][-1] for r in records if "distributed.mode=explicit" in r["argv"])
    assert ids == ["distributed.process_id=0", "distributed.process_id=1"]
    for name in ("worker-0.log", "worker-1.log", "worker-all.log"):
        assert "started" in (run_dir / "hosts" / name).read_text()
    assert "[worker 1] worker" in done.stdout
    assert launch_files(tmp_path) == []  # no spec or pid file left in /tmp
    assert read_hosts(run_dir)["ended"]


@pytest.mark.slow  # a supervised launch through the fakes, ~1 s
def test_stop_reaches_every_host(tmp_path):
    env = fake_env(tmp_path, mode="wait")
    run_dir = tmp_path / "run"
    launcher = launch(tmp_path, env)
    try:
        wait_for(lambda: len(worker_records(tmp_path)) == 2, what="both workers")
        launcher.send_signal(signal.SIGHUP)  # the terminal went away: it keeps watching
        time.sleep(0.3)
        assert launcher.poll() is None
        stopped = clipctl(tmp_path, "stop", run_dir, env=env)
        assert stopped.returncode == 0, stopped.stderr
    finally:
        assert finish(launcher) == 130
    assert stopped_workers(tmp_path) == 2
    assert RunFolder(run_dir).status()["state"] == "interrupted"
    assert read_hosts(run_dir)["ended"]
    stop_calls = [c for c in calls(tmp_path) if "kill -TERM" in c["script"]]
    assert sorted(c["argv"][-2] for c in stop_calls) == ["h0", "h1"]  # once each
    again = clipctl(tmp_path, "stop", run_dir, env=env)
    assert again.returncode == 2 and "not running" in again.stderr


def test_stop_reaches_the_hosts_when_the_launcher_was_killed(tmp_path):
    env = fake_env(tmp_path, mode="wait")
    launcher = launch(tmp_path, env)
    try:
        wait_for(lambda: len(worker_records(tmp_path)) == 2, what="both workers")
        # A host writes its pid file just after starting its trainer: on a loaded
        # machine the trainer can be up first, and a stop then finds no pid to signal.
        pid_files = lambda: [p for p in launch_files(tmp_path) if p.suffix == ".pid"]  # noqa: E731
        wait_for(lambda: len(pid_files()) == 2, what="both pid files")
    finally:
        launcher.kill()
        launcher.wait()
    stopped = clipctl(tmp_path, "stop", tmp_path / "run", env=env)
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: stopped_workers(tmp_path) == 2, what="stops")


def test_a_run_every_host_stopped_on_its_own_is_interrupted(tmp_path):
    """Preempted, or stopped on the hosts: every worker exits 130, nobody asked here."""
    env = fake_env(tmp_path, mode="wait")
    launcher = launch(tmp_path, env)
    try:
        wait_for(lambda: len(worker_records(tmp_path)) == 2, what="both workers")
        for record in worker_records(tmp_path):
            os.kill(record["pid"], signal.SIGTERM)
    finally:
        assert finish(launcher) == 130
    assert RunFolder(tmp_path / "run").status()["state"] == "interrupted"


@pytest.mark.slow  # a supervised launch through the fakes, ~1 s
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
    assert any("kill -TERM" in c["script"] for c in calls(tmp_path) if "h0" in c["argv"])
    for record in worker_records(tmp_path):
        assert not alive(record["pid"])


@pytest.mark.slow  # a supervised launch through the fakes, ~1 s
def test_a_host_whose_connection_dropped_is_still_stopped(tmp_path):
    """ssh to h1 exits 255 but its trainer runs on: it is asked to stop like the others,
    and hosts.json stays open (not "ended") for `clipctl stop`."""
    env = fake_env(tmp_path, mode="wait", FAKE_SSH_DROP="h1")
    launcher = launch(tmp_path, env)
    assert finish(launcher) == 1
    wait_for(lambda: stopped_workers(tmp_path) == 2, timeout=10, what="both stopped")
    assert "worker 1 (h1) exited with code 255" in launcher.stderr.read().decode()
    assert not read_hosts(tmp_path / "run").get("ended")


@pytest.mark.slow  # a supervised launch through the fakes, ~1 s
def test_an_error_after_some_hosts_started_stops_them(tmp_path, monkeypatch):
    """A worker that cannot be started (E2BIG, a vanished ssh) after another one was."""
    from clipctl.launch_command import Supervisor

    for name, value in fake_env(tmp_path, mode="wait").items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    plan = hosts.parse_hosts("ssh:h0,h1")
    launch_id = secrets.token_hex(6)
    found = hosts.workers(plan, "[run]\n", str(tmp_path), launch_id, 1234, False)
    found[1].argv = [str(tmp_path / "no-such-ssh")]
    with pytest.raises(FileNotFoundError):
        Supervisor(run_dir, "ssh:h0,h1", launch_id, found, 10).run()
    # worker 0 got SIGTERM (while it started, or after: then it said so)
    wait_for(lambda: not processes_naming(launch_id), timeout=10, what="worker 0 gone")
    assert not read_hosts(run_dir).get("ended")


@pytest.mark.slow  # a supervised launch through the fakes, ~1 s
def test_a_host_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    env = fake_env(tmp_path, mode="stubborn", CLIPCTL_STOP_GRACE_S="0.3")
    launcher = launch(tmp_path, env)
    try:
        wait_for(lambda: len(worker_records(tmp_path)) == 2, what="both workers")
        launcher.send_signal(signal.SIGTERM)
    finally:
        assert finish(launcher, timeout=20) == 130
    for record in worker_records(tmp_path):
        wait_for(lambda pid=record["pid"]: not alive(pid), timeout=5, what="SIGKILL")
    assert any("kill -KILL" in c["script"] for c in calls(tmp_path))


def test_a_tui_launch_on_hosts_is_not_refused_by_its_own_status(tmp_path, monkeypatch):
    """runs.launch marks the folder "starting" with the launcher's pid before it runs."""
    from clipctl import runs

    for name, value in fake_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    started = runs.launch(QUICKSTART, [f"run.output_dir={run_dir}"], hosts="ssh:h0,h1")
    assert runs._launched[started.pid].wait(timeout=60) == 0, (run_dir / "launch.log").read_text()
    assert len(worker_records(tmp_path)) == 2


@pytest.mark.slow  # a supervised launch through the fakes, ~1 s
def test_resume_relaunches_a_multi_host_run_on_its_hosts(tmp_path, monkeypatch):
    """spec.resolved.toml names one process of the run: resume goes by hosts.json."""
    from clip_jax.spec import load_spec, to_toml
    from clipctl import runs

    for name, value in fake_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    plan = hosts.parse_hosts("ssh:h0,h1")
    spec = load_spec(
        QUICKSTART, [f"run.output_dir={run_dir}", *hosts.distributed_overrides(plan, 0, 9999)]
    )
    folder = RunFolder(run_dir)
    folder.write_spec(to_toml(spec))
    folder.write_status("interrupted", step=3, steps=spec.train.steps)
    hosts.write_record(run_dir, "ssh:h0,h1", "0" * 12, [], started=1.0, ended=2.0)
    resumed = runs.resume(run_dir)
    assert runs._launched[resumed.pid].wait(timeout=60) == 0, (run_dir / "launch.log").read_text()
    argv = sorted(r["argv"][-1] for r in worker_records(tmp_path))
    assert argv == ["distributed.process_id=0", "distributed.process_id=1"]
    assert "--hosts ssh:h0,h1" in (run_dir / "launch.log").read_text()


@pytest.mark.slow  # a supervised launch through the fakes, ~1 s
def test_slurm_writes_and_submits_a_script_that_stop_cancels(tmp_path):
    env = fake_env(tmp_path, FAKE_SLURM_ALIVE="4242")
    run_dir = tmp_path / "run"
    args = ("run", QUICKSTART, f"run.output_dir={run_dir}", f"run.name={HOSTILE}")
    done = clipctl(tmp_path, *args, "--hosts", "slurm:2", "--force", env=env)
    assert done.returncode == 0, done.stderr
    assert "submitted Slurm job 4242" in done.stdout
    script = run_dir / "hosts" / "job.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --nodes=2" in script.read_text()
    assert script.read_text().split()[-1] == "--force"
    assert (run_dir / "hosts" / "spec.toml").exists()
    assert calls(tmp_path)[0]["argv"][-1] == str(script)
    busy = clipctl(tmp_path, *args, "--hosts", "slurm:2", env=env)
    assert busy.returncode == 2 and "stop it first" in busy.stderr  # the job is queued
    stopped = clipctl(tmp_path, "stop", run_dir, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert calls(tmp_path)[-1]["argv"] == ["--signal=TERM", "4242"]
    gone = {**env, "FAKE_SLURM_ALIVE": ""}  # cancelled: squeue forgot the job
    again = clipctl(tmp_path, "stop", run_dir, env=gone)
    assert again.returncode == 2 and "not running" in again.stderr
    relaunched = clipctl(tmp_path, *args, "--hosts", "slurm:2", env=gone)
    assert relaunched.returncode == 0, relaunched.stderr
