"""The release evaluation: candidate vs the incumbent and CEM on held-out seeds, and what the gate reads.

Long-term reward (watch time per session) with 95% bootstrap CIs, paired uplifts (common random numbers), the
candidate's actions per stage (mean, std, min, max, non-finite and out-of-bounds counts over every request of the
evaluation) and its decision latency for one request through the whole cascade.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unexrl.cascade import StageView, run_cascade
from unexrl.config import Config
from unexrl.contracts import files
from unexrl.contracts.evaluation import (
    EvaluationSummary,
    IncumbentRef,
    Latency,
    PolicyEstimates,
    StageActions,
)
from unexrl.evaluate.evaluation import METRICS
from unexrl.io import atomic_write_text
from unexrl.sim.env import Observation, Policy, Simulator

LATENCY_PROBES = 200


@dataclass
class ActionRecorder:
    """Wraps a policy and accumulates statistics of every action it takes, per stage and head."""

    policy: Policy
    low: float
    high: float
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)

    def act(self, obs: Observation, view: StageView) -> Tensor:
        a = self.policy.act(obs, view)
        x = a.detach().double().cpu()
        finite = torch.isfinite(x)
        s = self.stats.setdefault(
            view.stage,
            {
                "n": 0,
                "sum": 0.0,
                "sumsq": 0.0,
                "min": math.inf,
                "max": -math.inf,
                "nonfinite": 0,
                "out_of_bounds": 0,
            },
        )
        clean = torch.where(finite, x, torch.zeros_like(x))
        s["n"] += x.shape[0]
        s["sum"] = s["sum"] + clean.sum(0)
        s["sumsq"] = s["sumsq"] + (clean**2).sum(0)
        s["nonfinite"] += int((~finite).sum())
        s["out_of_bounds"] += int(((x < self.low) | (x > self.high)).sum())
        if finite.any():
            s["min"] = min(s["min"], float(x[finite].min()))
            s["max"] = max(s["max"], float(x[finite].max()))
        return a

    def summary(self, cfg: Config) -> list[StageActions]:
        out = []
        for i, stage in enumerate(cfg.cascade.stages):
            s = self.stats.get(i)
            if s is None or s["n"] == 0:
                raise RuntimeError(f"stage {stage.name}: the policy never acted during evaluation")
            mean = s["sum"] / s["n"]
            std = torch.sqrt(torch.clamp(s["sumsq"] / s["n"] - mean**2, min=0))
            out.append(
                StageActions(
                    stage=stage.name,
                    requests=s["n"],
                    heads=list(stage.heads),
                    mean=[float(v) for v in mean],
                    std=[float(v) for v in std],
                    min=s["min"] if math.isfinite(s["min"]) else None,
                    max=s["max"] if math.isfinite(s["max"]) else None,
                    nonfinite=s["nonfinite"],
                    out_of_bounds=s["out_of_bounds"],
                )
            )
        return out


def decision_latency(sim: Simulator, policy: Policy, probes: int = LATENCY_PROBES) -> Latency:
    """Milliseconds for the policy to act at every stage of one request (tau^1 given), p50 / p99 over probes."""
    seed = sim.cfg.seeds.evaluation[0]
    times = []
    with torch.no_grad():
        for i in range(probes):
            obs = sim.observe(sim.start(seed, torch.tensor([i])))
            started = time.perf_counter()
            run_cascade(obs.predictions, sim.keep, lambda view, obs=obs: policy.act(obs, view))
            times.append((time.perf_counter() - started) * 1000.0)
    ms = np.asarray(times[min(10, probes // 10) :])  # the first calls warm caches
    return Latency(p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)), probes=probes)


def evaluate_release(
    cfg: Config,
    *,
    candidate: Path,
    cem: Path,
    incumbent: Path | None,
    out: Path,
    seeds: list[int] | None = None,
) -> EvaluationSummary:
    """Evaluate and write ``out``/summary.json, report.md and evaluation.png; returns the summary.

    Without an incumbent (a first release) the incumbent is CEM, the production baseline.
    """
    from unexrl.artifacts import load_any_artifact
    from unexrl.contracts.artifact import ArtifactManifest
    from unexrl.evaluate.evaluation import evaluate_policies
    from unexrl.evaluate.stats import bootstrap_uplift

    seeds = [int(s) for s in seeds] if seeds else list(cfg.seeds.evaluation)
    if len(set(seeds)) != len(seeds):  # before any rollout; the summary refuses it as well
        raise ValueError(f"evaluation seeds {seeds} name a seed twice; each evaluation seed counts once")

    # held out from what each policy saw, as its manifest records it (the evaluation config may say otherwise)
    def held_out(used: set[int], whose: str) -> None:
        if used & set(seeds):
            raise ValueError(
                f"evaluation seeds {sorted(used & set(seeds))} are among {whose}: evaluate on held-out seeds only"
            )

    held_out({*cfg.seeds.train, *cfg.seeds.validation}, "the config's training and validation seeds")
    sim = Simulator(cfg)
    # each artifact read once: the policy evaluated, the seeds it saw and its identity all from that reading
    policies: dict[str, Policy] = {}
    manifests: dict[str, ArtifactManifest] = {}
    for name, path in (("candidate", candidate), ("cem", cem), ("incumbent", incumbent)):
        if path is not None:
            policies[name], manifests[name] = load_any_artifact(Path(path), cfg, sim.world)
            held_out(set(manifests[name].seen_seeds), f"the seeds the {name}'s manifest says it saw")
    recorder = ActionRecorder(policies["candidate"], cfg.cascade.action_low, cfg.cascade.action_high)
    policies["candidate"] = recorder
    reference = "incumbent" if incumbent is not None else "cem"
    report = evaluate_policies(sim, policies, seeds=tuple(seeds), reference=reference, progress=False)
    cand = report.results["candidate"].by_seed("watch_time")
    uplift_cem = bootstrap_uplift(cand, report.results["cem"].by_seed("watch_time"), cfg.evaluation.bootstrap)
    summary = EvaluationSummary(
        candidate_sha256=manifests["candidate"].sha256,
        seeds=seeds,
        candidate_seen_seeds=sorted(manifests["candidate"].seen_seeds),
        sessions_per_seed=report.sessions_per_seed,
        incumbent=IncumbentRef(
            name=reference, artifact=str(incumbent or cem), first_release=incumbent is None
        ),
        policies={
            name: PolicyEstimates(**{m: r.estimates[m] for m in METRICS}, uplift_vs_reference_pct=r.uplift)
            for name, r in report.results.items()
        },
        uplift_vs_incumbent_pct=report.results["candidate"].uplift,
        uplift_vs_cem_pct=uplift_cem,
        actions=recorder.summary(cfg),
        action_bounds=(cfg.cascade.action_low, cfg.cascade.action_high),
        latency=decision_latency(sim, recorder.policy),
    )
    out.mkdir(parents=True, exist_ok=True)
    report.plot(out / files.EVALUATION_PLOT)
    atomic_write_text(out / files.REPORT, report_markdown(summary, report.to_markdown()))
    summary.write(out / files.SUMMARY)  # last: the gate reads it
    return summary


def report_markdown(summary: EvaluationSummary, table: str) -> str:
    """The evaluation as the Markdown the Kubeflow UI shows."""
    up, upc, lat = summary.uplift_vs_incumbent_pct, summary.uplift_vs_cem_pct, summary.latency
    lines = [
        "# Candidate evaluation",
        "",
        f"Incumbent: `{summary.incumbent.name}`"
        + (" (first release: CEM)" if summary.incumbent.first_release else ""),
        "",
        table,
        "",
        f"- uplift vs incumbent: **{up.mean:+.2f}%** [{up.low:+.2f}, {up.high:+.2f}]",
        f"- uplift vs CEM: {upc.mean:+.2f}% [{upc.low:+.2f}, {upc.high:+.2f}]",
        f"- decision latency (one request, all stages): p50 {lat.p50_ms:.2f} ms, p99 {lat.p99_ms:.2f} ms",
        "",
        "## Candidate actions per stage",
        "",
        "| stage | requests | mean | std | min | max | non-finite | out of bounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in summary.actions:
        lines.append(
            f"| {a.stage} | {a.requests:,} | {_weights(a.mean)} | {_weights(a.std)} "
            f"| {_weight(a.min)} | {_weight(a.max)} | {a.nonfinite} | {a.out_of_bounds} |"
        )
    return "\n".join(lines) + "\n"


def _weight(value: float | None) -> str:
    """A stage weight to the 3 decimals an action's effect shows at (the summary keeps full precision)."""
    return "-" if value is None else f"{value:.3f}"


def _weights(values: list[float]) -> str:
    return ", ".join(map(_weight, values))
