"""Option schemas of the built-in components.

They live apart from the components themselves so that validating a spec never imports
jax or tensorflow. A plugin's options subclass ``Options`` the same way.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Options(BaseModel):
    """Base of every spec table: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- model
Activation = Literal["gelu", "gelu_tanh", "quick_gelu", "swiglu"]
ComputeDtype = Literal["float32", "bfloat16"]
Remat = Literal["none", "minimal", "full"]


class TowerOptions(Options):
    """What both towers' transformers share: size, block design, and how they run."""

    width: int = Field(768, ge=8)
    depth: int = Field(12, ge=1, le=256)
    heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden = width x ratio, unless mlp_dim")
    mlp_dim: int | None = Field(None, ge=1, description="MLP hidden units (overrides mlp_ratio)")
    activation: Activation = Field("quick_gelu", description="swiglu: SiLU-gated MLP")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0, le=0.1)
    use_bias: bool = Field(True, description="biases in attention, MLP and LayerNorm")
    qk_norm: bool = Field(False, description="normalise queries and keys per head")
    dropout: float = Field(0.0, ge=0, lt=1, description="on each residual branch, training only")
    projection: Literal["linear", "none"] = Field(
        "linear", description="none: the tower's output is the embedding (width = embed_dim)"
    )
    projection_bias: bool = False
    dtype: ComputeDtype = Field(
        "float32", description="activation dtype (norms and softmax always run in float32)"
    )
    matmul_dtype: ComputeDtype | None = Field(
        None,
        description="inputs of the matrix products, accumulated in float32, backward "
        "included; none: dtype. bfloat16 with dtype float32 is the fast setting on CPUs",
    )
    param_dtype: ComputeDtype = Field(
        "float32", description="parameters and optimizer moments (float32: master weights)"
    )
    attention: Literal["xla", "cudnn"] = Field(
        "xla",
        description="cudnn: fused (flash) attention on NVIDIA GPUs, in bfloat16, any "
        "sequence length; xla: runs anywhere",
    )
    remat: Remat = Field(
        "none",
        description="recompute activations in the backward pass (on a CPU only with "
        "scan_layers: XLA's CPU compiler undoes it in unrolled layers)",
    )
    scan_layers: bool = Field(False, description="one traced block: compile time flat in depth")

    def _check_tower(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.attention == "cudnn" and "bfloat16" not in (self.dtype, self.matmul_dtype):
            raise ValueError("attention = 'cudnn' needs dtype or matmul_dtype = 'bfloat16'")


class VisionOptions(TowerOptions):
    image_size: int = Field(224, ge=8, le=4096)
    patch_size: int = Field(16, ge=1, le=256)
    patch_bias: bool = Field(False, description="bias in the patch embedding (timm/SigLIP)")
    positions: Literal["learned", "sincos2d"] = "learned"
    norm_pre: bool = Field(True, description="a norm before the blocks (CLIP's ln_pre)")
    pool: Literal["tok", "gap", "map"] = "tok"
    registers: int = Field(0, ge=0, le=64, description="extra learned tokens, dropped at the end")
    patch_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of patch tokens dropped at random in training only (FLIP): "
        "0.5 about halves the image tower's cost; evaluation sees every patch",
    )

    @model_validator(mode="after")
    def _check(self) -> VisionOptions:
        self._check_tower()
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.positions == "sincos2d" and self.width % 4:
            raise ValueError(f"positions = 'sincos2d' needs width ({self.width}) divisible by 4")
        return self


class TextOptions(TowerOptions):
    vocab_size: int = Field(49408, ge=8)
    context_length: int = Field(77, ge=2, le=8192)
    width: int = Field(512, ge=8)
    heads: int = Field(8, ge=1)
    causal: bool = Field(True, description="false: bidirectional, padding masked")
    positions: Literal["learned", "rotary"] = "learned"
    pool: Literal["eos", "last", "first", "mean", "map"] = Field(
        "eos", description="eos: the end-of-text token; last: the final position (SigLIP)"
    )
    pad_id: int | None = Field(
        0,
        ge=0,
        description="padding token: masked from bidirectional attention, skipped by eos "
        "and mean pooling; none: padding is read like any token (SigLIP)",
    )

    @model_validator(mode="after")
    def _check(self) -> TextOptions:
        self._check_tower()
        if self.positions == "rotary" and (self.width // self.heads) % 2:
            raise ValueError(
                f"positions = 'rotary' needs an even head size (width / heads = "
                f"{self.width // self.heads})"
            )
        if self.pad_id is None and self.pool in ("eos", "mean"):
            raise ValueError(
                f"pool = '{self.pool}' needs pad_id: it finds the text's end by its padding"
            )
        if self.causal and self.pool == "first":
            raise ValueError(
                "pool = 'first' with causal = true: the first token sees only itself; "
                "use pool = 'eos' or 'last', or causal = false"
            )
        return self


class ClipOptions(Options):
    """The standard CLIP two-tower model (ViT image tower, transformer text tower)."""

    preset: str | None = None
    embed_dim: int = Field(512, ge=1)
    vision: VisionOptions = VisionOptions()
    text: TextOptions = TextOptions()

    @model_validator(mode="after")
    def _check(self) -> ClipOptions:
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if tower.projection == "none" and tower.width != self.embed_dim:
                raise ValueError(
                    f"{name}.projection = 'none' makes the {name} tower's output the "
                    f"embedding: {name}.width ({tower.width}) must equal embed_dim "
                    f"({self.embed_dim})"
                )
        return self


# -------------------------------------------------------------------------- losses
class SoftmaxOptions(Options):
    """Symmetric InfoNCE over the global batch (CLIP)."""

    init_temperature: float = Field(1 / 0.07, gt=0)
    max_temperature: float = Field(100.0, gt=0)


class SigmoidOptions(Options):
    """Pairwise sigmoid loss (SigLIP): t' = log 10 and b = -10 at init."""

    init_temperature: float = Field(10.0, gt=0)
    init_bias: float = -10.0


# ----------------------------------------------------------------------- optimizer
class AdamWOptions(Options):
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_learning_rate_ratio: float = Field(0.0, ge=0, le=1)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    clip_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")


# ---------------------------------------------------------------------------- data
class RecordKeys(Options):
    image_key: str = "jpg"
    caption_key: str = "txt"
    label_key: str | None = Field(None, description="int64 class id, for zero-shot eval")
    shuffle_buffer: int = Field(4096, ge=1)
    readers: int = Field(
        1,
        ge=1,
        description="logical readers, each with its own shards and shuffle; a multiple of "
        "the process count. Fixed here so a global batch is the same on any topology",
    )


class TfrecordDataOptions(RecordKeys):
    """img2dataset / DataComp tfrecord shards; globs or lists, gs:// works."""

    train: str | list[str]
    validation: str | list[str] | None = None
    classes_file: str | None = Field(
        None, description='JSON {"classes": [...], "templates": [...]} for zero-shot eval'
    )


class SyntheticDataOptions(RecordKeys):
    """The embedded dataset: written as tfrecord shards on first use, then read like any."""

    dir: str = "data/synthetic"
    train_examples: int = Field(20000, ge=1)
    validation_examples: int = Field(1024, ge=1)
    image_size: int = Field(32, ge=16, le=512)
    seed: int = 0
    label_key: str | None = "label"


# --------------------------------------------------------------------- preprocess
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PreprocessOptions(Options):
    """How pixels reach the model, wherever it is used (training, eval, load, export).

    A model trained or published with one normalisation must be fed that one, so it is
    part of the run spec and travels with the run folder and exported models.
    """

    mean: tuple[float, float, float] = Field(CLIP_MEAN, description="per-channel, on 0..1")
    std: tuple[float, float, float] = Field(CLIP_STD, description="per-channel, on 0..1")
    resize: Literal["crop", "squash", "naflex"] = Field(
        "crop",
        description="crop: shorter side to size, centre crop (CLIP); squash: to size x size "
        "(SigLIP); naflex: native aspect ratio, at most max_patches patches (SigLIP 2)",
    )
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    max_patches: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="naflex: the most patches an image is cut into, its grid keeping the "
        "aspect ratio; none: the square grid's, (image_size / patch_size)^2",
    )

    @model_validator(mode="after")
    def _check(self) -> PreprocessOptions:
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive (got {list(self.std)})")
        return self


# ----------------------------------------------------------------------- tokenizer
class BpeTokenizerOptions(Options):
    path: str | None = Field(None, description="tokenizer.json to load; else trained")
    pad_id: int = Field(0, ge=0, description="id that pads every text to the context length")
    vocab_size: int = Field(1024, ge=259, description="at least the 256 bytes + 3 special tokens")
    lowercase: bool = True
    train_captions: int = Field(100_000, ge=1, description="captions used to train it")


class SentencePieceTokenizerOptions(Options):
    """A SentencePiece model (e.g. a SigLIP folder's spiece.model), tokenizing as
    ``transformers.SiglipTokenizer`` does: text canonicalised, end-of-sequence appended."""

    path: str = Field(description="SentencePiece .model file to load")
    lowercase: bool = Field(True, description="lowercase the text (SiglipTokenizer: yes)")
    canonicalize: bool = Field(
        True, description="drop ASCII punctuation and collapse whitespace (SiglipTokenizer: yes)"
    )
    pad_id: int | None = Field(
        None, ge=0, description="padding id; default the end-of-sequence id, as SigLIP pads"
    )
    add_eos: bool = Field(True, description="end every sequence with the end-of-sequence id")


# ------------------------------------------------------------------------ sharding
def _axis_size(default: int) -> object:
    return Field(default, description="devices along this mesh axis; -1: all the rest")


class MeshOptions(Options):
    """Sizes of the mesh axes; their product must be the number of devices."""

    data: int = _axis_size(-1)
    fsdp: int = _axis_size(1)
    model: int = _axis_size(1)

    @model_validator(mode="after")
    def _check(self) -> MeshOptions:
        sizes = {"data": self.data, "fsdp": self.fsdp, "model": self.model}
        bad = [k for k, v in sizes.items() if v == 0 or v < -1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: an axis size is a positive number or -1")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError("at most one axis can be -1 (the remaining devices)")
        return self


class FsdpMesh(MeshOptions):
    data: int = _axis_size(1)
    fsdp: int = _axis_size(-1)


# A component's mesh table is validated by its own class, so keys the user leaves out
# take that strategy's defaults (e.g. fsdp over all devices), not the generic ones.
class DataParallelOptions(Options):
    """Parameters replicated, batch split over every device."""

    mesh: MeshOptions = MeshOptions()


class FsdpOptions(Options):
    """Parameters and optimizer state sharded over ``fsdp``; batch over data x fsdp."""

    mesh: FsdpMesh = FsdpMesh()


class TensorParallelOptions(Options):
    """Attention heads and MLP hidden units split over ``model``; set mesh.model."""

    mesh: MeshOptions = MeshOptions()


class FsdpTensorParallelOptions(Options):
    """2-D: fsdp over ``fsdp`` and tensor parallel over ``model``; set mesh.model."""

    mesh: FsdpMesh = FsdpMesh()


# --------------------------------------------------------------------------- heads
class ContrastiveHeadOptions(Options):
    """No head: the two towers trained with the run's contrastive loss (the default)."""


class ClassificationHeadOptions(Options):
    """A classifier on one tower, trained with cross-entropy on the records' integer
    labels (``data.label_key``)."""

    num_classes: int = Field(ge=2, description="labels are 0 .. num_classes - 1")
    kind: Literal["linear", "map"] = Field(
        "linear",
        description="linear: a dense layer on the tower's pooled output; map: attention "
        "pooling (a learned probe, big_vision's MAP) over the tower's tokens, then the dense "
        "layer (transformer towers only)",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    dropout: float = Field(0.0, ge=0, lt=1, description="before the classifier, training only")


class LitOptions(Options):
    """Locked-image tuning (LiT): the locked tower keeps its parameters bit-identical,
    runs in inference mode and passes no gradient; the other tower learns to match it."""

    lock: Literal["vision", "text"] = Field("vision", description="the tower that stays locked")


# -------------------------------------------------------------------------- loggers
class TensorBoardOptions(Options):
    """``[logging.tensorboard]``: event files under ``<run.output_dir>/tensorboard/``."""

    flush_seconds: float = Field(
        10.0, gt=0, description="how often buffered events are written to the event file"
    )
