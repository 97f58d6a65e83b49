"""clipctl's run-spec templates, registered through the ``register_templates`` hook.

The repository's top-level ``templates/`` folder is their one copy. In a checkout (and
an editable install) they are read from there; the sdist and the wheel carry them,
the wheel inside the package as ``clipctl/templates`` (``clipctl/hatch_build.py``).
"""

from pathlib import Path

import pluggy

hookimpl = pluggy.HookimplMarker("clip_jax")


def templates_dir() -> Path:
    """Where the templates are: inside the installed package, else the checkout's."""
    packaged = Path(__file__).parent / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "templates"


@hookimpl
def register_templates(register):
    for path in sorted(templates_dir().glob("*.toml")):
        register(path.stem, path)
