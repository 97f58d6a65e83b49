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

Versions: ``HOOKSPEC_VERSION`` grows by one whenever a hook is added or a factory's
signature changes. A plugin states the versions it works with as a module (or plugin
object) attribute, ``CLIP_JAX_HOOKSPEC = ">=2"``: comma-separated comparisons
(``>=``, ``>``, ``<=``, ``<``, ``==``, ``!=``) with whole numbers, such as ``">=2,<4"``
or ``"==2"``; a bare number (``2`` or ``"2"``) means ``">=2"``.
A plugin whose specifier this clip-jax does not satisfy is not loaded: ``clipctl
plugins`` lists it as broken with the version it needs. A plugin without the attribute
is loaded (it predates versions, and hooks are only ever added).

Version history: 1, the component hooks and templates; 2, ``register_loggers``;
3, ``register_aux_losses``.
"""

import pluggy

HOOKSPEC_VERSION = 3

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
def register_aux_losses(register):
    """Register auxiliary objectives, the ``[[loss.aux]]`` terms added to the main loss
    (captioning...). The factory is ``factory(options, spec)`` and returns a
    ``clip_jax.aux_terms.AuxTerm``: a Flax module, called with the image tower's token
    sequence and the captions' tokens, that returns per-example values ``{"loss": B,
    <metric>: B}``; its parameters live under ``aux_<name>/``. Options subclass
    ``clip_jax.aux_terms.AuxOptions`` (which has ``weight``)."""


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
    """Register data sources (where training and validation examples come from).

    The factory is ``factory(options)`` and returns a ``clip_jax.data.sources.DataSource``;
    its ``record_format`` (a ``clip_jax.data.formats.RecordFormat``, TFRecord by default)
    says how its shards are read. ``formats={"NAME": "module:attr"}`` names the record
    formats it brings, which ``clipctl data synth --format NAME`` can write.
    """


@hookspec
def register_tokenizers(register):
    """Register tokenizers."""


@hookspec
def register_optimizers(register):
    """Register optimizers (an optax transformation built from the spec)."""


@hookspec
def register_templates(register):
    """Register run-spec templates: ``register(name, path, description="")``."""


@hookspec
def register_loggers(register):
    """Register experiment loggers (trackers), chosen by ``logging.loggers`` (any number).

    The factory is ``factory(options, run)``: ``options`` are the validated
    ``[logging.<name>]`` table, ``run`` a ``clip_jax.train.loggers.RunContext`` (the run's
    ``name``, its ``folder`` path, the resolved ``spec`` as plain data and the ``steps``
    to train). It returns a
    ``clip_jax.train.events.Subscriber`` whose ``on_<event>`` methods log: ``on_run_info``
    (once: the resolved spec, parameter counts and the machine), ``on_step`` (train
    records), ``on_eval`` (evaluation results), ``on_rollback`` (a guard went back to an
    earlier checkpoint: the steps after it come again), and ``on_finish`` / ``on_stop``
    / ``on_failure``, which end the run: flush and close there, idempotently, since a
    stop can be followed by a failure (an error while stopping).

    Only the main process builds loggers. A factory or event method that raises is
    reported once in run.log and the logger is switched off; the run goes on.
    """
