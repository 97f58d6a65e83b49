"""The train state, created already sharded, and the jit train step.

The state is a plain dict ``{"step", "params", "opt_state"}`` (plus ``"teacher"``, the
EMA teacher of ``clip_jax.train.teacher``, when an auxiliary term learns from one). Its
shardings come from the parameters' logical axis names and the strategy's rules, and
``jax.jit`` with ``out_shardings`` materialises it directly in place: no device ever
holds a full copy unless the strategy replicates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_jax.errors import UserError
from clip_jax.sharding import Layout
from clip_jax.train import guards
from clip_jax.train.microbatch import cached_value_and_grad
from clip_jax.train.teacher import TeacherSchedule, follow, teacher_keys, teacher_of

State = dict[str, Any]
VIEWS = 0x5E1F  # folded into a step's dropout key: the keys of its self-supervised views


def dummy_inputs(spec) -> tuple[jax.Array, jax.Array]:
    v, t = spec.model.vision, spec.model.text
    return (
        jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32),
        jnp.zeros((1, t.context_length), jnp.int32),
    )


def param_shapes(model: nn.Module, spec) -> Any:
    """The model's parameters as boxed shapes and dtypes: nothing allocated, no mesh."""
    images, tokens = dummy_inputs(spec)
    return jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]


def param_name(path) -> str:
    """``vision/encoder/block_0/...`` from a pytree key path, for messages."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def state_shardings(model: nn.Module, tx, layout: Layout, spec) -> tuple[Callable, Any, Any]:
    """(init function, abstract unboxed state, shardings) for this model and layout."""
    images, tokens = dummy_inputs(spec)
    keys = teacher_keys(model)

    def boxed_init(rng: jax.Array) -> State:
        params = model.init(rng, images, tokens)["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        if keys:
            state["teacher"] = teacher_of(params, keys)
        return state

    abstract_boxed = jax.eval_shape(boxed_init, jax.random.key(0))
    logical = nn.get_partition_spec(abstract_boxed)
    check_divisible(abstract_boxed["params"], layout)
    with layout.mesh:
        shardings = nn.logical_to_mesh_sharding(logical, layout.mesh, layout.rules)
    abstract = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        nn.unbox(abstract_boxed),
        shardings,
    )

    def init(rng: jax.Array) -> State:
        return nn.unbox(boxed_init(rng))

    return init, abstract, shardings


def check_divisible(boxed_params: Any, layout: Layout) -> None:
    """A clear error when a split parameter axis does not divide over its mesh axis."""
    rules = dict(layout.rules)
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    for path, leaf in leaves:
        if not isinstance(leaf, nn.Partitioned):
            continue
        for size, name in zip(leaf.value.shape, leaf.names, strict=True):
            mesh_axis = rules.get(name)
            if mesh_axis is None:
                continue
            axes = mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,)
            devices = int(np.prod([layout.mesh.shape[a] for a in axes]))
            if size % devices:
                raise UserError(
                    f"parameter {param_name(path)}: its {name!r} axis ({size}) cannot be split over "
                    f"sharding.mesh.{'/'.join(axes)} ({devices} devices); change the model "
                    "size or the mesh"
                )


def create_state(init: Callable, shardings: Any, seed: int) -> State:
    """A freshly initialised state, materialised in place on ``state_shardings``'s layout."""
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def make_train_step(
    model: nn.Module,
    loss_fn,
    tx,
    schedule,
    shardings,
    layout: Layout,
    seed: int = 0,
    objective: Callable | None = None,
    microbatches: int = 1,
    guard=None,
    teacher: TeacherSchedule | None = None,
) -> Callable:
    """``train_step(state, images, tokens, labels=None) -> (state, metrics)``.

    ``objective``: ``(params, images, tokens, labels, dropout_rng) -> (loss, metrics)``,
    a head's (``clip_jax.heads``); by default the contrastive loss on both towers.
    ``microbatches``: computed over that many micro-batches (``train.microbatch``).
    ``guard``: ``train.spike``'s options; the state then has a ``"guard"`` entry
    (``guards.create_guard``) and an update with a non-finite or spiking loss or gradient
    norm is dropped on the device (``clip_jax.train.guards``).
    ``teacher``: the EMA teacher's schedule (``clip_jax.train.teacher``): the teacher
    follows the updated parameters, and an objective whose terms learn from it reads
    ``state["teacher"]`` and a random key per example for its views.
    """
    if objective is None:
        from clip_jax.heads import contrastive_objective

        objective = contrastive_objective(model, loss_fn)
    reads_teacher = "view_keys" in getattr(objective, "example_inputs", ())
    if microbatches > 1:
        value_and_grad = cached_value_and_grad(objective, microbatches)
    else:
        value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: State, images_BxHxWxC: jax.Array, tokens_BxL: jax.Array, labels_B=None):
        # Trace under the mesh and the logical rules: activation constraints apply.
        with layout.activate():
            return _train_step(state, images_BxHxWxC, tokens_BxL, labels_B)

    def _train_step(state: State, images_BxHxWxC, tokens_BxL, labels_B):
        # Dropout masks differ per step and are the same on every topology and resume.
        dropout_rng = jax.random.fold_in(jax.random.key(seed), state["step"])

        inputs = (images_BxHxWxC, tokens_BxL, labels_B, dropout_rng)
        extras = {}
        if reads_teacher:  # and a key per example for its views
            views_rng = jax.random.fold_in(dropout_rng, VIEWS)
            keys_B = jax.random.split(views_rng, tokens_BxL.shape[0])
            extras = {"teacher": state["teacher"], "view_keys": keys_B}
        (loss, head_metrics), grads = value_and_grad(state["params"], *inputs, **extras)
        metrics = {
            "loss": loss,
            "learning_rate": schedule(state["step"]),
            "grad_norm": optax.global_norm(grads),
            **head_metrics,
        }
        new_state = {"step": state["step"] + 1}  # a skipped step counts: its batch is used
        if guard is None:
            new_state["params"], new_state["opt_state"] = update(grads, state)
        else:
            ok, event, new_state["guard"] = guards.judge(
                state["guard"], loss, metrics["grad_norm"], guard
            )
            # A branch, not a select of both: a skipped update costs nothing, an applied
            # one stays in place (a select reads and writes the whole state once more).
            keep = lambda grads, state: (state["params"], state["opt_state"])  # noqa: E731
            new_state["params"], new_state["opt_state"] = jax.lax.cond(
                ok, update, keep, grads, state
            )
            metrics |= guards.guard_metrics(new_state["guard"], event)
        if teacher is not None:
            new_state["teacher"] = follow(
                state["teacher"], new_state["params"], state["step"], teacher
            )
        return new_state, metrics

    def update(grads, state: State) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return optax.apply_updates(state["params"], updates), opt_state

    return jax.jit(train_step, out_shardings=(shardings, None), donate_argnums=0)


@dataclass(frozen=True)
class StagedStep:
    """``(state, images, tokens[, labels], step=N) -> (state, metrics)``: the train step
    as one compiled program per stage of the run (``Components.objective_stages``).

    The EMA teacher's terms start at a step known in advance, so the steps before are
    compiled without them. A ``lax.cond`` on the step in one program would cost more:
    under differentiation it kept memory for both branches, and before the start the
    step still ran ~2x slower than without the terms (measured on CPU). A stage is
    compiled when first used. ``step``: the state's step, which the loop knows on the
    host (read from the state, a device sync, when not given).
    """

    stages: tuple[tuple[int, Callable], ...]  # (first step, jitted step), ascending

    def __call__(self, state: State, *inputs, step: int | None = None):
        if len(self.stages) > 1 and step is None:
            step = int(state["step"])
        return self.at(step or 0)(state, *inputs)

    def at(self, step: int) -> Callable:
        return [program for start, program in self.stages if start <= step][-1]

    def lower(self, *args):
        """The last stage (every term on: the most work and memory), lowered."""
        return self.stages[-1][1].lower(*args)


def make_staged_train_step(stages: Sequence[tuple[int, Callable]], **options) -> StagedStep:
    """A ``StagedStep`` of ``make_train_step(objective=..., **options)`` per stage."""
    return StagedStep(
        tuple(
            (start, make_train_step(objective=objective, **options)) for start, objective in stages
        )
    )


def make_encoders(model: nn.Module) -> tuple[Callable, Callable]:
    """jit-compiled (params, images) -> image embeddings and (params, tokens) -> text's."""
    encode_images = jax.jit(
        lambda params, images: model.apply({"params": params}, images, method="encode_images")
    )
    encode_texts = jax.jit(
        lambda params, tokens: model.apply({"params": params}, tokens, method="encode_texts")
    )
    return encode_images, encode_texts
