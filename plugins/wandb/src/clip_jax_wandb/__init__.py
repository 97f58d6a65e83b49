"""clip-jax plugin: the ``wandb`` logger (Weights & Biases experiment tracking).

Registered through the same ``register_loggers`` hook as the built-in ``jsonl`` and
``tensorboard`` loggers. The factory is ``lazy``: ``clipctl plugins`` and ``clipctl
validate`` never import wandb.
"""

from clip_jax.plugins import hookimpl, lazy
from clip_jax_wandb.options import WandbOptions

# The hookspec version this plugin is written against (clip_jax.hookspecs).
CLIP_JAX_HOOKSPEC = ">=2"


@hookimpl
def register_loggers(register):
    register(
        "wandb",
        lazy("clip_jax_wandb.logger:wandb_logger"),
        options=WandbOptions,
        description="Weights & Biases: metrics, spec, parameter counts and machine "
        "(mode offline: nothing sent)",
    )
