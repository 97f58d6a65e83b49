"""Errors that are the user's to fix: the CLI prints them as one clear message.

Raise a ``UserError`` (or a subclass) where a mistake is detected, with ``key`` naming
what to fix: the dotted spec key (``sharding.mesh``), a file or folder, or a command-line
option (``--data``). ``clipctl`` prints every problem as ``error: <key>: <message>`` and
exits 2 in one place; the TUI shows the same text. Anything else is a bug in clip-jax
and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the spec, the run folder or the data, not a bug in clip-jax.

    ``str()`` is ``"<key>: <message>"`` (just the message without a key), so code that
    only passes the text on (logs, subprocess answers, notifications) keeps the key.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        self.message = str(message)
        self.key = key or None
        # (key, message) pairs, one per printed line; "" when the key is unknown.
        self.problems: list[tuple[str, str]] = [(key or "", self.message)]
        super().__init__(f"{key}: {self.message}" if key else self.message)


class PathError(UserError):
    """A file, folder or glob the user named is missing, unreadable or of the wrong kind."""


class MeshError(UserError):
    """A device mesh that cannot be laid out on the devices there are (``sharding.mesh``)."""


class PluginError(UserError):
    """A component name no plugin registers (the message suggests close names)."""


class RunFolderError(UserError):
    """A run folder that is missing, moved, or in a state that refuses the action."""


def format_problems(error: UserError) -> list[str]:
    """The lines ``clipctl`` prints for an error: ``<key>: <message>`` or the message."""
    return [f"{printable(key)}: {message}" if key else message for key, message in error.problems]


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\x1e``), so
    that a key the user typed by accident (a TOML quoted key can hold anything) stays
    on its line and visible."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
