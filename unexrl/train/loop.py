"""`train(config)`: online in the simulator (collect with exploration, replay, update) or offline from logs.

Both regimes share the agent's one update step; they differ only in where transitions come from. Collection and
learning use seeds.train; the learning curve is measured on seeds.validation; evaluation seeds are never touched.

The same function runs in one process and on every rank under torchrun (``ctx``, unexrl/train/distributed.py):
each rank collects its own sessions (ids ``index * world_size + rank``) or replays its own share of the logged
sessions, samples its own batches, and takes the same number of updates in lockstep; rank 0 validates.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from unexrl.config import Config
from unexrl.data import LoggedData, read_logs
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import GaussianExploration, WeightPolicy
from unexrl.rl.agent import CascadeAgent
from unexrl.rl.cqr import fit_cqr_knots
from unexrl.rl.policy import ActorPolicy
from unexrl.rl.replay import Batch, ReplayBuffer
from unexrl.sim.env import Policy, Simulator, Step
from unexrl.train.checkpoint import Checkpoints, Progress
from unexrl.train.distributed import ActingCopy, Context, average, describe, shard

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    agent: CascadeAgent
    curve: list[dict[str, float]] = field(default_factory=list)
    """validation watch time per session over updates (rank 0's; restored points included after a resume)"""
    transitions: int = 0
    resumed_from: int | None = None
    """update count of the checkpoint this run resumed from"""
    sharding: dict[str, str] = field(default_factory=dict)
    """distributed runs: where each online table lives"""
    update_seconds: float = 0.0
    """wall time inside the update steps of this run (each ends in a host sync, so it is the real cost)"""
    best_actors: nn.ModuleList | None = None
    """rank 0: an unsharded copy of the actors at the best validation score of this run (after a resume: of the
    points since the resume, as earlier points' actors are not kept); model selection on seeds.validation"""
    best_updates: int | None = None
    """the update count of ``best_actors``"""
    best_score: float | None = None
    """the validation watch time of ``best_actors``"""

    def selected(self, select: str) -> tuple[nn.ModuleList | None, int]:
        """The actors ``train.select`` picks and their update count; None: the online (final) actors."""
        if select == "best_validation" and self.best_actors is not None and self.best_updates is not None:
            return self.best_actors, self.best_updates
        return None, self.agent.updates


def _collect(sim: Simulator, buffer: ReplayBuffer, policy: Policy, seed: int, sessions: Tensor) -> int:
    steps: list[Step] = []
    rollout(sim, policy, seed, sessions, batch_size=sessions.numel(), on_step=steps.append)
    return buffer.add_steps(steps, sim.world)


def validate(sim: Simulator, actors: nn.ModuleList, sessions: int) -> float:
    """Mean session watch time of the greedy actors on the first validation seed."""
    out = rollout(sim, ActorPolicy(actors, sim.cfg, sim.world), sim.cfg.seeds.validation[0], sessions, sessions)
    return float(out.watch_time.mean())


def on_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on the training device (the replay buffer lives in host memory)."""
    if device.type == "cpu":
        return batch
    return Batch(
        tau=batch.tau.to(device), actions=tuple(x.to(device) for x in batch.actions), reward=batch.reward.to(device),
        done=batch.done.to(device), next_tau=batch.next_tau.to(device),
        next_actions=tuple(x.to(device) for x in batch.next_actions),
    )


def _share(data: LoggedData, ctx: Context) -> LoggedData:
    """This rank's share of the logs: whole sessions with ``session_id % world_size == rank``."""
    if ctx.world_size == 1:
        return data
    mine = data.transitions["session_id"].to_numpy() % ctx.world_size == ctx.rank
    return dataclasses.replace(data, transitions=data.transitions.filter(pa.array(np.asarray(mine))))


def train(
    cfg: Config, cem_weights: Tensor, sim: Simulator | None = None, logs: Path | None = None, progress: bool = True,
    *, ctx: Context | None = None, run_dir: Path | None = None, resume: bool = False,
) -> TrainResult:
    """Train ``cfg.algo`` for ``cfg.train.updates`` updates; stages that do not learn use ``cem_weights``.

    Online (``train.regime=online``): warm up under CEM + exploration, then alternate collection and updates.
    Offline (``train.regime=offline``, ``logs`` given): replay the logged transitions only.
    With ``run_dir``, a checkpoint is written every ``train.checkpoint_every`` updates and at the end under
    ``run_dir/checkpoints``; ``resume`` continues from the newest one (unexrl/train/checkpoint.py).
    ``ctx``: this rank under torchrun (unexrl/train/distributed.py); default one process on ``cfg.device``.
    """
    t, a = cfg.train, cfg.algo
    ctx = ctx or Context(device=torch.device(cfg.device))
    online = t.regime == "online"
    if not online and logs is None:
        raise ValueError("train.regime=offline needs logs (unexrl train --logs DIR)")
    sim = sim or Simulator(cfg)
    w = sim.world
    seed = cfg.seeds.train[0]
    torch.manual_seed(seed)  # the same initial networks on every rank
    agent = CascadeAgent(cfg, w.n_users, w.n_items, w.n_categories, cem_weights.cpu()).to(ctx.device)
    acting = ActingCopy(agent.actors, ctx.device)
    result = TrainResult(agent=agent)
    fused = None
    if ctx.distributed:
        dmp, plan = shard(agent, ctx, t.embedding_lr)
        fused, result.sharding = dmp.fused_optimizer, describe(plan)
    torch.manual_seed(seed + ctx.rank)  # each rank its own smoothing-noise stream
    generator = torch.Generator().manual_seed(seed + ctx.rank)
    knots = None
    if a.cqr:
        knots = torch.zeros(len(cfg.world.user_types), len(cfg.features.duration_bucket_edges_s) + 1,
                            cfg.features.cqr_knots)
    checkpoints = Checkpoints(run_dir / "checkpoints", ctx) if run_dir is not None else None
    restored = checkpoints.restore(agent, fused, knots, generator) if checkpoints is not None and resume else None
    next_session = 0
    if restored is not None:
        result.resumed_from, result.curve, next_session = restored.updates, restored.curve, restored.next_session
    log.info("train start algo=%s regime=%s updates=%d rank=%d world_size=%d resumed_from=%s", a.name, t.regime,
             t.updates, ctx.rank, ctx.world_size, result.resumed_from)

    def sessions(n: int) -> Tensor:
        """This rank's next ``n`` session ids, disjoint from every other rank's."""
        nonlocal next_session
        ids = torch.arange(next_session, next_session + n) * ctx.world_size + ctx.rank
        next_session += n
        return ids

    def explore() -> ActorPolicy:
        actors = acting.refresh(agent.actors, agent.updates)
        return ActorPolicy(actors, cfg, w, explore_std=a.exploration_std, seed=seed)

    buffer = ReplayBuffer(cfg, t.buffer_size)
    if not online:
        buffer.add_logs(_share(read_logs(logs, cfg), ctx))  # type: ignore[arg-type]
    else:  # warm-up under CEM + exploration; after a resume, re-warm-up under the restored actors
        cem = WeightPolicy(cem_weights.to(w.item_category.device), cfg.cascade)
        warm = explore() if restored is not None else GaussianExploration(cem, a.exploration_std, seed=seed)
        chunk = t.sessions_per_collect * 4
        for start in range(0, t.warmup_sessions, chunk):
            _collect(sim, buffer, warm, seed, sessions(min(chunk, t.warmup_sessions - start)))
    if knots is not None and restored is None:  # knots fitted on training transitions only (rank mean: Vincentization)
        watch, user_group, item_group = buffer.viewed_items()
        knots.copy_(average(fit_cqr_knots(watch, user_group, item_group, *knots.shape), ctx))
    buffer.cqr_knots = knots

    bar = tqdm(total=t.updates, initial=agent.updates, desc=f"train {a.name}", disable=not (progress and ctx.is_main))
    while agent.updates < t.updates:
        started = time.perf_counter()
        stats = agent.update(on_device(buffer.sample(a.batch_size, generator), ctx.device))
        result.update_seconds += time.perf_counter() - started
        bar.update(1)
        u = agent.updates
        if u % t.eval_every == 0 or u == t.updates:
            actors = acting.refresh(agent.actors, u)
            if ctx.is_main:
                score = validate(sim, actors, t.eval_sessions)
                if result.best_score is None or score > result.best_score:
                    result.best_actors, result.best_updates, result.best_score = copy.deepcopy(actors), u, score
                result.curve.append({"updates": u, "validation_watch_time": score, **stats})
                bar.set_postfix(val=f"{score:.0f}s", q=f"{stats['q']:.2f}")
        if online and u % t.updates_per_collect == 0 and u < t.updates:
            _collect(sim, buffer, explore(), seed, sessions(t.sessions_per_collect))
        if checkpoints is not None and (u % t.checkpoint_every == 0 or u == t.updates):
            checkpoints.save(agent, fused, knots, Progress(u, next_session, result.curve, ctx.world_size), generator)
    bar.close()
    result.transitions = buffer.size
    return result
