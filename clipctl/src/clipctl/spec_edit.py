"""Editing a TOML spec in place with tomlkit, so a template's comments survive a save."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import Table
from tomlkit.toml_document import TOMLDocument

MISSING = object()


def load_document(path: str | Path) -> TOMLDocument:
    """The spec as an editable document; a missing or malformed file is a PathError naming
    the file (and the line), which the TUI shows instead of closing."""
    from tomlkit.exceptions import ParseError

    from clip_jax.errors import PathError

    try:
        return tomlkit.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PathError(f"cannot read the spec: {reason}", key=str(path)) from None
    except ParseError as exc:
        what = str(exc).split(" at line ")[0]
        column = exc.col + 1  # tomlkit counts from 0; `clipctl validate` (tomllib) from 1
        raise PathError(
            f"line {exc.line}, column {column}: not valid TOML: {what}", key=str(path)
        ) from None


def get_value(doc: TOMLDocument, path: str, default: Any = MISSING) -> Any:
    node: Any = doc
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node.unwrap() if hasattr(node, "unwrap") else node


def set_value(doc: TOMLDocument, path: str, value: Any) -> None:
    """Set ``a.b.c = value``, creating tables as needed (kept as [a.b] sections)."""
    keys = path.split(".")
    node: Any = doc
    for key in keys[:-1]:
        if key not in node or not isinstance(node[key], dict):
            node[key] = tomlkit.table()
        node = node[key]
    node[keys[-1]] = value


def remove_value(doc: TOMLDocument, path: str) -> None:
    keys = path.split(".")
    node: Any = doc
    for key in keys[:-1]:
        if key not in node:
            return
        node = node[key]
    if isinstance(node, (dict, Table)) and keys[-1] in node:
        del node[keys[-1]]


def parse_input(text: str) -> Any:
    """A form field's text, read like a command-line override: TOML value, else string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def as_dict(doc: TOMLDocument) -> dict[str, Any]:
    return doc.unwrap()


def dumps(doc: TOMLDocument) -> str:
    return tomlkit.dumps(doc)
