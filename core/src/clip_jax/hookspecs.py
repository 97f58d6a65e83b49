"""Extension points of clip-jax.

Every hook receives a ``register`` callable; a plugin calls it once per component it
adds. The built-in components are registered through these same hooks
(``clip_jax.builtins``), so a third-party package is never a second-class citizen.

``register(name, factory, options=None, description="", presets=None)``:
- ``factory`` builds the component from its validated options (import heavy modules
  such as jax inside it, so that listing and validating stay fast). Factories of losses
  also receive the sharding ``Layout`` (mesh and batch axes): ``factory(options, layout)``;
  sharding strategies receive ``(options, devices=None)``;
- ``options`` is a pydantic model (subclass ``clip_jax.schemas.Options``) that validates
  the component's own keys in its spec table;
- ``presets`` maps a preset name to a dict of option values (``model.preset = "tiny"``).

``register_templates`` is different: ``register(name, path, description="")``.
"""

import pluggy

hookspec = pluggy.HookspecMarker("clip_jax")


@hookspec
def register_architectures(register):
    """Register model architectures (two-tower image-text models).

    The factory is ``factory(options, init_temperature, init_bias)`` and returns a Flax
    module with the CLIP interface (``__call__(images, tokens, train=False)`` giving
    image embeddings, text embeddings, log scale, bias; ``encode_images``,
    ``encode_texts``); ``clip_jax.models.clip.two_tower`` builds one from any two towers.
    The options must have ``vision.image_size``, ``text.context_length`` and
    ``text.vocab_size``: the data pipeline and the tokenizer read them.

    ``formats={"hf": "module:attr"}`` names converters of published checkpoints, each a
    ``clip_jax.pretrained.WeightFormat``: the architecture owns its parameter names, so
    importing (``train.init_from = "hf:PATH"``) and exporting go through it.
    """


@hookspec
def register_losses(register):
    """Register contrastive losses."""


@hookspec
def register_sharding_strategies(register):
    """Register sharding strategies (how parameters and batches map to the mesh)."""


@hookspec
def register_heads(register):
    """Register downstream heads (classification, text fine-tuning, LiT...), chosen by
    ``head.name``.

    The factory is ``factory(options)`` and returns a ``clip_jax.heads.Head`` (subclass
    it): its Flax ``module`` (parameters under ``head/``), the ``towers`` it reads, the
    ``freeze`` patterns it adds, whether it ``needs_labels``, its ``objective`` for the
    train step and ``classify`` for evaluation. ``contrastive`` (no head) is the default.
    """


@hookspec
def register_data_sources(register):
    """Register data sources (where training and validation examples come from)."""


@hookspec
def register_tokenizers(register):
    """Register tokenizers."""


@hookspec
def register_optimizers(register):
    """Register optimizers (an optax transformation built from the spec)."""


@hookspec
def register_templates(register):
    """Register run-spec templates: ``register(name, path, description="")``."""
