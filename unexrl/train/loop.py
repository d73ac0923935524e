"""`train(config)`: online in the simulator (collect with exploration, replay, update) or offline from logs.

Both regimes share the agent's one update step; they differ only in where transitions come from. Collection and
learning use seeds.train; the learning curve is measured on seeds.validation; evaluation seeds are never touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from unexrl.config import Config
from unexrl.data import read_logs
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import GaussianExploration, WeightPolicy
from unexrl.rl.agent import CascadeAgent
from unexrl.rl.cqr import fit_cqr_knots
from unexrl.rl.policy import ActorPolicy
from unexrl.rl.replay import ReplayBuffer
from unexrl.sim.env import Policy, Simulator, Step

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    agent: CascadeAgent
    curve: list[dict[str, float]] = field(default_factory=list)
    """validation watch time per session over updates"""
    transitions: int = 0


def _collect(sim: Simulator, buffer: ReplayBuffer, policy: Policy, seed: int, first: int, sessions: int) -> int:
    steps: list[Step] = []
    rollout(sim, policy, seed, torch.arange(first, first + sessions), batch_size=sessions, on_step=steps.append)
    return buffer.add_steps(steps, sim.world)


def validate(sim: Simulator, agent: CascadeAgent, sessions: int) -> float:
    """Mean session watch time of the greedy actors on the first validation seed."""
    out = rollout(sim, ActorPolicy(agent.actors, sim.cfg, sim.world), sim.cfg.seeds.validation[0], sessions, sessions)
    return float(out.watch_time.mean())


def train(
    cfg: Config, cem_weights: Tensor, sim: Simulator | None = None, logs: Path | None = None, progress: bool = True
) -> TrainResult:
    """Train ``cfg.algo`` for ``cfg.train.updates`` updates; stages that do not learn use ``cem_weights``.

    Online (``train.regime=online``): warm up under CEM + exploration, then alternate collection and updates.
    Offline (``train.regime=offline``, ``logs`` given): replay the logged transitions only.
    """
    t, a = cfg.train, cfg.algo
    sim = sim or Simulator(cfg)
    torch.manual_seed(cfg.seeds.train[0])
    generator = torch.Generator().manual_seed(cfg.seeds.train[0])
    w = sim.world
    agent = CascadeAgent(cfg, w.n_users, w.n_items, w.n_categories, cem_weights.cpu())
    buffer = ReplayBuffer(cfg, t.buffer_size)
    seed = cfg.seeds.train[0]

    online = t.regime == "online"
    next_session = 0
    if online:  # warm-up under CEM + exploration
        cem = WeightPolicy(cem_weights.to(w.item_category.device), cfg.cascade)
        for start in range(0, t.warmup_sessions, t.sessions_per_collect * 4):
            n = min(t.sessions_per_collect * 4, t.warmup_sessions - start)
            _collect(sim, buffer, GaussianExploration(cem, a.exploration_std, seed=seed), seed, next_session, n)
            next_session += n
    elif logs is None:
        raise ValueError("train.regime=offline needs logs (unexrl train --logs DIR)")
    else:
        buffer.add_logs(read_logs(logs, cfg))
    if a.cqr:  # knots fitted on training transitions only
        watch, user_group, item_group = buffer.viewed_items()
        buffer.cqr_knots = fit_cqr_knots(watch, user_group, item_group, len(cfg.world.user_types),
                                         len(cfg.features.duration_bucket_edges_s) + 1, cfg.features.cqr_knots)

    result = TrainResult(agent=agent)
    bar = tqdm(total=t.updates, desc=f"train {a.name}", disable=not progress)
    while agent.updates < t.updates:
        for _ in range(min(t.updates_per_collect, t.updates - agent.updates)):
            stats = agent.update(buffer.sample(a.batch_size, generator))
            bar.update(1)
            if agent.updates % t.eval_every == 0 or agent.updates == t.updates:
                score = validate(sim, agent, t.eval_sessions)
                result.curve.append({"updates": agent.updates, "validation_watch_time": score, **stats})
                bar.set_postfix(val=f"{score:.0f}s", q=f"{stats['q']:.2f}")
        if online and agent.updates < t.updates:
            explore = ActorPolicy(agent.actors, cfg, w, explore_std=a.exploration_std, seed=seed)
            _collect(sim, buffer, explore, seed, next_session, t.sessions_per_collect)
            next_session += t.sessions_per_collect
    bar.close()
    result.transitions = buffer.size
    return result
