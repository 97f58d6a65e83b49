"""Huge pages for the scratch memory of XLA's CPU runtime.

XLA's CPU runtime takes each step's scratch memory as one block from ``malloc`` (3.2 GB
for clip-b32 at a batch of 32), which glibc maps fresh and unmaps when it is freed. The
kernel then faults in and zeroes every 4 KiB page of it on first touch, every step:
800,000 page faults and 1.2 s of system time per 3.5 s step on a 2-core CPU, spread
over whichever fusions touch new memory first. glibc's ``glibc.malloc.hugetlb=1``
tunable asks for transparent huge pages for such blocks, which takes 512 times fewer
faults (clip-b32 in bf16: 9.7 -> 11.8 images/s). Tunables are read when a process
starts, so the commands that run XLA programs re-execute themselves once with it set.
It changes nothing where the kernel gives huge pages to every mapping already
(``always``), refuses them (``never``), or glibc is older than 2.35 or absent; setting
``CLIP_JAX_HUGE_PAGES=0`` keeps the process as started. Importing this module imports
neither jax nor TensorFlow.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "CLIP_JAX_HUGE_PAGES"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages_mode(path: Path = THP_MODE) -> str | None:
    """The kernel's mode (``always``, ``madvise`` or ``never``: the bracketed word), or
    None where the kernel does not say."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):  # not glibc (musl, macOS, Windows)
        return None


def huge_pages_environment(
    environ: Mapping[str, str], *, mode: str | None, glibc: tuple[int, int] | None
) -> dict[str, str] | None:
    """The environment to re-execute in, or None when re-executing would change nothing,
    for a kernel in huge-page ``mode`` and a C library of version ``glibc`` (None: not
    glibc)."""
    if environ.get(OPT_OUT) == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    if mode != "madvise" or glibc is None or glibc < (2, 35):
        return None
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, f"{TUNABLE}=1"])}


def _environment_here(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``huge_pages_environment`` for this machine's kernel and C library."""
    if sys.platform != "linux":
        return None
    return huge_pages_environment(
        environ, mode=transparent_huge_pages_mode(), glibc=glibc_version()
    )


def huge_pages_on(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process's large ``malloc`` blocks get transparent huge pages: the
    kernel gives them to every mapping, or glibc asks for them (the tunable set, not 0)."""
    environ = os.environ if environ is None else environ
    mode = transparent_huge_pages_mode()
    tunables = environ.get("GLIBC_TUNABLES", "").split(":")
    asked = any(t.startswith(f"{TUNABLE}=") and t != f"{TUNABLE}=0" for t in tunables)
    return mode == "always" or (
        mode == "madvise" and asked and (glibc_version() or (0, 0)) >= (2, 35)
    )


def reexec_with_huge_pages() -> None:
    """Replace this process by itself (same pid, arguments and interpreter) with the
    tunable set; returns only when that would change nothing. Call it before any work:
    nothing after the call survives the exec."""
    environ = _environment_here(os.environ)
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def missing_huge_pages_hint(backend: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A line for the run log where a CPU run in a process that did not go through
    ``reexec_with_huge_pages`` (the trainer called from a notebook or a script) would
    gain from the tunable; None elsewhere."""
    if backend != "cpu" or _environment_here(os.environ if environ is None else environ) is None:
        return None
    return (
        "XLA's scratch memory gets 4 KiB pages in this process: start Python with "
        f"GLIBC_TUNABLES={TUNABLE}=1 for a faster CPU step (clipctl run does this itself)"
    )
