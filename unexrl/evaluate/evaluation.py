"""Offline evaluation: roll policies out on held-out seeds, report long-term reward with 95% CIs.

Every policy runs on the same seeds and session ids, so the same users and the same randomness meet every
policy (common random numbers) and uplifts are paired.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from unexrl.evaluate.rollout import SessionOutcomes, rollout
from unexrl.evaluate.stats import Estimate, bootstrap_mean, bootstrap_uplift
from unexrl.io import atomic_write_text, write_figure
from unexrl.sim.env import Policy, Simulator

METRICS = {
    "watch_time": "watch time / session (s)",
    "items": "session length (items)",
    "requests": "requests / session",
}


@dataclass
class PolicyResult:
    """One policy's outcomes per evaluation seed and their summaries."""

    name: str
    outcomes: list[SessionOutcomes]
    estimates: dict[str, Estimate]
    uplift: Estimate | None = None
    """paired uplift of watch time over the reference policy, percent"""

    def by_seed(self, metric: str) -> list[np.ndarray]:
        return [getattr(o, metric) for o in self.outcomes]


@dataclass
class EvaluationReport:
    seeds: tuple[int, ...]
    sessions_per_seed: int
    reference: str | None
    results: dict[str, PolicyResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seeds": list(self.seeds),
            "sessions_per_seed": self.sessions_per_seed,
            "reference": self.reference,
            "policies": {
                name: {
                    **{m: r.estimates[m].as_dict() for m in METRICS},
                    "uplift_vs_reference_pct": r.uplift.as_dict() if r.uplift else None,
                }
                for name, r in self.results.items()
            },
        }

    def to_markdown(self) -> str:
        ref = f"uplift vs {self.reference} (%)" if self.reference else "uplift (%)"
        head = ["policy", *METRICS.values(), ref]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in self.results.items():
            cells = [
                r.estimates["watch_time"].fmt(0),
                r.estimates["items"].fmt(1),
                r.estimates["requests"].fmt(2),
            ]
            cells.append(r.uplift.fmt(1) if r.uplift else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            f"Means over {self.sessions_per_seed} sessions x {len(self.seeds)} held-out seeds {list(self.seeds)}; "
            "95% bootstrap intervals over seeds and sessions; uplifts paired by session."
        )
        return "\n".join(lines)

    def write(
        self, json_path: Path | None = None, md_path: Path | None = None, png_path: Path | None = None
    ) -> None:
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json_path, json.dumps(self.to_dict(), indent=2))
        if md_path:
            md_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(md_path, self.to_markdown() + "\n")
        if png_path:
            self.plot(png_path)

    def plot(self, path: Path) -> None:
        """Bar chart of watch time and session length per policy, with 95% intervals."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.results)
        fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(names) + 1.8))
        for ax, metric in zip(axes, ("watch_time", "items")):
            est = [self.results[n].estimates[metric] for n in names]
            means = np.array([e.mean for e in est])
            err = np.array([[e.mean - e.low for e in est], [e.high - e.mean for e in est]])
            ax.barh(names, means, xerr=err, color="#4C72B0", capsize=3)
            ax.set_xlabel(METRICS[metric])
            ax.invert_yaxis()
            ax.grid(axis="x", alpha=0.3)
        axes[1].set_yticklabels([])
        fig.suptitle(
            f"Held-out evaluation ({len(self.seeds)} seeds x {self.sessions_per_seed} sessions, 95% CI)"
        )
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_figure(fig, path)


def evaluate_policies(
    sim: Simulator,
    policies: dict[str, Policy],
    seeds: tuple[int, ...] | None = None,
    sessions_per_seed: int | None = None,
    reference: str | None = "cem",
    progress: bool = True,
) -> EvaluationReport:
    """Roll every policy out on the evaluation seeds (by default ``cfg.seeds.evaluation``) and summarise."""
    cfg = sim.cfg
    seeds = tuple(seeds if seeds is not None else cfg.seeds.evaluation)
    n = sessions_per_seed or cfg.evaluation.sessions_per_seed
    report = EvaluationReport(
        seeds=seeds, sessions_per_seed=n, reference=reference if reference in policies else None
    )
    for name, policy in tqdm(policies.items(), desc="evaluate", disable=not progress):
        outcomes = [rollout(sim, policy, s, n, cfg.evaluation.batch_size) for s in seeds]
        by_seed = {m: [getattr(o, m) for o in outcomes] for m in METRICS}
        estimates = {m: bootstrap_mean(v, cfg.evaluation.bootstrap) for m, v in by_seed.items()}
        report.results[name] = PolicyResult(name=name, outcomes=outcomes, estimates=estimates)
    if report.reference:
        ref = report.results[report.reference].by_seed("watch_time")
        for name, r in report.results.items():
            if name != report.reference:
                r.uplift = bootstrap_uplift(r.by_seed("watch_time"), ref, cfg.evaluation.bootstrap)
    return report
