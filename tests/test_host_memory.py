"""Huge pages for XLA's scratch memory: when the commands re-execute themselves, and that
the re-executed process is the same one with the tunable set."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from clip_jax import host_memory
from clip_jax.host_memory import (
    TUNABLE,
    glibc_version,
    huge_pages_environment,
    transparent_huge_pages_mode,
)


def test_madvise_kernel_and_new_glibc_get_the_tunable_added_to_existing_ones():
    env = huge_pages_environment(
        {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
        mode="madvise",
        glibc=(2, 36),
    )
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=1"}
    assert huge_pages_environment({}, mode="madvise", glibc=(2, 35)) == {
        "GLIBC_TUNABLES": f"{TUNABLE}=1"
    }


@pytest.mark.parametrize(
    ("environ", "mode", "glibc"),
    [
        ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, "madvise", (2, 36)),  # the user chose
        ({"CLIP_JAX_HUGE_PAGES": "0"}, "madvise", (2, 36)),  # opted out
        ({}, "always", (2, 36)),  # every mapping gets them already
        ({}, "never", (2, 36)),  # the kernel refuses them
        ({}, "madvise", (2, 34)),  # glibc without the tunable
        ({}, "madvise", None),  # not glibc
    ],
)
def test_nothing_to_change_means_no_reexec(environ, mode, glibc):
    assert huge_pages_environment(environ, mode=mode, glibc=glibc) is None


def test_kernel_mode_is_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert transparent_huge_pages_mode(path) == "madvise"
    assert transparent_huge_pages_mode(tmp_path / "missing") is None


MACHINE = {"mode": transparent_huge_pages_mode(), "glibc": glibc_version()}


@pytest.mark.skipif(
    huge_pages_environment({}, **MACHINE) is None,
    reason=f"this machine would not re-execute ({MACHINE}: needs 'madvise' and glibc 2.35+)",
)
def test_reexec_keeps_pid_and_arguments_and_sets_the_tunable(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            from clip_jax.host_memory import reexec_with_huge_pages
            print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
            reexec_with_huge_pages()
            """
        )
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CLIP_JAX_HUGE_PAGES")
    }
    out = subprocess.run(
        [sys.executable, str(script), "a b", "--flag"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    ).stdout.splitlines()  # fmt: skip
    assert len(out) == 2, out  # once as started, once re-executed, then no more
    first, second = (line.split(" ", 2) for line in out)
    assert first[0] == second[0]  # the same process
    assert first[1] == "None" and second[1] == f"{TUNABLE}=1"
    assert first[2] == second[2] == "['a b', '--flag']"


@pytest.mark.parametrize(
    ("argv", "reexecs"),
    [(["run", "spec.toml"], True), (["eval", "runs/x"], True), (["validate", "s"], False),
     (["--help"], False), ([], False)],
)  # fmt: skip
def test_only_commands_that_run_programs_reexecute(monkeypatch, argv, reexecs):
    import clipctl.cli

    calls = []
    monkeypatch.setattr(host_memory, "reexec_with_huge_pages", lambda: calls.append(1))
    monkeypatch.setattr(clipctl.cli, "cli", lambda: None)
    monkeypatch.setattr(sys, "argv", ["clipctl", *argv])
    clipctl.cli.main()
    assert bool(calls) is reexecs


def test_a_cpu_run_without_the_tunable_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(host_memory, "transparent_huge_pages_mode", lambda: "madvise")
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(sys, "platform", "linux")
    hint = host_memory.missing_huge_pages_hint("cpu", {})
    assert hint is not None and f"GLIBC_TUNABLES={TUNABLE}=1" in hint
    assert host_memory.missing_huge_pages_hint("gpu", {}) is None
    assert host_memory.missing_huge_pages_hint("cpu", {"GLIBC_TUNABLES": f"{TUNABLE}=1"}) is None
    assert host_memory.missing_huge_pages_hint("cpu", {"CLIP_JAX_HUGE_PAGES": "0"}) is None
    monkeypatch.setattr(host_memory, "transparent_huge_pages_mode", lambda: "always")
    assert host_memory.missing_huge_pages_hint("cpu", {}) is None


@pytest.mark.parametrize(
    ("mode", "tunables", "on"),
    [("madvise", f"{TUNABLE}=1", True), ("madvise", f"a=1:{TUNABLE}=2", True),
     ("madvise", f"{TUNABLE}=0", False), ("madvise", "", False), ("always", "", True),
     ("never", f"{TUNABLE}=1", False)],
)  # fmt: skip
def test_huge_pages_on_reads_the_kernel_mode_and_the_tunable(monkeypatch, mode, tunables, on):
    monkeypatch.setattr(host_memory, "transparent_huge_pages_mode", lambda: mode)
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
    assert host_memory.huge_pages_on({"GLIBC_TUNABLES": tunables}) is on
