"""SigLIP 2's last-stage terms: self-distillation (SILC) and masked prediction (TIPS).

Both learn from an EMA teacher of the image tower (``clip_jax.train.teacher``), switched
on at ``start_fraction`` of training. The teacher sees one global view of each image (a
random crop of 40-100% of its area, at the model's resolution); the student sees

- ``self_distillation``: ``local_crops`` small crops (5-40% of the area at
  ``local_size`` px, fed as NaFlex patch sequences so the learned positions are
  resampled to their grid) and predicts, from each, the teacher's pooled features of
  the global view;
- ``masked_prediction``: the same global view with ``mask_ratio`` of its patch
  embeddings replaced by a learned mask token, and predicts the teacher's features of
  the masked patches.

Features are compared through DINO-style projection heads (MLP, L2-normalised
bottleneck, cosine similarity to learned prototypes): the teacher's head is the EMA of
the student's. The teacher's outputs are turned into targets by Sinkhorn-Knopp over the
whole batch (DINOv2), which keeps them from collapsing without any running state; that
couples the batch, so the terms reduce their outputs themselves (``AuxTerm.reduce``),
after ``train.microbatches`` puts the batch back together. The heads' outputs stay
factored (features and prototypes, ``Projected``): the reduction forms the (rows, K)
logits a chunk of rows at a time, in passes for Sinkhorn-Knopp and under
``jax.checkpoint`` for the student's cross-entropy, so its memory does not grow with the
batch's rows x K (``clip_jax.models.distillation``).

The heads exist from the first step (the state's shape never changes) and receive
gradients only once their term is on (the steps before are compiled without the terms,
``train.state.StagedStep``); the paper initialises them at that point.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.aux_terms import AuxTerm, MaskedPredictionOptions, SelfDistillationOptions
from clip_jax.models.distillation import Projected, distillation_values
from clip_jax.models.layers import dense_init, zeros
from clip_jax.models.naflex import NaflexImages

GLOBAL_SCALE = (0.4, 1.0)  # SILC's global crops: share of the image's area
_GLOBAL, _LOCAL, _MASK = 0, 1, 2  # what each random key of a step's views is for


class TowerOutputs(NamedTuple):
    pooled_BxD: jax.Array  # the image tower's pooled features (before the projection)
    tokens_BxTxD: jax.Array  # its encoder's output sequence


# A callable the model hands to the terms: (images, train, masked=None) -> TowerOutputs.
RunTower = Callable[..., TowerOutputs]


def random_crops(
    images_BxHxWxC: jax.Array,
    keys_B: jax.Array,
    count: int,
    size: int,
    scale: tuple[float, float],
) -> jax.Array:
    """(B * count, size, size, C): random resized crops (Inception-style: area share in
    ``scale``, aspect ratio 3/4..4/3) with random horizontal flips, image-major. Each
    image's crops come from its own key: the same whatever batch it is part of."""
    batch, height, width, channels = images_BxHxWxC.shape

    def crops_of(image_HxWxC, key):
        k_area, k_ratio, k_y, k_x, k_flip = jax.random.split(key, 5)
        area = jax.random.uniform(k_area, (count,), minval=scale[0], maxval=scale[1])
        ratio = jnp.exp(jax.random.uniform(k_ratio, (count,), minval=-0.2877, maxval=0.2877))
        h = jnp.minimum(jnp.sqrt(area / ratio), 1.0)  # as shares of the image's sides
        w = jnp.minimum(jnp.sqrt(area * ratio), 1.0)
        y0 = jax.random.uniform(k_y, (count,)) * (1.0 - h) * height
        x0 = jax.random.uniform(k_x, (count,)) * (1.0 - w) * width
        scale_y, scale_x = size / (h * height), size / (w * width)
        scales = jnp.stack([scale_y, scale_x], -1)
        shifts = jnp.stack([-y0 * scale_y, -x0 * scale_x], -1)

        def crop(scale_2, shift_2):
            return jax.image.scale_and_translate(
                image_HxWxC.astype(jnp.float32),
                (size, size, channels),
                (0, 1),
                scale_2,
                shift_2,
                "linear",
            )

        crops = jax.vmap(crop)(scales, shifts)
        flip = jax.random.bernoulli(k_flip, 0.5, (count,))[:, None, None, None]
        return jnp.where(flip, crops[:, :, ::-1], crops)

    crops = jax.vmap(crops_of)(images_BxHxWxC, keys_B)
    return crops.reshape(batch * count, size, size, channels).astype(images_BxHxWxC.dtype)


def fold(keys_B: jax.Array, purpose: int) -> jax.Array:
    """Each example's key for one purpose (a view, the mask)."""
    return jax.vmap(lambda key: jax.random.fold_in(key, purpose))(keys_B)


def global_view(images_BxHxWxC: jax.Array, keys_B: jax.Array) -> jax.Array:
    """The step's one global view of each image, at the images' own size: the teacher
    reads it, and the masked-prediction student reads it too (the same keys: the same
    view)."""
    size = images_BxHxWxC.shape[1]
    return random_crops(images_BxHxWxC, fold(keys_B, _GLOBAL), 1, size, GLOBAL_SCALE)


def square_patches(images_BxHxWxC: jax.Array, patch: int) -> NaflexImages:
    """Square images as NaFlex sequences (patches in ``naflex.patchify``'s order): a ViT
    with a learned position table for another size reads them with resampled positions."""
    batch, height, width, channels = images_BxHxWxC.shape
    rows, cols = height // patch, width // patch
    grid = images_BxHxWxC.reshape(batch, rows, patch, cols, patch, channels)
    patches = grid.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, -1)
    grid_Bx2 = jnp.broadcast_to(jnp.array([rows, cols], jnp.int32), (batch, 2))
    return NaflexImages(patches, grid_Bx2, jnp.ones((batch, rows * cols), jnp.bool_))


def l2_normalize(x: jax.Array) -> jax.Array:
    """Unit vectors along the last axis, in float32 (cosines need the precision)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class ProjectionHead(nn.Module):
    """DINO's head: MLP -> L2-normalised bottleneck, compared by cosine to ``prototypes``
    unit vectors (weight-normalised last layer). Returns both factors of the logits
    (which lie in [-1, 1]), with the features over the input's leading axes."""

    hidden: int
    bottleneck: int
    prototypes: int

    @nn.compact
    def __call__(self, x_NxD: jax.Array) -> Projected:
        norm_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
        x = nn.LayerNorm(scale_init=norm_init, bias_init=zeros(("embed",)), name="norm")(
            x_NxD.astype(jnp.float32)
        )
        dense = partial(nn.Dense, bias_init=zeros(("mlp",)))
        x = nn.gelu(dense(self.hidden, kernel_init=dense_init(("embed", "mlp")), name="fc1")(x))
        x = nn.gelu(dense(self.hidden, kernel_init=dense_init((None, "mlp")), name="fc2")(x))
        z = nn.Dense(
            self.bottleneck,
            kernel_init=dense_init(("mlp", None)),
            bias_init=zeros((None,)),
            name="bottleneck",
        )(x)
        prototypes_KxE = self.param(
            "prototypes",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", None)),
            (self.prototypes, self.bottleneck),
        )
        return Projected(l2_normalize(z), l2_normalize(prototypes_KxE))


def by_example(projected: Projected, batch: int) -> Projected:
    """The features as (B, R, E): each example's rows together (image-major)."""
    features = projected.features_BxRxE
    return projected._replace(features_BxRxE=features.reshape(batch, -1, features.shape[-1]))


def _as_outputs(role: str, projected: Projected) -> dict[str, jax.Array]:
    """A term's outputs for ``AuxTerm.reduce``: the features by example, and the
    prototypes (the same for every example) as one (1, K, E) row, which
    ``train.microbatches`` stacks, an equal copy per micro-batch (``_projected`` reads
    the first: the gradient reaches the parameters through that micro-batch)."""
    return {role: projected.features_BxRxE, f"{role}_prototypes": projected.prototypes_KxE[None]}


def _projected(outputs: dict[str, jax.Array], role: str) -> Projected:
    """The inverse of ``_as_outputs``, on the outputs of the whole batch."""
    return Projected(outputs[role], outputs[f"{role}_prototypes"][0])


class SelfDistillationTerm(nn.Module):
    """Local crops (student) predict the teacher's pooled features of the global view."""

    options: SelfDistillationOptions
    local_size: int
    patch_size: int
    as_patches: bool  # local crops as NaFlex sequences (a learned square position table)
    learns_from_teacher = True

    def setup(self) -> None:
        o = self.options
        self.head = ProjectionHead(o.head_hidden, o.bottleneck, o.prototypes)

    def targets(self, teacher: TowerOutputs, view_keys_B: jax.Array) -> dict[str, jax.Array]:
        batch = teacher.pooled_BxD.shape[0]  # one row per image: (B, 1, E)
        return _as_outputs("teacher", by_example(self.head(teacher.pooled_BxD), batch))

    def __call__(
        self,
        tower: RunTower,
        images_BxHxWxC: jax.Array,
        targets: dict | None,
        view_keys_B: jax.Array,
        train: bool,
    ) -> dict[str, jax.Array]:
        o, batch = self.options, images_BxHxWxC.shape[0]
        keys_B = fold(view_keys_B, _LOCAL)
        crops = random_crops(images_BxHxWxC, keys_B, o.local_crops, self.local_size, o.local_scale)
        inputs = square_patches(crops, self.patch_size) if self.as_patches else crops
        student = by_example(self.head(tower(inputs, train).pooled_BxD), batch)  # (B, V, E)
        outputs = _as_outputs("student", student)
        return outputs if targets is None else outputs | targets


class MaskedPredictionTerm(nn.Module):
    """The masked global view's patch features (student) predict the teacher's."""

    options: MaskedPredictionOptions
    patches: int  # of the global view
    prefix: int  # tokens before the patches (a class token)
    width: int
    learns_from_teacher = True

    def setup(self) -> None:
        o = self.options
        self.head = ProjectionHead(o.head_hidden, o.bottleneck, o.prototypes)
        self.mask_token = self.param(
            "mask_token",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (self.width,),
        )

    @property
    def masked_count(self) -> int:
        return max(1, round(self.patches * self.options.mask_ratio))

    def _masked(self, view_keys_B: jax.Array) -> jax.Array:
        """(B, M) indices of the masked patches: the same for teacher and student."""
        draw = lambda key: jax.random.uniform(key, (self.patches,))  # noqa: E731
        scores_BxN = jax.vmap(draw)(fold(view_keys_B, _MASK))
        return jax.lax.top_k(scores_BxN, self.masked_count)[1]

    def _pick(self, tokens_BxTxD: jax.Array, index_BxM: jax.Array) -> jax.Array:
        patches_BxNxD = tokens_BxTxD[:, self.prefix : self.prefix + self.patches]
        return jnp.take_along_axis(patches_BxNxD, index_BxM[..., None], axis=1)

    def targets(self, teacher: TowerOutputs, view_keys_B: jax.Array) -> dict[str, jax.Array]:
        index_BxM = self._masked(view_keys_B)
        return _as_outputs("teacher", self.head(self._pick(teacher.tokens_BxTxD, index_BxM)))

    def __call__(
        self,
        tower: RunTower,
        images_BxHxWxC: jax.Array,
        targets: dict | None,
        view_keys_B: jax.Array,
        train: bool,
    ) -> dict[str, jax.Array]:
        batch = images_BxHxWxC.shape[0]
        index_BxM = self._masked(view_keys_B)
        mask_BxN = jnp.zeros((batch, self.patches), jnp.bool_)
        mask_BxN = mask_BxN.at[jnp.arange(batch)[:, None], index_BxM].set(True)
        view = global_view(images_BxHxWxC, view_keys_B)
        tokens = tower(view, train, masked=(mask_BxN, self.mask_token)).tokens_BxTxD
        outputs = _as_outputs("student", self.head(self._pick(tokens, index_BxM)))
        return outputs if targets is None else outputs | targets


def _reduce(options: Any, outputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The term's loss and agreement over the whole batch (Sinkhorn-Knopp couples it)."""
    return distillation_values(
        _projected(outputs, "student"),
        _projected(outputs, "teacher"),
        options.student_temperature,
        options.teacher_temperature,
    )


def _taught(name: str, module: nn.Module, spec: Any) -> AuxTerm:
    """A term that learns from the teacher, on from ``start_fraction`` of the run."""
    options = module.options
    return AuxTerm(
        name,
        module,
        options.weight,
        reduce=partial(_reduce, options),
        teacher=True,
        start_step=round(options.start_fraction * spec.train.steps),
        teacher_momentum=options.teacher_momentum,
    )


def self_distillation(options: SelfDistillationOptions, spec: Any) -> AuxTerm:
    """Factory registered as auxiliary term ``self_distillation``."""
    vision = spec.model.vision  # a ViT on the patch grid (spec_checks)
    patch = vision.patch_size
    size = options.local_size or max(patch, vision.image_size // 2 // patch * patch)
    as_patches = vision.positions == "learned" and size != vision.image_size
    return _taught(
        "self_distillation", SelfDistillationTerm(options, size, patch, as_patches), spec
    )


def masked_prediction(options: MaskedPredictionOptions, spec: Any) -> AuxTerm:
    """Factory registered as auxiliary term ``masked_prediction``."""
    vision = spec.model.vision  # a ViT (spec_checks)
    patches = (vision.image_size // vision.patch_size) ** 2
    prefix = int(vision.pool == "tok")
    return _taught(
        "masked_prediction", MaskedPredictionTerm(options, patches, prefix, vision.width), spec
    )
