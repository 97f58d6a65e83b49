"""clipctl's run-spec templates, registered through the ``register_templates`` hook.

In a wheel the templates ship inside the package (``clipctl/templates``); in a source
checkout they are the repository's ``templates/`` folder.
"""

from pathlib import Path

import pluggy

hookimpl = pluggy.HookimplMarker("clip_jax")


def templates_dir() -> Path:
    packaged = Path(__file__).parent / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "templates"


@hookimpl
def register_templates(register):
    for path in sorted(templates_dir().glob("*.toml")):
        register(path.stem, path)
