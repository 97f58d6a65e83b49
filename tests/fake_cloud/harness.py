"""How the multi-host tests drive `clipctl` through the fakes in this folder.

The fakes record their argv in $FAKE_CLOUD_LOG and run the remote command here through
`bash -c`, as sshd would on a host; `calls` decodes the ``sh`` script each remote command
carries, so a test reads what a host would run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from clipctl import hosts

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "templates" / "quickstart.toml"
FAKES = ROOT / "tests" / "fake_cloud"
HOSTILE = "x; touch PWNED; $(touch PWNED2) `touch PWNED3` ' \" \\"
NEUTRAL = re.compile(r"echo ([A-Za-z0-9+/=]+) \| base64 -d \| sh")


def script_of(line: str) -> str:
    """The ``sh`` script inside a shell-neutral remote command ("" when it is not one)."""
    found = NEUTRAL.fullmatch(line)
    return base64.b64decode(found.group(1)).decode() if found else ""


def fake_env(tmp_path: Path, mode: str = "exit", remote: str | None = None, **extra: str):
    """The environment of a launch whose ssh/gcloud/sbatch/squeue are the fakes."""
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


def clipctl(tmp_path: Path, *args, env, wait: bool = True, timeout: float = 120):
    """`clipctl ARGS` in a fresh interpreter, from tmp_path (the hosts' working folder)."""
    command = [sys.executable, "-m", "clipctl.cli", *map(str, args)]
    if not wait:
        return subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def calls(tmp_path: Path) -> list[dict]:
    """What the fakes ran: {"program", "argv", "script" (the decoded remote script)}."""
    log = tmp_path / "cloud.log"
    found = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for call in found:
        call["script"] = script_of(call["argv"][-1]) if call["argv"] else ""
    return found


def worker_records(tmp_path: Path) -> list[dict]:
    """What reached each fake worker (worker.py): its pid, argv, spec text and mode."""
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "workers").glob("worker-*.json"))]


def stopped_workers(tmp_path: Path) -> int:
    return len(list((tmp_path / "workers").glob("stopped-*")))


def launch_files(tmp_path: Path) -> list[Path]:
    """This test's launches' spec and pid files in /tmp (their ids are in the scripts)."""
    ids = {i for c in calls(tmp_path) for i in re.findall(r"clipctl-([0-9a-f]{12})", c["script"])}
    return [path for i in ids for path in Path("/tmp").glob(f"clipctl-{i}*")]


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
