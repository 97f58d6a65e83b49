"""A stand-in for `clipctl run` on a host, for the launcher's fast tests (no jax).

Called as ``python worker.py run SPEC.toml ARGS...`` through the fake ssh/gcloud, it
writes what reached it (argv and the spec file's text) to $FAKE_WORKER_DIR, then as
$FAKE_WORKER_MODE says: ``exit`` at once (0), ``wait`` until SIGTERM and exit 130 the
way a stopped trainer does, or ``stubborn``: ignore SIGTERM (only SIGKILL ends it).
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


# first: a stop may come at any time
stubborn = os.environ.get("FAKE_WORKER_MODE") == "stubborn"
signal.signal(signal.SIGTERM, signal.SIG_IGN if stubborn else stopped)
record = out / f"worker-{os.getpid()}.json"
spec_file = Path(sys.argv[2])
mode = spec_file.stat().st_mode & 0o777
facts = {"pid": os.getpid(), "argv": sys.argv[1:], "spec": spec_file.read_text(), "mode": mode}
# Written whole or not at all: a test polling for it must never read a half-written file.
partial = record.with_suffix(".partial")
partial.write_text(json.dumps({**facts, "cwd": os.getcwd()}))
partial.replace(record)
print(f"worker {os.getpid()} started", flush=True)
if os.environ.get("FAKE_WORKER_MODE", "exit") in ("wait", "stubborn"):
    time.sleep(120)
    sys.exit(1)  # never stopped: the test fails on this exit code
