"""The built-in components, registered through the same hooks as any plugin.

Factories are ``lazy`` so that registering (and so listing and validating) never
imports jax or tensorflow.
"""

from clip_jax import schemas
from clip_jax.aux_terms import CaptioningOptions, MaskedPredictionOptions, SelfDistillationOptions
from clip_jax.plugins import hookimpl, lazy
from clip_jax.presets import CLIP_PRESETS


@hookimpl
def register_architectures(register):
    register(
        "clip",
        lazy("clip_jax.models.clip:build_clip"),
        options=schemas.ClipOptions,
        description="CLIP: ViT image tower + causal transformer text tower, linear projections",
        presets=CLIP_PRESETS,
        formats={
            "hf": "clip_jax.models.hf_format:HF_FORMAT",
            "open_clip": "clip_jax.models.open_clip_format:OPEN_CLIP_FORMAT",
            "big_vision": "clip_jax.models.big_vision_format:BIG_VISION_FORMAT",
        },
    )


@hookimpl
def register_losses(register):
    register(
        "softmax",
        lazy("clip_jax.losses:softmax_loss"),
        options=schemas.SoftmaxOptions,
        description="symmetric InfoNCE over the global batch (CLIP)",
    )
    register(
        "sigmoid",
        lazy("clip_jax.losses:sigmoid_loss"),
        options=schemas.SigmoidOptions,
        description="pairwise sigmoid loss over the global batch (SigLIP)",
    )
    register(
        "chunked_sigmoid",
        lazy("clip_jax.chunked_loss:chunked_sigmoid_loss"),
        options=schemas.SigmoidOptions,
        description="SigLIP loss with text embeddings passed round a ring of devices "
        "(ppermute): each device holds only per-device-batch^2 logits",
    )


@hookimpl
def register_aux_losses(register):
    register(
        "captioning",
        lazy("clip_jax.models.captioning:captioning"),
        options=CaptioningOptions,
        description="LocCa / CapPa captioning decoder on the image tower's tokens",
    )
    register(
        "self_distillation",
        lazy("clip_jax.models.self_supervised:self_distillation"),
        options=SelfDistillationOptions,
        description="SILC: local crops predict an EMA teacher's view of the whole image",
    )
    register(
        "masked_prediction",
        lazy("clip_jax.models.self_supervised:masked_prediction"),
        options=MaskedPredictionOptions,
        description="TIPS: masked patches predict an EMA teacher's patch features",
    )


@hookimpl
def register_heads(register):
    register(
        "contrastive",
        lazy("clip_jax.heads:contrastive"),
        options=schemas.ContrastiveHeadOptions,
        description="no head: both towers trained with the contrastive loss (the default)",
    )
    register(
        "image_classification",
        lazy("clip_jax.heads:image_classification"),
        options=schemas.ClassificationHeadOptions,
        description="linear or MAP classifier on the image tower, cross-entropy on "
        "integer labels (data.label_key)",
    )
    register(
        "text_classification",
        lazy("clip_jax.heads:text_classification"),
        options=schemas.ClassificationHeadOptions,
        description="linear or MAP classifier on the text tower (the caption), "
        "cross-entropy on the records' integer labels",
    )
    register(
        "lit",
        lazy("clip_jax.heads:lit"),
        options=schemas.LitOptions,
        description="locked-image tuning (LiT): contrastive loss, image tower frozen, "
        "in inference mode and passing no gradient",
    )


@hookimpl
def register_optimizers(register):
    register(
        "adamw",
        lazy("clip_jax.optim:adamw"),
        options=schemas.AdamWOptions,
        description="AdamW, warmup + cosine/linear/constant schedule, gradient-norm clipping",
    )


@hookimpl
def register_data_sources(register):
    register(
        "tfrecord",
        lazy("clip_jax.data.sources:tfrecord_source"),
        options=schemas.TfrecordDataOptions,
        description="img2dataset / DataComp tfrecord shards (local paths or gs://)",
        formats={"tfrecord": "clip_jax.data.formats:TFRECORD"},
    )
    register(
        "synthetic",
        lazy("clip_jax.data.sources:synthetic_source"),
        options=schemas.SyntheticDataOptions,
        description="embedded captioned shapes, written as tfrecord shards on first use",
    )


@hookimpl
def register_tokenizers(register):
    register(
        "bpe",
        lazy("clip_jax.data.tokenizer:bpe_tokenizer"),
        options=schemas.BpeTokenizerOptions,
        description="byte-level BPE (Hugging Face tokenizers): load tokenizer.json or train one",
    )
    register(
        "sentencepiece",
        lazy("clip_jax.data.sentencepiece_tokenizer:sentencepiece_tokenizer"),
        options=schemas.SentencePieceTokenizerOptions,
        description="SentencePiece .model (e.g. SigLIP's spiece.model), tokenizing as SigLIP",
    )


@hookimpl
def register_loggers(register):
    register(
        "jsonl",
        lazy("clip_jax.train.loggers:jsonl_logger"),
        description="metrics.jsonl and status.json in the run folder (always on: clipctl "
        "runs, the TUI and resuming read them)",
    )
    register(
        "tensorboard",
        lazy("clip_jax.train.loggers:tensorboard_logger"),
        options=schemas.TensorBoardOptions,
        description="TensorBoard event files in <run.output_dir>/tensorboard/ "
        "(train/..., eval/..., the spec, parameter counts and machine)",
    )


@hookimpl
def register_sharding_strategies(register):
    for name, target, options, description in (
        (
            "dp",
            "data_parallel",
            schemas.DataParallelOptions,
            "data parallel: parameters replicated, batch split over all devices",
        ),
        (
            "fsdp",
            "fully_sharded",
            schemas.FsdpOptions,
            "fully sharded: parameters and optimizer state split over mesh axis fsdp",
        ),
        (
            "tp",
            "tensor_parallel",
            schemas.TensorParallelOptions,
            "tensor parallel: attention heads and MLP units split over mesh axis model",
        ),
        (
            "fsdp_tp",
            "fsdp_tensor_parallel",
            schemas.FsdpTensorParallelOptions,
            "2-D: fsdp over mesh axis fsdp and tensor parallel over mesh axis model",
        ),
    ):
        register(
            name, lazy(f"clip_jax.sharding:{target}"), options=options, description=description
        )
