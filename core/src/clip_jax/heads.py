"""Downstream heads: what a run trains on top of (or instead of) the contrastive pair.

A head is chosen in the ``[head]`` table (``name``) and registered through
``register_heads``; its factory takes the validated options and returns a ``Head``:

- ``module``: a Flax module whose parameters live under ``head/`` in the model's tree
  (``Clip.head``, set with ``model.clone(head=...)``), or None;
- ``towers``: the towers it reads, checked against the model before training;
- ``freeze``: parameter-path patterns it adds to ``train.freeze``;
- ``needs_labels``: the train step receives the records' integer labels;
- ``objective(model, loss_fn)``: ``(params, images, tokens, labels, dropout_rng) ->
  (loss, metrics)``, differentiated by the train step; a ``SplitObjective`` (forward
  per example, score on the whole batch) keeps every negative under
  ``train.microbatches``, a plain function gets plain gradient accumulation;
- ``classify(model)``: ``(params, inputs) -> logits`` for evaluation, or None; the
  inputs are images or tokens as ``tower`` says ("vision" or "text").

``contrastive`` (the default) is no head at all: the run trains exactly as without a
``[head]`` table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from clip_jax.errors import UserError
from clip_jax.models.layers import MapHead, make_norm
from clip_jax.schemas import ClassificationHeadOptions, ContrastiveHeadOptions, LitOptions

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
TOWER_METHODS = {"vision": "classify_images", "text": "classify_texts"}


@dataclasses.dataclass(frozen=True)
class SplitObjective:
    """``loss, metrics = score(*forward(params, images, tokens, dropout_rng), labels)``.

    ``forward`` works example by example and returns ``(per_example, shared)``: arrays
    whose leading axis is the batch, and values the whole batch shares (the logit
    scale). ``score`` sees the whole batch. The split is what lets the train step run
    ``forward`` on micro-batches and still score all negatives together
    (``clip_jax.train.microbatch``); calling the objective runs both at once.
    """

    forward: Callable[..., tuple[Any, Any]]
    score: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    # Keyword inputs of ``forward`` with one row per example, split like the batch.
    example_inputs: tuple[str, ...] = ()

    def __call__(self, params, images_BxHxWxC, tokens_BxL, labels_B, dropout_rng, **extras):
        per_example, shared = self.forward(
            params, images_BxHxWxC, tokens_BxL, dropout_rng, **extras
        )
        return self.score(per_example, shared, labels_B)


def contrastive_objective(
    model: nn.Module,
    loss_fn,
    lock: str | None = None,
    aux_terms: Sequence[Any] = (),
    later_terms: Sequence[str] = (),
) -> Objective:
    """The two towers' embeddings scored by the run's contrastive loss. ``lock``: a tower
    run in inference mode whose embeddings pass no gradient (LiT). ``aux_terms``: the
    model's auxiliary terms (``clip_jax.aux_terms.AuxTerm``), each term's reduced value
    added with its weight; the contrastive loss alone is then logged as
    ``loss/contrastive``, each term as ``loss/<name>``.

    Terms that learn from the EMA teacher make ``forward`` take the teacher's parameters
    and a random key per example for its views (``teacher=``, ``view_keys=``).
    ``later_terms``: the names of terms not computed by this objective (the teacher's,
    before they start: ``Components.objective_stages``), logged as 0 so that every
    step's record has the same keys.
    """
    extra = {"lock": lock} if lock else {}  # a plain run calls the model as it always has
    if aux_terms or later_terms:
        extra["aux"] = True
    terms = {term.name: term for term in aux_terms}
    taught = tuple(term.name for term in aux_terms if term.teacher)

    def forward(params, images_BxHxWxC, tokens_BxL, dropout_rng, teacher=None, view_keys=None):
        taught_inputs = {}
        if taught:  # what the student predicts: the teacher's, on the same views
            targets = model.apply(
                {"params": {**params, **teacher}},
                images_BxHxWxC,
                view_keys,
                taught,
                method="teacher_targets",
            )
            taught_inputs = {"targets": jax.lax.stop_gradient(targets), "view_keys_B": view_keys}
        img_emb_BxD, txt_emb_BxD, log_scale, bias, *aux = model.apply(
            {"params": params},
            images_BxHxWxC,
            tokens_BxL,
            train=True,
            rngs={"dropout": dropout_rng},
            **extra,
            **taught_inputs,
        )
        return (img_emb_BxD, txt_emb_BxD, *aux), (log_scale, bias)

    def score(per_example, scale_and_bias, labels_B):
        del labels_B
        (img_emb_BxD, txt_emb_BxD, *aux), (log_scale, bias) = per_example, scale_and_bias
        loss = loss_fn(img_emb_BxD, txt_emb_BxD, log_scale, bias)
        metrics = {"temperature": jnp.exp(log_scale), "logit_bias": bias}
        if aux:
            metrics["loss/contrastive"] = loss
            for name, outputs in aux[0].items():
                term = terms[name]
                if term.reduce is None:
                    values = {key: jnp.mean(value) for key, value in outputs.items()}
                else:
                    values = term.reduce(outputs)
                loss = loss + term.weight * values["loss"]
                metrics |= {f"loss/{name}": values.pop("loss")}
                metrics |= {f"{name}/{key}": value for key, value in values.items()}
            metrics |= {f"loss/{name}": jnp.zeros(()) for name in later_terms}
        return loss, metrics

    return SplitObjective(forward, score, ("view_keys",) if taught else ())


class Head:
    """No head: the base every head refines (and the ``contrastive`` head itself)."""

    name = "contrastive"
    module: nn.Module | None = None
    towers: tuple[str, ...] = ()  # the towers it reads: the model must have them
    tower: str | None = None  # what ``classify`` reads: "vision" (images) or "text" (tokens)
    freeze: tuple[str, ...] = ()
    needs_labels = False
    num_classes: int | None = None

    def attach(self, model: nn.Module, architecture: str) -> nn.Module:
        """``model`` with this head's parameters; a UserError naming ``head.name`` when
        the model lacks the tower the head reads."""
        for tower in self.towers:
            if not isinstance(getattr(model, tower, None), nn.Module):
                raise UserError(
                    f"head.name: {self.name!r} works on the model's {tower} tower, and "
                    f"architecture {architecture!r} has none"
                )
        if self.module is None:
            return model
        if "head" not in getattr(model, "__dataclass_fields__", {}):
            raise UserError(
                f"head.name: {self.name!r} adds parameters to the model, and architecture "
                f"{architecture!r} has no place for them (build it with "
                "clip_jax.models.clip.two_tower)"
            )
        return model.clone(head=self.module)

    def objective(self, model: nn.Module, loss_fn) -> Objective:
        return contrastive_objective(model, loss_fn)

    def classify(self, model: nn.Module) -> Callable[[Any, jax.Array], jax.Array] | None:
        return None


class ClassifierModule(nn.Module):
    """Logits from a tower's pooled output (``linear``) or from attention pooling over its
    tokens (``map``, which normalises the tokens first: they leave the encoder un-normed)."""

    num_classes: int
    tower: str = "vision"  # what it reads: Clip.classify_images or classify_texts
    kind: str = "linear"
    dropout: float = 0.0

    @property
    def uses_tokens(self) -> bool:
        return self.kind == "map"

    @nn.compact
    def __call__(
        self,
        pooled_BxD: jax.Array,
        tokens_BxNxD: jax.Array | None = None,
        valid_BxN: jax.Array | None = None,
        cfg=None,
        train: bool = False,
    ) -> jax.Array:
        x_BxD = pooled_BxD
        if self.kind == "map":
            x_BxD = MapHead(cfg, name="map")(make_norm(cfg, "ln")(tokens_BxNxD), valid_BxN)
        x_BxD = nn.Dropout(self.dropout, deterministic=not train)(x_BxD)
        # Zero-initialised (big_vision's fine-tuning heads): every class starts at log C.
        logits_BxC = nn.Dense(
            self.num_classes,
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
            name="classifier",
        )(x_BxD)
        return logits_BxC.astype(jnp.float32)


class ClassificationHead(Head):
    """Cross-entropy on integer labels from one tower; the other tower, both projections
    and the logit scale/bias are frozen (unused: no optimizer state spent on them)."""

    needs_labels = True

    def __init__(self, name: str, tower: str, options: ClassificationHeadOptions):
        self.name, self.tower, self.towers, self.options = name, tower, (tower,), options
        self.num_classes = options.num_classes
        self.module = ClassifierModule(options.num_classes, tower, options.kind, options.dropout)
        self.freeze = (f"(?!({tower}|head)/).*",)  # everything but this tower and the head

    def objective(self, model: nn.Module, loss_fn) -> Objective:
        del loss_fn
        method, smoothing = TOWER_METHODS[self.tower], self.options.label_smoothing
        classes = self.num_classes

        def forward(params, images_BxHxWxC, tokens_BxL, dropout_rng):
            inputs = images_BxHxWxC if self.tower == "vision" else tokens_BxL
            logits_BxC = model.apply(
                {"params": params}, inputs, train=True, method=method, rngs={"dropout": dropout_rng}
            )
            return logits_BxC, ()

        def score(logits_BxC, shared, labels_B):
            del shared
            known_B = (labels_B >= 0).astype(jnp.float32)  # -1: a record without a label
            targets_BxC = optax.smooth_labels(jax.nn.one_hot(labels_B, classes), smoothing)
            per_example_B = optax.softmax_cross_entropy(logits_BxC, targets_BxC)
            count = jnp.maximum(known_B.sum(), 1.0)
            hits_B = (jnp.argmax(logits_BxC, axis=-1) == labels_B).astype(jnp.float32)
            loss = (per_example_B * known_B).sum() / count
            return loss, {"train_top1": (hits_B * known_B).sum() / count}

        return SplitObjective(forward, score)

    def classify(self, model: nn.Module):
        method = TOWER_METHODS[self.tower]
        return lambda params, inputs: model.apply({"params": params}, inputs, method=method)


class LitHead(Head):
    """Locked-image tuning (Zhai et al. 2022): the contrastive loss with one tower locked,
    its parameters (and its projection) frozen, run in inference mode, its embeddings
    stop-gradient'ed so that no backward work is spent on it."""

    name = "lit"
    towers = ("vision", "text")

    def __init__(self, options: LitOptions):
        self.lock = options.lock
        self.freeze = (f"({options.lock}|{options.lock}_proj)/.*",)

    def objective(self, model: nn.Module, loss_fn) -> Objective:
        return contrastive_objective(model, loss_fn, lock=self.lock)


# ----------------------------------------------------------------- the factories
def contrastive(options: ContrastiveHeadOptions) -> Head:
    del options
    return Head()


def image_classification(options: ClassificationHeadOptions) -> Head:
    return ClassificationHead("image_classification", "vision", options)


def text_classification(options: ClassificationHeadOptions) -> Head:
    return ClassificationHead("text_classification", "text", options)


def lit(options: LitOptions) -> Head:
    return LitHead(options)
