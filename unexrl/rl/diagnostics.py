"""Critic diagnostics against the simulator's truth, on fresh sessions of a validation seed.

Two checks say whether a critic can guide its actors (spec: "how to check a critic"):

- calibration: Q_1(tau_t, a_t) of logged transitions against the Monte-Carlo discounted training-reward return G_t
  of the same transitions (relative bias of the means, correlation), overall and per activity group;
- direction: per activity group, the mean critic gradient dQ/da at the actors' own actions, over the states they
  reach without exploration noise, against the simulator's true gradient of mean session watch time with respect
  to that group's weights (unexrl/rl/truth.py): cosine and sign agreement, per group and per stage.

The same finite-difference rollouts give the true gradient of the discounted training return: its cosine with the
watch-time gradient (``reward_alignment``) says whether the reward the critic learns points where watch time rises.
Transitions use session ids from ``FRESH_SESSIONS`` and the finite differences from ``FD_SESSIONS`` of
``seeds.validation[-1]``, apart from the validation curve's sessions (ids from 0); training and evaluation seeds
are never used.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unexrl.contracts.diagnostics import (
    Calibration,
    CriticDiagnostics,
    GradientCheck,
    GroupCalibration,
    PerGroup,
)
from unexrl.evaluate.rollout import rollout
from unexrl.io import write_figure
from unexrl.rl.agent import CascadeAgent
from unexrl.rl.cqr import duration_bucket, training_reward
from unexrl.rl.policy import ActorPolicy
from unexrl.rl.replay import ReplayBuffer
from unexrl.rl.truth import cosine, true_gradient
from unexrl.sim.env import Simulator, Step

FRESH_SESSIONS = 10_000_000
"""first session id of the transitions the critic is scored on"""
FD_SESSIONS = 20_000_000
"""first session id of the finite-difference rollouts"""


def _returns(reward: Tensor, done: Tensor, next_index: Tensor, gamma: float, horizon: int) -> Tensor:
    """Monte-Carlo discounted returns along the buffer's next-request links (``horizon`` >= any session's length)."""
    g = reward.clone()
    for _ in range(horizon):
        g = reward + gamma * (1.0 - done) * g[next_index]
    return g


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else 0.0


def _calibration(q: np.ndarray, g: np.ndarray, groups: np.ndarray, n_groups: int) -> Calibration:
    def one(mask: np.ndarray) -> tuple[int, float, float, float, float]:
        mq, mg = float(q[mask].mean()), float(g[mask].mean())
        return int(mask.sum()), mq, mg, (mq - mg) / max(abs(mg), 1e-9), _correlation(q[mask], g[mask])

    per_group = []
    for k in range(n_groups):
        mask = groups == k
        if mask.any():
            n, mq, mg, bias, corr = one(mask)
            per_group.append(
                GroupCalibration(
                    group=k, transitions=n, mean_q=mq, mean_return=mg, relative_bias=bias, correlation=corr
                )
            )
    n, mq, mg, bias, corr = one(np.ones_like(groups, dtype=bool))
    return Calibration(
        transitions=n, mean_q=mq, mean_return=mg, relative_bias=bias, correlation=corr, per_group=per_group
    )


def _masked_cosine(critic: np.ndarray, truth: np.ndarray) -> float:
    """The cosine on the weights a critic reads (NaN if it reads none: independent DDPG's other stages, a group
    with no transitions)."""
    known = ~np.isnan(critic)
    return cosine(critic[known], truth[known]) if known.any() else float("nan")


def _sign_agreement(critic: np.ndarray, truth: np.ndarray) -> float:
    """The share of the weights a critic reads whose gradient sign it gets right (NaN if it reads none)."""
    known = ~np.isnan(critic)
    return float(np.mean(np.sign(critic[known]) == np.sign(truth[known]))) if known.any() else float("nan")


def _group_means(grad: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """[group][weight] mean critic gradient; NaN for a group none of whose transitions were seen, so that it
    scores no cosine (not the 0 a zero vector would) and stays out of the means over groups."""
    return np.stack(
        [
            grad[groups == k].mean(0) if (groups == k).any() else np.full(grad.shape[1], np.nan)
            for k in range(n_groups)
        ]
    )


def diagnose(
    agent: CascadeAgent, sim: Simulator, actors: nn.Module, knots: Tensor | None
) -> CriticDiagnostics:
    """Score ``agent``'s critic on fresh validation sessions against the simulator's truth: its values on its
    behaviour policy's (``actors``, an unsharded copy of the agent's actors, with the training exploration noise),
    its action gradient on the actors' own without the noise."""
    started = time.perf_counter()
    cfg, d = agent.cfg, agent.cfg.diagnostics
    w = sim.world
    seed = cfg.seeds.validation[-1]
    n_groups = len(cfg.world.user_types)

    ids = FRESH_SESSIONS + torch.arange(d.sessions)
    device = next(agent.parameters()).device

    def fresh(policy: ActorPolicy) -> tuple[ReplayBuffer, Tensor]:
        """The policy's transitions on the fresh sessions, in a buffer of their own, and all their indices."""
        steps: list[Step] = []
        rollout(sim, policy, seed, ids, min(d.sessions, cfg.evaluation.batch_size), on_step=steps.append)
        buffer = ReplayBuffer(cfg, d.sessions * cfg.session.max_requests)
        buffer.add_steps(steps, w)
        buffer.set_knots(knots)
        return buffer, torch.arange(buffer.size)

    # calibration: Q_1 of the behaviour policy's logged actions against their Monte-Carlo returns
    logged, idx = fresh(ActorPolicy(actors, cfg, w, explore_std=cfg.algo.exploration_std, seed=seed))
    g = _returns(
        logged.reward(idx),
        logged.done[idx].float(),
        logged.next_index[idx],
        cfg.algo.gamma,
        cfg.session.max_requests,
    )
    batch = logged.batch(idx).to(device)
    q = agent.q_values(batch).cpu().numpy()
    groups = batch.tau.activity_group.cpu().numpy()
    # direction: dQ/da at the actors' own actions, over the states the actors reach without noise, those of the
    # policy whose true gradient it is compared with (the deterministic policy gradient averages over them)
    own, own_idx = fresh(ActorPolicy(actors, cfg, w))
    own_batch = own.batch(own_idx).to(device)
    grad = agent.action_gradient(own_batch).cpu().numpy()
    own_groups = own_batch.tau.activity_group.cpu().numpy()

    def step_reward(step: Step) -> Tensor:
        item_group = duration_bucket(w.item_duration[step.page_items], cfg.features.duration_bucket_edges_s)
        r = training_reward(
            step.response.watch_time,
            step.response.viewed,
            step.obs.activity_group,
            item_group,
            None if knots is None else knots.to(step.page_items.device),
            cfg,
        )
        return r * cfg.algo.gamma ** step.obs.step.float()

    truth = true_gradient(
        sim,
        ActorPolicy(actors, cfg, w),
        seed,
        FD_SESSIONS + torch.arange(d.gradient_sessions),
        d.delta,
        d.batch_rows,
        training_reward=step_reward,
    )
    slices = [
        slice(sum(cfg.cascade.action_dims[:i]), sum(cfg.cascade.action_dims[: i + 1]))
        for i in range(len(cfg.cascade.stages))
    ]
    critic = _group_means(grad, own_groups, n_groups)
    cos = [_masked_cosine(critic[k], truth.gradient[k]) for k in range(n_groups)]
    signs = [_sign_agreement(critic[k], truth.gradient[k]) for k in range(n_groups)]
    stage_cos = [
        [_masked_cosine(critic[k][s], truth.gradient[k][s]) for s in slices] for k in range(n_groups)
    ]
    stage_signs = [
        [_sign_agreement(critic[k][s], truth.gradient[k][s]) for s in slices] for k in range(n_groups)
    ]
    assert truth.training_gradient is not None
    alignment = [cosine(truth.training_gradient[k], truth.gradient[k]) for k in range(n_groups)]
    own = [_masked_cosine(critic[k], truth.training_gradient[k]) for k in range(n_groups)]
    return CriticDiagnostics(
        seed=seed,
        updates=agent.updates,
        calibration=_calibration(q, g.numpy(), groups, n_groups),
        gradient=GradientCheck(
            cosine=PerGroup.of(cos),
            sign_agreement=PerGroup.of(signs),
            stage_cosine=stage_cos,
            stage_sign_agreement=stage_signs,
            critic=critic.tolist(),
            truth=truth.gradient.tolist(),
            truth_split_half_cosine=truth.split_half_cosine.tolist(),
            cosine_training_return=PerGroup.of(own),
            sessions=truth.sessions,
            delta=truth.delta,
        ),
        reward_alignment=PerGroup.of(alignment),
        seconds=round(time.perf_counter() - started, 1),
    )


def weight_names(cfg: Any) -> list[str]:
    """``stage.head`` for every weight of the concatenated action."""
    return [f"{s.name}.{h}" for s in cfg.cascade.stages for h in s.heads]


def signed(x: float) -> str:
    """A cosine as a table shows it: signed, two decimals; '-' where there is none (NaN)."""
    return "-" if np.isnan(x) else f"{x:+.2f}"


def _share(x: float) -> str:
    """A share as a table shows it; '-' where there is none (NaN)."""
    return "-" if np.isnan(x) else f"{x:.2f}"


def diagnostics_markdown(diag: CriticDiagnostics, group_names: list[str]) -> str:
    """The diagnostics as a table a person reads: one row per activity group, then the overall line."""
    c, gr = diag.calibration, diag.gradient
    lines = [
        (
            f"Critic diagnostics after {diag.updates} updates (validation seed {diag.seed}, {c.transitions} fresh "
            f"transitions; truth from {gr.sessions} sessions per finite difference, +-{gr.delta})."
        ),
        "",
        (
            "| group | transitions | mean Q | mean return | relative bias | correlation | gradient cosine | sign agreement "
            "| stage cosines | truth repeatability | cosine vs training return | reward alignment |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cal in c.per_group:
        stages = " / ".join(signed(x) for x in gr.stage_cosine[cal.group])
        lines.append(
            f"| {group_names[cal.group]} | {cal.transitions} | {cal.mean_q:.2f} | {cal.mean_return:.2f} "
            f"| {cal.relative_bias:+.0%} | {cal.correlation:.2f} | {signed(gr.cosine.per_group[cal.group])} "
            f"| {_share(gr.sign_agreement.per_group[cal.group])} | {stages} | {gr.truth_split_half_cosine[cal.group]:.2f} "
            f"| {signed(gr.cosine_training_return.per_group[cal.group])} | {diag.reward_alignment.per_group[cal.group]:+.2f} |"
        )
    lines.append(
        f"| **all** | {c.transitions} | {c.mean_q:.2f} | {c.mean_return:.2f} | {c.relative_bias:+.0%} "
        f"| {c.correlation:.2f} | {signed(gr.cosine.mean)} | {_share(gr.sign_agreement.mean)} | | "
        f"| {signed(gr.cosine_training_return.mean)} | {diag.reward_alignment.mean:+.2f} |"
    )
    return "\n".join(lines)


def plot_diagnostics(diag: CriticDiagnostics, names: list[str], group_names: list[str], path: Path) -> None:
    """Per activity group: the critic's mean dQ/da against the true gradient, each scaled to unit length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(diag.gradient.truth)
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.6 * n), sharex=True)
    x = np.arange(len(names))
    for k, ax in enumerate(np.atleast_1d(axes)):
        truth = np.asarray(diag.gradient.truth[k])
        critic = np.nan_to_num(np.asarray(diag.gradient.critic[k]))
        ax.bar(x - 0.2, truth / max(np.linalg.norm(truth), 1e-12), 0.4, label="simulator (true)")
        ax.bar(x + 0.2, critic / max(np.linalg.norm(critic), 1e-12), 0.4, label="critic dQ/da")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel(group_names[k])
        ax.set_title(f"{group_names[k]}: cosine {signed(diag.gradient.cosine.per_group[k])}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(f"Critic action gradient vs the simulator's truth ({diag.updates} updates)", fontsize=10)
    fig.tight_layout()
    write_figure(fig, path, dpi=110)
