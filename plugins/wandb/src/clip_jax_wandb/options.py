"""``[logging.wandb]``: where the W&B run goes. Apart from the logger so that validating
a spec never imports wandb."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from clip_jax.schemas import Options


class WandbOptions(Options):
    project: str | None = Field(None, description="W&B project (unset: wandb's default)")
    entity: str | None = Field(None, description="W&B team or user (unset: your default)")
    name: str | None = Field(None, description="the W&B run's name (unset: run.name)")
    tags: list[str] = Field([], description="tags of the W&B run")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None,
        description="offline: written to disk only (`wandb sync` later); unset: WANDB_MODE "
        "or online",
    )
