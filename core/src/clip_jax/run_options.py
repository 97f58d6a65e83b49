"""The spec's own tables: ``run``, ``train`` (with ``train.spike``), ``eval`` and
``distributed``. Component tables (``model``, ``loss``, ...) have their options in
``schemas`` or in the plugin that registers the component; ``spec`` puts both together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from clip_jax.plugins import Registry, UnknownComponentError
from clip_jax.schemas import Options


class RunOptions(Options):
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0

    @field_validator("output_dir")
    @classmethod
    def _names_a_folder(cls, output_dir: str) -> str:
        # "" would be the folder clipctl runs in: checkpoints among the user's files
        if not output_dir.strip():
            raise ValueError("must name the run's folder, e.g. runs/my-run")
        return output_dir


class SpikeOptions(Options):
    """``train.spike``: a step whose loss or gradient norm is far above its recent past.

    A value more than ``k`` robust standard deviations (1.4826 x the median absolute
    deviation) above the median of the last ``window`` good steps is a spike, once
    ``min_history`` steps are known.
    """

    action: Literal["off", "skip", "rollback"] = Field(
        "off",
        description="off: not watched; skip: the step's update is dropped (the batch is "
        "consumed); rollback: the last checkpoint is restored and the next "
        "rollback_skip_batches batches after it are passed over",
    )
    watch: list[Literal["loss", "grad_norm"]] = Field(["loss", "grad_norm"], min_length=1)
    k: float = Field(6.0, gt=0, description="how many robust standard deviations")
    window: int = Field(100, ge=4, description="how many past good steps the median spans")
    min_history: int = Field(20, ge=2, description="steps known before spikes are judged")
    rollback_skip_batches: int = Field(
        100, ge=0, description="rollback: batches passed over after the checkpoint"
    )
    max_rollbacks: int = Field(
        3, ge=1, description="rollback: more than this many in a run stops it (failed)"
    )

    @model_validator(mode="after")
    def _check_history(self) -> SpikeOptions:
        if self.min_history > self.window:
            raise ValueError(
                f"min_history ({self.min_history}) cannot exceed window ({self.window})"
            )
        return self


class TrainOptions(Options):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(256, ge=1, description="global batch size")
    microbatches: int = Field(
        1,
        ge=1,
        description="split each batch into this many micro-batches (gradient caching): "
        "the contrastive loss still sees every negative of the whole batch, activation "
        "memory drops about k-fold, at ~1/3 more compute",
    )
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    init_from: str | None = Field(
        None,
        description="a run folder whose latest parameters start this run (fine-tuning), or "
        "published weights: hf:PATH (a transformers CLIPModel/SiglipModel folder), "
        "open_clip:PATH[#MODEL] or big_vision:PATH.npz, whose config gives the model's "
        "defaults; position embeddings are resampled to a new image size",
    )
    freeze: list[str] = Field(
        [],
        description="regexes, each matched whole against parameter paths such as "
        "vision/encoder/block_0/attn/query/kernel: matching parameters are not trained, "
        'get no optimizer state and stay bit-identical (e.g. ["vision/.*"]); a pattern '
        "that matches no parameter is an error",
    )
    lr_scale: dict[str, Annotated[float, Field(ge=0)]] = Field(
        {},
        description="learning-rate multipliers by parameter-path regex, e.g. "
        '[train.lr_scale] "text/.*" = 0.1; the first pattern (in the order written) '
        "matching a path applies; multiplied with layer_decay",
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise learning-rate decay (BEiT): block i of a tower of depth L "
        "gets decay^(L-i), what comes before the blocks decay^(L+1), the rest 1",
    )
    checkpoint_minutes: float | None = Field(
        None,
        gt=0,
        description="also save when this many minutes have passed since the last save "
        "(process 0's clock, agreed on at log steps); with checkpoint_every, whichever "
        "comes first",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a step with a NaN or infinite loss or gradient never updates the "
        "parameters; stop: the run then ends (failed) with a checkpoint of the good "
        "state; skip: it goes on, counting guard/skipped_updates",
    )
    spike: SpikeOptions = SpikeOptions()

    @field_validator("freeze", "lr_scale")
    @classmethod
    def _check_patterns(cls, patterns):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns

    @model_validator(mode="after")
    def _check_microbatches(self) -> TrainOptions:
        if self.batch_size % self.microbatches:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by microbatches "
                f"({self.microbatches})"
            )
        return self


class EvalOptions(Options):
    every: int = Field(0, ge=0, description="0: evaluate at the end only")
    batch_size: int = Field(256, ge=1)
    zero_shot: bool = True
    retrieval: bool = True
    max_examples: int | None = Field(None, ge=1)
    max_patches: list[Annotated[int, Field(ge=1, le=65536)]] | None = Field(
        None,
        min_length=1,
        description="preprocess.resize = 'naflex': zero-shot and retrieval also at each of "
        "these patch budgets, logged as <metric>@<budget>; none: the run's own budget only",
    )


class DistributedOptions(Options):
    """Multi-process runs: off, auto (TPU pods, SLURM...), or explicit settings."""

    mode: Literal["off", "auto", "explicit"] = "off"
    coordinator: str | None = Field(None, description="host:port of process 0")
    num_processes: int | None = Field(None, ge=1)
    process_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DistributedOptions:
        if self.mode == "explicit":
            missing = [
                k
                for k in ("coordinator", "num_processes", "process_id")
                if getattr(self, k) is None
            ]
            if missing:
                raise ValueError(f"mode 'explicit' needs {', '.join(missing)}")
            if self.process_id >= self.num_processes:
                raise ValueError(
                    f"process_id ({self.process_id}) must be below num_processes "
                    f"({self.num_processes})"
                )
        return self


class LoggingOptions(Options):
    """``[logging]``: the experiment loggers, by registered name (``clipctl plugins``);
    each logger's options are its own table, ``[logging.tensorboard]``.

    ``jsonl`` (metrics.jsonl and status.json in the run folder) is always on, listed or
    not: ``clipctl runs``, the TUI and resuming read those files.
    """

    loggers: list[str] = Field(
        ["jsonl"], description='experiment loggers, e.g. ["jsonl", "tensorboard", "wandb"]'
    )


def logging_section(
    raw: Mapping[str, Any], registry: Registry
) -> tuple[dict[str, Any], type[LoggingOptions], list[tuple[str, str]]]:
    """(the raw spec with a table for each listed logger, the ``logging`` schema, the
    problems of ``logging.loggers``). A listed logger's table is filled in with its
    defaults, so that the resolved spec shows them; the tables of registered loggers
    that are not listed are still checked, so that switching one on is one edit."""
    table = raw.get("logging", {})
    if not isinstance(table, Mapping):
        return dict(raw), _logging_model(()), []  # pydantic reports "must be a table"
    problems: list[tuple[str, str]] = []
    names = table.get("loggers", ["jsonl"])
    if isinstance(names, list):
        table = dict(table)
        for index, name in enumerate(names):
            if not isinstance(name, str):
                continue  # pydantic reports "must be a string"
            if name in names[:index]:
                problems.append(("logging.loggers", f"{name!r} is listed twice"))
                continue
            try:
                component = registry.get("logger", name)
            except UnknownComponentError as exc:
                problems.append(("logging.loggers", str(exc)))
                continue
            if component.options is not None:
                table.setdefault(name, {})
        raw = {**raw, "logging": table}
    tables = tuple(
        (name, component.options)
        for name, component in sorted(registry.components.get("logger", {}).items())
        if component.options is not None
    )
    return dict(raw), _logging_model(tables), problems


@cache  # one class per set of loggers: equal specs compare equal
def _logging_model(tables: tuple[tuple[str, type], ...]) -> type[LoggingOptions]:
    fields: dict[str, Any] = {name: (options | None, None) for name, options in tables}
    return create_model("LoggingSpec", __base__=LoggingOptions, **fields)
