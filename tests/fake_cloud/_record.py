"""Shared by the fake cloud commands: append this invocation's argv to $FAKE_CLOUD_LOG."""

import json
import os
import sys


def record(program: str) -> None:
    """One JSON line per call, so a test sees exactly what clipctl ran."""
    log = os.environ.get("FAKE_CLOUD_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"program": program, "argv": sys.argv[1:]}) + "\n")


def run_remote(command: str) -> None:
    """Become ``bash -c COMMAND``, as sshd runs a remote command through the login shell:
    this is what makes the quoting tests real."""
    os.execvp("bash", ["bash", "-c", command])
