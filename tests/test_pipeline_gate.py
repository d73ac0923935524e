"""The gate's decision on evaluation summaries, without running an evaluation."""

from __future__ import annotations

import math
from typing import Any

import pytest

from unexrl.pipeline.gate import decide


def summary(
    mean: Any = 2.0, low: Any = 0.5, high: Any = 3.5, p99: Any = 4.0, nonfinite: int = 0
) -> dict[str, Any]:
    return {
        "uplift_vs_incumbent_pct": {"mean": mean, "low": low, "high": high},
        "incumbent": {"name": "cem"},
        "action_bounds": [-1.0, 1.0],
        "actions": [{"nonfinite": nonfinite, "out_of_bounds": 0}],
        "latency": {"p50_ms": 2.0, "p99_ms": p99},
    }


def test_passes_only_when_every_check_holds() -> None:
    assert decide(summary(), min_uplift_pct=1.0, latency_budget_ms=10.0)["passed"]
    for changed, reason in (
        (summary(mean=0.5), "uplift >= 1.0%"),
        (summary(low=-0.1), "uplift CI lower bound > 0"),
        (summary(p99=50.0), "latency p99 <= 10.0 ms"),
        (summary(nonfinite=1), "actions finite"),
        (summary(high=math.nan), "metrics finite"),
    ):
        decision = decide(changed, min_uplift_pct=1.0, latency_budget_ms=10.0)
        assert not decision["passed"] and reason in decision["reasons"], decision["reasons"]


def test_a_summary_without_numbers_is_an_error_that_names_the_field() -> None:
    with pytest.raises(TypeError, match="uplift low is None"):
        decide(summary(low=None), min_uplift_pct=1.0, latency_budget_ms=10.0)
