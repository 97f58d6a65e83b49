"""The CLIP two-tower model: towers -> projections -> L2-normalised embeddings.

The logit scale (and, for the sigmoid loss, a logit bias) are parameters of the model,
initialised from the loss's options, so that a checkpoint carries everything needed
to score image-text pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.errors import UserError
from clip_jax.models.layers import DTYPES, block_config, dense_init, zeros
from clip_jax.models.naflex import NaflexImages
from clip_jax.models.text import TextTower
from clip_jax.models.vit import VisionTower
from clip_jax.schemas import ClipOptions


def l2_normalize(x_BxD: jax.Array) -> jax.Array:
    x_BxD = x_BxD.astype(jnp.float32)
    return x_BxD * jax.lax.rsqrt(jnp.sum(x_BxD * x_BxD, axis=-1, keepdims=True) + 1e-12)


class Clip(nn.Module):
    """Any image tower and text tower, each followed by its projection into the shared space.

    A tower is a Flax module ``(inputs, train=False) -> (batch, features)``: the ViT and
    text transformer here, or a plugin's (a conv net, say). ``projection`` "none" uses
    the tower's output as the embedding.

    ``head``: a downstream head (``clip_jax.heads``) whose parameters live under ``head/``;
    ``classify_images`` / ``classify_texts`` run it on a tower's output.

    ``aux``: auxiliary terms (``clip_jax.aux_terms``), name -> module, each with its
    parameters under ``aux_<name>/``; ``__call__(..., aux=True)`` also returns their
    per-example values, computed from the image tower's token sequence.
    """

    vision: nn.Module
    text: nn.Module
    embed_dim: int
    vision_projection: str = "linear"
    vision_projection_bias: bool = False
    text_projection: str = "linear"
    text_projection_bias: bool = False
    init_temperature: float = 1 / 0.07
    init_bias: float | None = None
    head: nn.Module | None = None
    aux: Any = None  # a FrozenDict (hashable, as module attributes must be), or None

    def setup(self) -> None:
        self.vision_proj = self._projection(self.vision_projection, self.vision_projection_bias)
        self.text_proj = self._projection(self.text_projection, self.text_projection_bias)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(math.log(self.init_temperature)), ()
        )
        if self.init_bias is not None:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.init_bias), ())

    def _projection(self, kind: str, bias: bool):
        if kind == "none":
            return lambda x: x
        return nn.Dense(
            self.embed_dim,
            use_bias=bias,
            kernel_init=dense_init(("embed", "proj")),
            bias_init=zeros(("proj",)),
        )

    def encode_images(self, images_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
        return l2_normalize(self.vision_proj(self.vision(images_BxHxWxC, train=train)))

    def encode_texts(self, tokens_BxL: jax.Array, train: bool = False) -> jax.Array:
        return l2_normalize(self.text_proj(self.text(tokens_BxL, train=train)))

    def image_tokens(self, images_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
        """The image tower's token sequence (its ``encoder`` submodule's output)."""
        return self._embeddings_and_tokens(images_BxHxWxC, train)[1]

    def image_token_valid(self, images, image_BxNxE: jax.Array) -> jax.Array | None:
        """Which of the image tower's tokens are the image's: for NaFlex images, the
        valid patches between the class token and the registers; None (all) otherwise."""
        if not isinstance(images, NaflexImages):
            return None
        options = getattr(self.vision, "options", None)
        batch, tokens = image_BxNxE.shape[:2]
        first = int(getattr(options, "pool", "") == "tok")
        rest = tokens - first - images.valid_BxN.shape[1]
        ones = lambda n: jnp.ones((batch, n), jnp.bool_)  # noqa: E731
        return jnp.concatenate([ones(first), images.valid_BxN, ones(rest)], axis=1)

    def _embeddings_and_tokens(self, images_BxHxWxC, train: bool) -> tuple[jax.Array, jax.Array]:
        found: list[jax.Array] = []
        with nn.intercept_methods(_encoder_output(self.vision.path, found)):
            img_emb_BxD = self.encode_images(images_BxHxWxC, train)
        if not found:
            raise UserError(
                "loss.aux: auxiliary terms read the image tower's tokens, and this "
                f"{self.vision.name} tower has no encoder blocks"
            )
        return img_emb_BxD, found[-1]

    def classify_images(self, images_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
        return self._classify(self.vision, images_BxHxWxC, None, train)

    def classify_texts(self, tokens_BxL: jax.Array, train: bool = False) -> jax.Array:
        pad_id = getattr(getattr(self.text, "options", None), "pad_id", None)
        valid_BxL = None if pad_id is None else tokens_BxL != pad_id
        return self._classify(self.text, tokens_BxL, valid_BxL, train)

    def _classify(self, tower: nn.Module, inputs, valid_BxN, train: bool) -> jax.Array:
        """The head's logits from ``tower``'s pooled output, and from its token sequence
        (its ``encoder`` submodule's output) when the head pools tokens itself."""
        if not getattr(self.head, "uses_tokens", False):
            return self.head(tower(inputs, train=train), train=train)
        found: list[jax.Array] = []
        with nn.intercept_methods(_encoder_output(tower.path, found)):
            pooled_BxD = tower(inputs, train=train)
        options = getattr(tower, "options", None)
        if not found or options is None:
            raise UserError(
                f"head.kind = 'map' pools a transformer tower's tokens; the {tower.name} "
                "tower has no encoder blocks (use head.kind = 'linear')"
            )
        cfg = block_config(options, DTYPES[options.dtype])
        return self.head(pooled_BxD, found[-1], valid_BxN, cfg, train=train)

    def __call__(
        self,
        images_BxHxWxC: jax.Array,
        tokens_BxL: jax.Array,
        train: bool = False,
        lock: str | None = None,
        aux: bool = False,
        targets: Any = None,
        view_keys_B: jax.Array | None = None,
    ):
        """Embeddings of both towers plus the (log) logit scale and the bias (or 0).

        ``lock`` ("vision" or "text"): that tower runs in inference mode and its
        embeddings pass no gradient (LiT). ``aux``: a fifth value, the auxiliary terms'
        per-example outputs by name. Terms that learn from the EMA teacher run only
        with the teacher's ``targets`` (``teacher_targets``) and the same per-example
        ``view_keys_B``.
        """
        if self.aux and (aux or self.is_initializing()):
            return self._with_aux(images_BxHxWxC, tokens_BxL, train, aux, targets, view_keys_B)
        if self.head is not None and self.is_initializing():  # create the head's parameters
            if self.head.tower == "vision":
                self.classify_images(images_BxHxWxC)
            else:
                self.classify_texts(tokens_BxL)
        bias = self.logit_bias if self.init_bias is not None else jnp.zeros(())
        img_emb_BxD = self.encode_images(images_BxHxWxC, train and lock != "vision")
        txt_emb_BxD = self.encode_texts(tokens_BxL, train and lock != "text")
        if lock == "vision":
            img_emb_BxD = jax.lax.stop_gradient(img_emb_BxD)
        elif lock == "text":
            txt_emb_BxD = jax.lax.stop_gradient(txt_emb_BxD)
        return img_emb_BxD, txt_emb_BxD, self.logit_scale, bias

    def _with_aux(self, images_BxHxWxC, tokens_BxL, train: bool, aux: bool, targets, view_keys_B):
        bias = self.logit_bias if self.init_bias is not None else jnp.zeros(())
        img_emb_BxD, image_BxNxE = self._embeddings_and_tokens(images_BxHxWxC, train)
        txt_emb_BxD = self.encode_texts(tokens_BxL, train)
        outputs = {}
        valid_BxN = self.image_token_valid(images_BxHxWxC, image_BxNxE)
        extra = {} if valid_BxN is None else {"image_valid_BxN": valid_BxN}  # NaFlex padding
        for name, term in self.aux.items():
            if not getattr(term, "learns_from_teacher", False):
                outputs[name] = term(image_BxNxE, tokens_BxL, train=train, **extra)
            elif (targets is not None and name in targets) or self.is_initializing():
                if view_keys_B is None:  # initialising: any views
                    view_keys_B = jax.random.split(jax.random.key(0), tokens_BxL.shape[0])
                mine = None if targets is None else targets[name]
                outputs[name] = term(self._tower_outputs, images_BxHxWxC, mine, view_keys_B, train)
        scored = (img_emb_BxD, txt_emb_BxD, self.logit_scale, bias)
        return (*scored, outputs) if aux else scored

    def teacher_targets(
        self, images_BxHxWxC: jax.Array, view_keys_B: jax.Array, names: Sequence[str]
    ) -> dict:
        """What the terms ``names`` (which learn from the teacher) predict, by name: run
        with the teacher's parameters in place of the student's
        (``clip_jax.train.teacher``), on the step's global view of each image."""
        from clip_jax.models.self_supervised import global_view

        teacher = self._tower_outputs(global_view(images_BxHxWxC, view_keys_B), False)
        return {name: self.aux[name].targets(teacher, view_keys_B) for name in names}

    def _tower_outputs(self, images, train: bool, masked=None):
        """The image tower's pooled features and its encoder's token sequence."""
        from clip_jax.models.self_supervised import TowerOutputs

        found: list[jax.Array] = []
        extra = {} if masked is None else {"masked": masked}
        with nn.intercept_methods(_encoder_output(self.vision.path, found)):
            pooled_BxD = self.vision(images, train=train, **extra)
        return TowerOutputs(pooled_BxD, found[-1])


def _encoder_output(tower_path: tuple[str, ...], found: list) -> Callable:
    """A method interceptor that keeps the output of the module at ``tower_path/encoder``."""

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and module.path == (*tower_path, "encoder"):
            found.append(out)
        return out

    return intercept


def two_tower(
    vision: nn.Module, text: nn.Module, options, init_temperature: float, init_bias: float | None
) -> Clip:
    """A Clip from two towers and model options with ``embed_dim`` and per-tower
    ``projection``/``projection_bias`` (plugins with their own image tower use this too)."""
    return Clip(
        vision,
        text,
        options.embed_dim,
        vision_projection=options.vision.projection,
        vision_projection_bias=options.vision.projection_bias,
        text_projection=options.text.projection,
        text_projection_bias=options.text.projection_bias,
        init_temperature=init_temperature,
        init_bias=init_bias,
    )


def build_clip(options: ClipOptions, init_temperature: float, init_bias: float | None) -> Clip:
    """Factory registered as architecture ``clip``."""
    return two_tower(
        VisionTower(options.vision), TextTower(options.text), options, init_temperature, init_bias
    )
