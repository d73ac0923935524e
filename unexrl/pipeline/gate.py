"""The release gate: a candidate ships only when it is better by a margin we trust and safe to serve.

Pass = every check holds:
1. uplift of long-term reward (watch time per session) over the incumbent >= ``min_uplift_pct`` (point estimate);
2. the uplift's 95% CI lower bound > 0 (the improvement is not noise);
3. every action the candidate took during evaluation was finite and within the action bounds;
4. its decision latency for one request (p99, all stages) is within ``latency_budget_ms``.
"""

from __future__ import annotations

import math
from typing import Any


def decide(summary: dict[str, Any], *, min_uplift_pct: float, latency_budget_ms: float) -> dict[str, Any]:
    """The gate's decision on an evaluation summary (unexrl.pipeline.evaluation): passed, and every check."""
    if not math.isfinite(min_uplift_pct):
        raise ValueError(f"min_uplift_pct={min_uplift_pct}: must be a finite percentage")
    if not latency_budget_ms > 0:
        raise ValueError(f"latency_budget_ms={latency_budget_ms}: must be positive")
    up = summary["uplift_vs_incumbent_pct"]
    low, high = summary["action_bounds"]
    actions = summary["actions"]
    nonfinite = sum(a["nonfinite"] for a in actions)
    outside = sum(a["out_of_bounds"] for a in actions)
    p99 = summary["latency"]["p99_ms"]
    for name, v in (
        ("uplift mean", up["mean"]),
        ("uplift low", up["low"]),
        ("uplift high", up["high"]),
        ("p99", p99),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"evaluation summary: {name} is {v!r}, not a number")
    finite_metrics = all(math.isfinite(v) for v in (up["mean"], up["low"], up["high"], p99))
    checks = [
        {"check": "metrics finite", "ok": finite_metrics, "detail": f"uplift {up}, p99 {p99}"},
        {
            "check": f"uplift >= {min_uplift_pct}%",
            "ok": finite_metrics and up["mean"] >= min_uplift_pct,
            "detail": f"{up['mean']:+.3f}% vs {summary['incumbent']['name']}",
        },
        {
            "check": "uplift CI lower bound > 0",
            "ok": finite_metrics and up["low"] > 0,
            "detail": f"95% CI [{up['low']:+.3f}, {up['high']:+.3f}]%",
        },
        {"check": "actions finite", "ok": nonfinite == 0, "detail": f"{nonfinite} non-finite values"},
        {
            "check": f"actions within [{low}, {high}]",
            "ok": outside == 0,
            "detail": f"{outside} values outside",
        },
        {
            "check": f"latency p99 <= {latency_budget_ms} ms",
            "ok": finite_metrics and p99 <= latency_budget_ms,
            "detail": f"p99 {p99:.3f} ms, p50 {summary['latency']['p50_ms']:.3f} ms",
        },
    ]
    passed = all(c["ok"] for c in checks)
    return {
        "passed": passed,
        "min_uplift_pct": min_uplift_pct,
        "latency_budget_ms": latency_budget_ms,
        "uplift_vs_incumbent_pct": up,
        "checks": checks,
        "reasons": [c["check"] for c in checks if not c["ok"]],
    }


def markdown(decision: dict[str, Any]) -> str:
    """The decision as Markdown: verdict and every check with its figures."""
    lines = [f"# Gate: {'PASS' if decision['passed'] else 'REFUSE'}", ""]
    lines += [f"- {'ok' if c['ok'] else 'FAIL'}: {c['check']} ({c['detail']})" for c in decision["checks"]]
    return "\n".join(lines) + "\n"
