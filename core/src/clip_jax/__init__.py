"""clip-jax: train CLIP-style image-text models in JAX.

The package imports nothing heavy at start-up; ``load`` and ``evaluate_run`` pull in
jax when first used.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["load", "evaluate_run", "load_spec", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("load", "evaluate_run"):
        from clip_jax import inference

        return getattr(inference, name)
    if name == "load_spec":
        from clip_jax.spec import load_spec

        return load_spec
    raise AttributeError(name)
