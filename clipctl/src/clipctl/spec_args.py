"""The SPEC and KEY.PATH=VALUE arguments that several commands share, and reading them."""

from __future__ import annotations

from typing import Any

import click

spec_argument = click.argument("spec", type=click.Path(dir_okay=False))
overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY.PATH=VALUE]...")


def load(spec_path: str, overrides: tuple[str, ...]) -> Any:
    """The validated spec; a SpecError (every problem, each naming its key or the file's
    line) propagates to the group's one error path. clip_jax.spec is imported here, not
    at start-up, so that `clipctl --help` stays instant."""
    from clip_jax.spec import load_spec

    return load_spec(spec_path, overrides)
