"""The SPEC and KEY.PATH=VALUE arguments that several commands share, and reading them.

SPEC is a TOML file or the name of a registered template (``clipctl run quickstart``),
so an installed clipctl runs its templates without a checkout to point at.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import click

from clip_jax.errors import PathError

spec_argument = click.argument("spec", type=click.Path(dir_okay=False), metavar="SPEC|TEMPLATE")
overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY.PATH=VALUE]...")


def resolve_spec(spec: str) -> Path:
    """The file SPEC names: the file itself when it exists, else the template of that
    name. A bare word that is neither is a PathError listing the templates; a missing
    path (``runs/x.toml``) is left to the spec reader, which says "spec file not found"."""
    path = Path(spec)
    if path.exists() or path.suffix or len(path.parts) != 1:
        return path
    from clip_jax.plugins import get_registry

    templates = get_registry().templates
    if spec in templates:
        return templates[spec].path
    names = sorted(templates)
    close = difflib.get_close_matches(path.stem, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise PathError(
        f"no such spec file, and no template of that name{hint} "
        f"(templates: {', '.join(names) or 'none'})",
        key=spec,
    )


def load(spec: str, overrides: tuple[str, ...]) -> Any:
    """The validated spec; a SpecError (every problem, each naming its key or the file's
    line) propagates to the group's one error path. The local files it names are checked
    here too (a missing tokenizer.path or train.init_from run), so that `validate` and
    `show` refuse what `run` would; the library's `validate` stays about the spec itself.
    clip_jax.spec is imported here, not at start-up, so that `clipctl --help` stays
    instant."""
    from clip_jax.spec import SpecError, load_spec
    from clip_jax.spec_checks import local_path_problems

    resolved = load_spec(resolve_spec(spec), overrides)
    problems = local_path_problems(resolved)
    if problems:
        raise SpecError(problems)
    return resolved
