"""clip-jax plugin: architecture ``convnext_clip``, a ConvNeXt image tower + the text tower.

Registered through the same hook as the built-in ``clip`` architecture. The factory is
``lazy`` so that ``clipctl validate`` and ``clipctl plugins`` never import jax.
"""

from clip_jax.plugins import hookimpl, lazy
from clip_jax_convnext.options import PRESETS, ConvNextClipOptions


@hookimpl
def register_architectures(register):
    register(
        "convnext_clip",
        lazy("clip_jax_convnext.model:build"),
        options=ConvNextClipOptions,
        description="ConvNeXt image tower (no patches, no attention) + transformer text tower",
        presets=PRESETS,
    )
