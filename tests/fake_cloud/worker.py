"""A stand-in for `clipctl run` on a host, for the launcher's fast tests (no jax).

Called as ``python worker.py run SPEC.toml ARGS...`` through the fake ssh/gcloud, it
writes what reached it (argv and the spec file's text) to $FAKE_WORKER_DIR, then as
$FAKE_WORKER_MODE says: ``exit`` at once (0), or ``wait`` until SIGTERM and exit 130 the
way a stopped trainer does.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

out = Path(os.environ["FAKE_WORKER_DIR"])


def stopped(signum, frame):
    (out / f"stopped-{os.getpid()}").write_text("SIGTERM")
    print("stopping: checkpoint saved", flush=True)
    sys.exit(130)


signal.signal(signal.SIGTERM, stopped)  # first: a stop may come at any time
record = out / f"worker-{os.getpid()}.json"
spec = Path(sys.argv[2]).read_text()
record.write_text(
    json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "spec": spec, "cwd": os.getcwd()})
)
print(f"worker {os.getpid()} started", flush=True)
if os.environ.get("FAKE_WORKER_MODE", "exit") == "wait":
    time.sleep(120)
    sys.exit(1)  # never stopped: the test fails on this exit code
