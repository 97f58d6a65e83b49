"""The one place where clipctl turns errors into what people read, and exit codes.

A ``clip_jax.errors.UserError`` (raised where the mistake is detected: spec, paths,
globs, tokenizer, mesh, plugin, run folder, options) is printed as one
``error: <key>: <message>`` line per problem, exit 2. A ``CommandFailed`` (an outcome,
not a mistake: a wait that timed out, a subprocess that failed) is one line, exit 1.
Anything else is a bug in clip-jax and keeps its traceback (exit 1).
"""

from __future__ import annotations

from typing import Any

import click

from clip_jax.errors import UserError, format_problems

EXIT_USER_ERROR = 2
EXIT_FAILED = 1


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
