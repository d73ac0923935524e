"""95% bootstrap confidence intervals over seeds and users (sessions), paired where policies share sessions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator


class Estimate(BaseModel):
    """A point estimate with its 95% bootstrap interval. NaN stands where a metric could not be computed (the
    release gate refuses it); an interval whose low exceeds its high is impossible and refused here."""

    model_config = ConfigDict(frozen=True, strict=True, ser_json_inf_nan="constants")

    mean: float
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Estimate:
        if math.isfinite(self.low) and math.isfinite(self.high) and self.low > self.high:
            raise ValueError(f"interval low {self.low} exceeds its high {self.high}")
        return self

    def as_dict(self) -> dict[str, float]:
        return self.model_dump()

    def fmt(self, digits: int = 1) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _replicate_means(by_seed: Sequence[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, ...] means of a two-level bootstrap: resample seeds, then sessions within each seed.

    Each seed's array is [sessions, ...]; trailing columns (e.g. two policies on the same sessions) are
    resampled together, which makes their replicates paired.
    """
    rng = np.random.default_rng(seed)
    n_seeds = len(by_seed)
    sizes = np.array([len(v) for v in by_seed], dtype=np.float64)
    per_seed = np.stack(
        [v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1) for v in by_seed], axis=1
    )  # [n_boot, n_seeds, ...]
    picked = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    weights = sizes[picked].reshape(n_boot, n_seeds, *([1] * (per_seed.ndim - 2)))
    return (per_seed[np.arange(n_boot)[:, None], picked] * weights).sum(1) / weights.sum(1)


def _interval(point: float, reps: np.ndarray) -> Estimate:
    return Estimate(
        mean=float(point), low=float(np.percentile(reps, 2.5)), high=float(np.percentile(reps, 97.5))
    )


def bootstrap_mean(by_seed: Sequence[np.ndarray], n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Mean over all sessions with a 95% interval from resampling seeds and sessions."""
    arrays = [np.asarray(v, dtype=np.float64) for v in by_seed]
    return _interval(np.concatenate(arrays).mean(), _replicate_means(arrays, n_boot, seed))


def bootstrap_uplift(
    candidate: Sequence[np.ndarray], reference: Sequence[np.ndarray], n_boot: int = 1000, seed: int = 0
) -> Estimate:
    """Relative uplift of the candidate's mean over the reference's, in percent, paired by session.

    Both policies must have been rolled out on the same seeds and session ids (common random numbers), so
    each replicate resamples the same sessions for both.
    """
    if [len(c) for c in candidate] != [len(r) for r in reference]:
        raise ValueError("paired uplift needs the same sessions per seed for both policies")
    pairs = [
        np.stack([np.asarray(c, np.float64), np.asarray(r, np.float64)], axis=1)
        for c, r in zip(candidate, reference)
    ]
    reps = _replicate_means(pairs, n_boot, seed)
    pooled = np.concatenate(pairs).mean(0)
    return _interval(100.0 * (pooled[0] / pooled[1] - 1.0), 100.0 * (reps[:, 0] / reps[:, 1] - 1.0))
