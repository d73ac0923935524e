"""The release evaluation's summary (what `evaluate` writes and the gate reads) and the gate's decision.

A summary that could not have come from a real evaluation (an interval whose low exceeds its high, a negative
latency, no action statistics, an unknown incumbent) is refused when it is read, naming the field, before the
gate weighs it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from unexrl.contracts.base import SHA256, Contract, Part
from unexrl.evaluate.stats import Estimate


class IncumbentRef(Part):
    """What the candidate was held against."""

    name: Literal["incumbent", "cem"]
    """``incumbent`` (the deployed policy) or ``cem`` (a first release: the production baseline)"""
    artifact: str
    """the policy artifact it was loaded from"""
    first_release: bool


class PolicyEstimates(Part):
    """One policy's long-term reward and session length on the evaluation seeds, with 95% CIs."""

    watch_time: Estimate
    items: Estimate
    requests: Estimate
    uplift_vs_reference_pct: Estimate | None
    """paired uplift of watch time over the incumbent (None for the incumbent itself)"""


class StageActions(Part):
    """Statistics of every action the candidate took at one stage during the evaluation, per head."""

    stage: str
    requests: int = Field(gt=0)
    heads: list[str] = Field(min_length=1)
    mean: list[float]
    std: list[float]
    min: float | None
    """None when no action was finite"""
    max: float | None
    nonfinite: int = Field(ge=0)
    out_of_bounds: int = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> StageActions:
        if not len(self.mean) == len(self.std) == len(self.heads):
            raise ValueError(f"{len(self.heads)} heads but {len(self.mean)} means and {len(self.std)} stds")
        if any(s < 0 for s in self.std if math.isfinite(s)):
            raise ValueError("a standard deviation is negative")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} exceeds max {self.max}")
        return self


class Latency(Part):
    """The candidate's decision time for one request through every stage."""

    p50_ms: float = Field(ge=0)
    p99_ms: float = Field(ge=0)
    probes: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Latency:
        if self.p99_ms < self.p50_ms:
            raise ValueError(f"p99 {self.p99_ms} ms is below p50 {self.p50_ms} ms")
        return self


class EvaluationSummary(Contract):
    """Candidate vs the incumbent and CEM on held-out seeds (unexrl.pipeline.evaluation.evaluate_release)."""

    candidate_sha256: str = Field(pattern=SHA256)
    """sha256 of the evaluated candidate's manifest.json (which hashes every file): what this summary is about"""
    seeds: list[int] = Field(min_length=1)
    candidate_seen_seeds: list[int] = Field(min_length=1)
    """the seeds the candidate's manifest says it was trained, validated or logged on: disjoint from ``seeds``"""
    sessions_per_seed: int = Field(gt=0)
    incumbent: IncumbentRef
    policies: dict[str, PolicyEstimates]
    """``candidate``, ``cem`` and, after a first release, ``incumbent``"""
    uplift_vs_incumbent_pct: Estimate
    uplift_vs_cem_pct: Estimate
    actions: list[StageActions] = Field(min_length=1)
    action_bounds: tuple[float, float]
    latency: Latency

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationSummary:
        missing = {"candidate", "cem", *(["incumbent"] if self.incumbent.name == "incumbent" else [])}
        if missing - set(self.policies):
            raise ValueError(f"policies: {sorted(missing - set(self.policies))} missing")
        low, high = self.action_bounds
        if not low < high:
            raise ValueError(f"action_bounds [{low}, {high}]: low must be below high")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} names a seed twice; each evaluation seed counts once")
        if set(self.seeds) & set(self.candidate_seen_seeds):
            raise ValueError(
                f"seeds: {sorted(set(self.seeds) & set(self.candidate_seen_seeds))} are in candidate_seen_seeds; "
                "an evaluation on them is not held out"
            )
        return self


class GateCheck(Part):
    check: str
    ok: bool
    detail: str


class GateDecision(Contract):
    """The gate's verdict on one summary: every check with its figures; ``reasons`` lists the failed ones."""

    candidate_sha256: str = Field(pattern=SHA256)
    """the artifact the verdict is about (the summary's); package ships this one or nothing"""
    passed: bool
    min_uplift_pct: float
    latency_budget_ms: float
    uplift_vs_incumbent_pct: Estimate
    checks: list[GateCheck] = Field(min_length=1)
    reasons: list[str]

    @model_validator(mode="after")
    def _consistent(self) -> GateDecision:
        if self.reasons != [c.check for c in self.checks if not c.ok] or self.passed != (not self.reasons):
            raise ValueError("passed and reasons disagree with the checks")
        return self
