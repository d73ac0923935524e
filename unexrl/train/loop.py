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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn
from torchrec.optim.keyed import KeyedOptimizer
from tqdm.auto import tqdm

from unexrl.config import Config
from unexrl.contracts.actors import TrainingSetRecord
from unexrl.contracts.diagnostics import CriticDiagnostics
from unexrl.contracts.logs import LogManifest
from unexrl.contracts.training import CurvePoint, TrainingProgress
from unexrl.data import LoggedData, read_logs
from unexrl.evaluate.rollout import rollout
from unexrl.features.training_set import verify_training_set
from unexrl.policies.weights import GaussianExploration, WeightPolicy
from unexrl.rl.agent import CascadeAgent, build_actors
from unexrl.rl.cqr import fit_cqr_knots, n_item_groups
from unexrl.rl.diagnostics import diagnose
from unexrl.rl.networks import Standardize
from unexrl.rl.policy import ActorPolicy
from unexrl.rl.replay import ReplayBuffer
from unexrl.sim.env import Policy, Simulator, Step
from unexrl.train.checkpoint import Checkpoints
from unexrl.train.distributed import ActingCopy, Context, average, describe, full_state_dict, shard

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    agent: CascadeAgent
    curve: list[CurvePoint] = field(default_factory=list)
    """validation watch time per session over updates (rank 0's; restored points included after a resume)"""
    transitions: int = 0
    resumed_from: int | None = None
    """update count of the checkpoint this run resumed from"""
    sharding: dict[str, str] = field(default_factory=dict)
    """distributed runs: where each online table lives"""
    seconds: dict[str, float] = field(default_factory=dict)
    """wall time of this run by part: update (inside the update steps; each ends in a host sync, so it is the
    real cost), sample (drawing batches from the replay buffer), collect, validate, diagnose"""
    best_actors: nn.Module | None = None
    """rank 0: an unsharded copy of the actors at the best validation score of this run (a resume restores it
    from the checkpoint, so a crash does not change which actors are selected); model selection on
    seeds.validation"""
    best_updates: int | None = None
    """the update count of ``best_actors``"""
    best_score: float | None = None
    """the validation watch time of ``best_actors``"""
    knots: Tensor | None = None
    """the CQR knots the run trained on (None without CQR)"""
    offline: OfflineInputs | None = None
    """offline: what the run read from its logs and training set, as validated"""

    def selected(self, select: str) -> tuple[nn.Module | None, int]:
        """The actors ``train.select`` picks and their update count; None: the online (final) actors."""
        if select == "best_validation" and self.best_actors is not None and self.best_updates is not None:
            return self.best_actors, self.best_updates
        return None, self.agent.updates


def _diagnose(
    agent: CascadeAgent,
    sim: Simulator,
    actors: nn.Module,
    knots: Tensor | None,
    ctx: Context,
    rows: tuple[int, int, int],
    cem_weights: Tensor,
) -> CriticDiagnostics | None:
    """Rank 0's critic diagnostics (unexrl/rl/diagnostics.py); every rank calls it. Sharded tables are assembled
    whole first (a collective), so rank 0 scores an unsharded copy of the agent alone."""
    if not ctx.distributed:
        return diagnose(agent, sim, actors, knots)
    state = full_state_dict(agent, ctx.device)
    if not ctx.is_main:
        return None
    whole = CascadeAgent(agent.cfg, *rows, cem_weights.cpu()).to(ctx.device)
    whole.load_state_dict(state)
    whole.updates = agent.updates
    return diagnose(whole, sim, actors, knots)


class _Timer:
    """``with timed("part"):`` adds the block's wall time to ``seconds["part"]``."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - started


def _collect(sim: Simulator, buffer: ReplayBuffer, policy: Policy, seed: int, sessions: Tensor) -> int:
    steps: list[Step] = []
    rollout(sim, policy, seed, sessions, batch_size=sessions.numel(), on_step=steps.append)
    return buffer.add_steps(steps, sim.world)


def validate(cfg: Config, sim: Simulator, actors: nn.Module, sessions: int) -> float:
    """Mean session watch time of the greedy actors (built for ``cfg``) on the first validation seed."""
    out = rollout(sim, ActorPolicy(actors, cfg, sim.world), cfg.seeds.validation[0], sessions, sessions)
    return float(out.watch_time.mean())


STANDARDIZE_ROWS = 20_000
"""transitions the dense inputs' standardisation is fitted on (or the whole buffer, when smaller)"""


def _fit_standardizers(
    agent: CascadeAgent, buffer: ReplayBuffer, generator: torch.Generator, ctx: Context
) -> None:
    """Fit the input standardisation on this rank's first data, average it over ranks (every rank then scales
    alike) and copy it into the targets."""
    agent.fit_standardizers(buffer.sample(min(buffer.size, STANDARDIZE_ROWS), generator).to(ctx.device))
    for module in agent.modules():
        if isinstance(module, Standardize):
            module.mean.copy_(average(module.mean, ctx))
            module.std.copy_(average(module.std, ctx))
    agent.sync_targets()


@dataclass(frozen=True)
class OfflineInputs:
    """What an offline run trained on, as checked when it read them: the export records these."""

    manifest: LogManifest
    """the logs' manifest, validated with the tables it hashes"""
    training_set: TrainingSetRecord | None
    """the point-in-time training set's provenance (None with ``algo.user_features=false`` and none given)"""


def _add_logs(
    buffer: ReplayBuffer, cfg: Config, logs: Path, training_set: Path | None, ctx: Context
) -> OfflineInputs:
    """Fill ``buffer`` with this rank's share of the logged transitions, each file read once: the logs validated
    against ``cfg``, the training set verified against them, and what was checked is what the buffer gets."""
    data = read_logs(logs, cfg)
    cfg.seeds.check_unseen(data.manifest.seeds, f"the logs {logs}")
    checked = verify_training_set(training_set, data) if training_set is not None else None
    buffer.add_logs(_share(data, ctx), checked.table if checked is not None else None)
    return OfflineInputs(data.manifest, checked.record if checked is not None else None)


def _share(data: LoggedData, ctx: Context) -> LoggedData:
    """This rank's share of the logs: whole sessions with ``session_id % world_size == rank``."""
    if ctx.world_size == 1:
        return data
    mine = data.transitions["session_id"].to_numpy() % ctx.world_size == ctx.rank
    return dataclasses.replace(data, transitions=data.transitions.filter(pa.array(np.asarray(mine))))


def train(
    cfg: Config,
    cem_weights: Tensor,
    sim: Simulator | None = None,
    logs: Path | None = None,
    progress: bool = True,
    *,
    ctx: Context | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    training_set: Path | None = None,
) -> TrainResult:
    """Train ``cfg.algo`` for ``cfg.train.updates`` updates; stages that do not learn use ``cem_weights``.

    Online (``train.regime=online``): warm up under CEM + exploration, then alternate collection and updates.
    Offline (``train.regime=offline``, ``logs`` given): replay the logged transitions only; ``training_set``: their
    point-in-time training set, whose user rows are the model's user features (needed with ``algo.user_features``);
    both are read once, checked, and recorded in ``TrainResult.offline``.
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
    rows = (w.n_users, w.n_items, w.n_categories)
    # one process: sparse-gradient tables stepped with the heads; torchrun: plain tables that DMP shards and fuses
    agent = CascadeAgent(
        cfg, *rows, cem_weights.cpu(), embedding_lr=None if ctx.distributed else t.embedding_lr
    )
    agent = agent.to(ctx.device)
    acting = ActingCopy(lambda: build_actors(cfg, *rows, cem_weights.cpu()), ctx.device)
    result = TrainResult(agent=agent)
    fused: KeyedOptimizer | None = None  # the sharded tables' in-backward optimizer
    if ctx.distributed:
        dmp, plan = shard(agent, ctx, t.embedding_lr)
        fused, result.sharding = dmp.fused_optimizer, describe(plan)
    # each rank its own global RNG stream, checkpointed with the run (our code draws from explicit generators; this
    # keeps any library draw reproducible across a resume)
    torch.manual_seed(seed + ctx.rank)
    generator = torch.Generator().manual_seed(seed + ctx.rank)
    knots = None
    if a.cqr:
        knots = torch.zeros(len(cfg.world.user_types), n_item_groups(cfg), cfg.features.cqr_knots)
    checkpoints = Checkpoints(run_dir / "checkpoints", ctx) if run_dir is not None else None
    best = (
        copy.deepcopy(acting.actors) if ctx.is_main and resume else None
    )  # receives the best point's actors
    restored = (
        checkpoints.restore(agent, fused, knots, generator, best)
        if checkpoints is not None and resume
        else None
    )
    next_session = 0
    if restored is not None:
        result.resumed_from, result.curve, next_session = (
            restored.updates,
            list(restored.curve),
            restored.next_session,
        )
        if best is not None and restored.best_updates is not None:
            result.best_actors, result.best_updates, result.best_score = (
                best,
                restored.best_updates,
                restored.best_score,
            )
    log.info(
        "train start algo=%s regime=%s updates=%d rank=%d world_size=%d resumed_from=%s",
        a.name,
        t.regime,
        t.updates,
        ctx.rank,
        ctx.world_size,
        result.resumed_from,
    )

    def sessions(n: int) -> Tensor:
        """This rank's next ``n`` session ids, disjoint from every other rank's."""
        nonlocal next_session
        ids = torch.arange(next_session, next_session + n) * ctx.world_size + ctx.rank
        next_session += n
        return ids

    def explore() -> ActorPolicy:
        actors = acting.refresh(agent.actors, agent.updates)
        return ActorPolicy(actors, cfg, w, explore_std=a.exploration_std, seed=seed)

    timed = _Timer(result.seconds)
    buffer = ReplayBuffer(cfg, t.buffer_size)
    if not online:
        result.offline = _add_logs(buffer, cfg, Path(logs), training_set, ctx)  # type: ignore[arg-type]
    else:  # warm-up under CEM + exploration; after a resume, re-warm-up under the restored actors
        cem = WeightPolicy(cem_weights.to(w.item_category.device), cfg.cascade)
        warm = explore() if restored is not None else GaussianExploration(cem, a.exploration_std, seed=seed)
        chunk = t.sessions_per_collect * 4
        with timed("collect"):
            for start in range(0, t.warmup_sessions, chunk):
                _collect(sim, buffer, warm, seed, sessions(min(chunk, t.warmup_sessions - start)))
    if (
        knots is not None and restored is None
    ):  # knots fitted on training transitions only (rank mean: Vincentization)
        watch, user_group, item_group = buffer.cqr_samples()
        knots.copy_(average(fit_cqr_knots(watch, user_group, item_group, *knots.shape), ctx))
    buffer.set_knots(knots)
    if (
        restored is None
    ):  # a resumed run keeps the standardisation it was trained with (it is in the checkpoint)
        _fit_standardizers(agent, buffer, generator, ctx)

    bar = tqdm(
        total=t.updates, initial=agent.updates, desc=f"train {a.name}", disable=not (progress and ctx.is_main)
    )
    while agent.updates < t.updates:
        with timed("sample"):
            batch = buffer.sample(a.batch_size, generator).to(ctx.device)
        with timed("update"):
            stats = agent.update(batch)
        bar.update(1)
        u = agent.updates
        if u % t.eval_every == 0 or u == t.updates:
            with timed("validate"):
                actors = acting.refresh(agent.actors, u)
                score = None
                if ctx.is_main:
                    score = validate(cfg, sim, actors, t.eval_sessions)
                    if result.best_score is None or score > result.best_score:
                        result.best_actors, result.best_updates, result.best_score = (
                            copy.deepcopy(actors),
                            u,
                            score,
                        )
                    bar.set_postfix(val=f"{score:.0f}s", q=f"{stats['q']:.2f}")
            diagnostics = None
            if cfg.diagnostics.during_training:
                with timed("diagnose"):
                    diagnostics = _diagnose(agent, sim, actors, knots, ctx, rows, cem_weights)
                if diagnostics is not None:
                    bar.set_postfix(
                        val=f"{score:.0f}s",
                        cos=f"{diagnostics.gradient.cosine.mean:+.2f}",
                        bias=f"{diagnostics.calibration.relative_bias:+.0%}",
                    )
            if score is not None:  # rank 0
                result.curve.append(
                    CurvePoint(updates=u, validation_watch_time=score, diagnostics=diagnostics, **stats)
                )
        if online and u % t.updates_per_collect == 0 and u < t.updates:
            with timed("collect"):
                _collect(sim, buffer, explore(), seed, sessions(t.sessions_per_collect))
        if checkpoints is not None and (u % t.checkpoint_every == 0 or u == t.updates):
            with timed("checkpoint"):
                state = TrainingProgress(
                    updates=u,
                    next_session=next_session,
                    curve=result.curve,
                    world_size=ctx.world_size,
                    best_updates=result.best_updates,
                    best_score=result.best_score,
                )
                checkpoints.save(agent, fused, knots, state, generator, result.best_actors)
    bar.close()
    result.knots = knots
    result.transitions = buffer.size
    return result
