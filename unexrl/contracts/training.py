"""What a training run writes for others to read: ``curve.json`` (written last, so its presence marks a finished
run), and each checkpoint's hash manifest."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from unexrl.contracts.base import SHA256, Contract


class TrainingSummary(Contract):
    """A training run's outcome, timings and validation curve (unexrl/train/job.py)."""

    algorithm: str
    regime: Literal["online", "offline"]
    updates: int = Field(ge=0)
    resumed_from: int | None
    """the checkpoint's update count when the run was resumed"""
    world_size: int = Field(ge=1)
    seconds: float = Field(ge=0)
    updates_per_s: float | None
    """inside the update step"""
    run_updates_per_s: float | None
    """over the whole run"""
    seconds_by_part: dict[str, float]
    """update, collect, sample, validate, diagnose, checkpoint"""
    seconds_per_update_outside_update: float | None
    final_validation_watch_time: float | None
    selected_updates: int | None
    """the validation point whose actors were exported (``train.select``)"""
    curve: list[dict[str, Any]]
    """one point per validation: updates, validation watch time, losses, critic diagnostics"""


class CheckpointManifest(Contract):
    """Every file of one checkpoint and its sha256, written when the checkpoint is complete and verified before
    DCP reads anything: DCP's ``.metadata`` is a pickle, so an unverified checkpoint could run code in training."""

    updates: int = Field(ge=0)
    files: dict[str, str] = Field(min_length=1)
    """file name (no directories: a checkpoint is flat) -> sha256"""

    @field_validator("files")
    @classmethod
    def _flat_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            if "/" in name or "\\" in name or name in ("", ".", "..") or not re.fullmatch(SHA256, digest):
                raise ValueError(f"{name!r}: {digest!r} is not a file name and a sha256")
        return value
