"""The release gate: a candidate ships only when it is better by a margin we trust and safe to serve.

Pass = every check holds:
1. uplift of long-term reward (watch time per session) over the incumbent >= ``min_uplift_pct`` (point estimate);
2. the uplift's 95% CI lower bound > 0 (the improvement is not noise);
3. every action the candidate took during evaluation was finite and within the action bounds;
4. its decision latency for one request (p99, all stages) is within ``latency_budget_ms``.
"""

from __future__ import annotations

import math

from unexrl.contracts.evaluation import EvaluationSummary, GateCheck, GateDecision


def decide(summary: EvaluationSummary, *, min_uplift_pct: float, latency_budget_ms: float) -> GateDecision:
    """The gate's decision on an evaluation summary (validated when it was read: unexrl.contracts.evaluation)."""
    if not math.isfinite(min_uplift_pct):
        raise ValueError(f"min_uplift_pct={min_uplift_pct}: must be a finite percentage")
    if not (math.isfinite(latency_budget_ms) and latency_budget_ms > 0):
        raise ValueError(f"latency_budget_ms={latency_budget_ms}: must be a positive number of milliseconds")
    up = summary.uplift_vs_incumbent_pct
    low, high = summary.action_bounds
    nonfinite = sum(a.nonfinite for a in summary.actions)
    outside = sum(a.out_of_bounds for a in summary.actions)
    p50, p99 = summary.latency.p50_ms, summary.latency.p99_ms
    finite = all(math.isfinite(v) for v in (up.mean, up.low, up.high, p99))
    checks = [
        ("metrics finite", finite, f"uplift {up.fmt(3)}%, p99 {p99} ms"),
        (f"uplift >= {min_uplift_pct}%", finite and up.mean >= min_uplift_pct,
         f"{up.mean:+.3f}% vs {summary.incumbent.name}"),
        ("uplift CI lower bound > 0", finite and up.low > 0, f"95% CI [{up.low:+.3f}, {up.high:+.3f}]%"),
        ("actions finite", nonfinite == 0, f"{nonfinite} non-finite values"),
        (f"actions within [{low}, {high}]", outside == 0, f"{outside} values outside"),
        (f"latency p99 <= {latency_budget_ms} ms", finite and p99 <= latency_budget_ms,
         f"p99 {p99:.3f} ms, p50 {p50:.3f} ms"),
    ]  # fmt: skip
    failed = [name for name, ok, _ in checks if not ok]
    return GateDecision(
        candidate_sha256=summary.candidate_sha256,
        passed=not failed,
        min_uplift_pct=min_uplift_pct,
        latency_budget_ms=latency_budget_ms,
        uplift_vs_incumbent_pct=up,
        checks=[GateCheck(check=name, ok=ok, detail=detail) for name, ok, detail in checks],
        reasons=failed,
    )


def markdown(decision: GateDecision) -> str:
    """The decision as Markdown: verdict and every check with its figures."""
    lines = [f"# Gate: {'PASS' if decision.passed else 'REFUSE'}", ""]
    lines += [f"- {'ok' if c.ok else 'FAIL'}: {c.check} ({c.detail})" for c in decision.checks]
    return "\n".join(lines) + "\n"
