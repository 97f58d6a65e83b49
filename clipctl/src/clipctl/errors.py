"""The one place where clipctl turns errors into what people read, and exit codes.

A ``clip_jax.errors.UserError`` (raised where the mistake is detected: spec, paths,
globs, tokenizer, mesh, plugin, run folder, options) is printed as one
``error: <key>: <message>`` line per problem, exit 2. A ``CommandFailed`` (an outcome,
not a mistake: a wait that timed out, a subprocess that failed) is one line, exit 1.
Anything else is a bug in clip-jax and keeps its traceback (exit 1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, NoReturn

import click

from clip_jax.errors import UserError, format_problems

EXIT_USER_ERROR = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

# Set by `claim_process` (clipctl's `main`): this process is clipctl's own, so an
# interrupted command may end it at once (`exit_interrupted`). A caller that invokes the
# group in its own process (CliRunner) goes on after the command: it gets a SystemExit.
_own_process = False

# Commands that run XLA programs (compiled in jax's threads, which outlive a Ctrl-C).
EXECUTES_PROGRAMS = frozenset({"run", "eval", "predict", "caption"})


def claim_process() -> None:
    """This process is clipctl's: an interrupted command may leave it with ``os._exit``."""
    global _own_process
    _own_process = True


class CommandFailed(Exception):
    """The command could not do what was asked, through nobody's mistake in the input."""


def echo_error(line: str) -> None:
    """One ``error: ...`` line on stderr (red ``error:`` on a terminal)."""
    click.secho("error: ", fg="red", bold=True, err=True, nl=False)
    click.echo(line, err=True)


def report(error: UserError | CommandFailed) -> int:
    """Print the error's lines and return the exit code it calls for."""
    if isinstance(error, UserError):
        for line in format_problems(error):
            echo_error(line)
        return EXIT_USER_ERROR
    echo_error(str(error))
    return EXIT_FAILED


class ClipctlGroup(click.Group):
    """A click group whose commands (nested groups included) share one error path."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UserError, CommandFailed) as exc:
            ctx.exit(report(exc))
        except KeyboardInterrupt:
            if ctx.invoked_subcommand not in EXECUTES_PROGRAMS:
                raise  # click's "Aborted!"
            click.echo("interrupted", err=True)
            exit_interrupted()


def exit_interrupted() -> NoReturn:
    """Exit 130 without the interpreter's teardown.

    A Ctrl-C or SIGTERM that lands while XLA compiles (the first step, the state's
    initialisation; a second Ctrl-C during the stop) interrupts jaxlib's wait for the
    compilation, not the compilation: that goes on in the client's thread pool. The
    teardown then frees the jax client under it (the final garbage collection destroys
    the PjRtClient, whose compile thread reads a device already gone), and the process
    died of a segmentation fault, exit 139, after saying it had stopped. Those threads
    cannot be waited for, so the process leaves with ``os._exit``, as the stop watcher's
    hard quit does (``clip_jax.train.signals``); ``clipctl eval``, ``predict`` and
    ``caption`` leave the same way (``ClipctlGroup``).

    Nothing is lost: by now ``train`` has left its ``with`` blocks, so status.json says
    "interrupted" (written at once, also on a URL), the checkpoint manager is closed (a
    save in flight committed: ``Checkpoints.close`` waits for it, again after a second
    Ctrl-C broke its first wait; a third one there leaves it unfinished, and orbax
    renames a checkpoint into place only once it is whole, so the ones before it stand),
    the batch thread is stopped and the loggers closed on the stop event. What an
    ordinary exit would still do is done here: lines appended to run files on a URL
    written (storage's atexit flush), a multi-process run's jax.distributed shutdown
    (jax's atexit: the others are not left waiting for this process at its barrier), log
    handlers and stdout/stderr flushed."""
    if not _own_process:
        sys.exit(EXIT_INTERRUPTED)
    try:
        from clip_jax import storage

        storage.flush_at_exit()  # the atexit hook that os._exit skips
        jax = sys.modules.get("jax")
        if jax is not None:
            with contextlib.suppress(Exception):  # as jax's own atexit shutdown would
                jax.distributed.shutdown()  # a no-op in a single-process run
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe
                stream.flush()
    finally:  # another Ctrl-C meanwhile still exits 130
        os._exit(EXIT_INTERRUPTED)
