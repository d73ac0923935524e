"""UNEX-RL and its baselines as one agent with one update step.

| algo             | stage observations the actors act on | critic                    | TD3 tricks | learning stages |
|------------------|--------------------------------------|---------------------------|------------|-----------------|
| unexrl-cic       | CIC replay (their own upstream picks)| global twin Q^g           | yes        | all             |
| unexrl-ctde      | logged (logged actions select)       | global twin Q^g           | yes        | all             |
| td3              | logged                               | global twin Q^g           | yes        | ranking only    |
| ddpg             | logged                               | global Q^g                | no         | ranking only    |
| independent-ddpg | logged                               | one Q_i per stage         | no         | all             |

Stages that do not learn keep CEM weights (``FixedAction``). The update reads as the spec's equations, with the
critic centred on the current policy (unexrl.rl.networks.CriticHead: Q(s, a) = V(s) + A(s, a - mu(s))):

    actions: a^{1:N} = CIC(tau^1_t; current actors)  (CTDE: the actors act on the logged stage views)
    critic:  y = r~ + gamma (1 - done) min_k Q'_k(tau^1_{t+1}, CIC(tau^1_{t+1}; target actors))
               = r~ + gamma (1 - done) min_k V'_k(tau^1_{t+1})      (A'(s', mu'(s')) = 0: the target needs no cascade)
             L(phi) = sum_k (Q_k(tau^1_t, a^{1:N}_logged; centred on a^{1:N}) - y)^2
    actors:  L_i = -Q_1(tau^1_t, sg(a^{<i}), mu^i(tau^i_t), sg(a^{>i}))   (+ the proximal term, ``algo.proximal``)

With algo.n_step = n, r~ is the discounted sum of n rewards, gamma^n, and t+n for t+1. Each role's encoder runs
once per update over tau_t with a graph; the critic's encoder embeds tau_{t+1} again without one, for the target heads.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torchrec import KeyedJaggedTensor
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

from unexrl.cascade import replay_actions, run_cascade
from unexrl.config import Config
from unexrl.policies.weights import stage_slices
from unexrl.rl.cic import cascade_with_actors
from unexrl.rl.networks import (
    ACTOR_FEATURES,
    CRITIC_FEATURES,
    CriticHead,
    FixedAction,
    SparseEncoder,
    StageActors,
    StageHead,
    embedding_tables,
)
from unexrl.rl.observation import candidate_summary, sparse_features, state_dim
from unexrl.rl.replay import Batch
from unexrl.rl.rowwise_adagrad import RowWiseAdagrad

FIRST = slice(0, 1)
"""the ensemble member Q_1: what the actors ascend and the diagnostics read"""

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def _compiled(region: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` of one of CascadeAgent's update regions (an unbound method), made once per process and
    called with the agent as its first argument. No agent holds a compiled function, so a copy of an agent trains
    its own networks, and agents of the same shapes share the graphs. Static shapes: `unexrl train` samples every
    batch at ``algo.batch_size``; another size compiles its own graph."""
    return torch.compile(region, dynamic=False)


def require_cpp_compiler() -> None:
    """Fail before training starts, not at the first update, when inductor has no C++ compiler to build with."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as err:
        raise RuntimeError(
            f"train.compile=true needs a C++ compiler at run time (torch.compile's inductor builds its kernels "
            f"with one; set CXX or install g++), or train.compile=false: {err}"
        ) from None


def learning_stages(cfg: Config) -> list[int]:
    """Indices of the stages whose actors learn: the last ``algo.agents`` (td3/ddpg: the ranking stage)."""
    n = len(cfg.cascade.stages)
    agents = (
        cfg.algo.agents if cfg.algo.agents is not None else (1 if cfg.algo.name in ("td3", "ddpg") else n)
    )
    if not 1 <= agents <= n:
        raise ValueError(f"algo.agents={agents}: must be between 1 and the {n} stages")
    return list(range(n - agents, n))


def _encoder(
    cfg: Config, prefix: str, features: Sequence[str], rows: tuple[int, int, int], sparse_grad: bool
) -> SparseEncoder:
    n_users, n_items, n_categories = rows
    counts = {"users": n_users, "items": n_items, "categories": n_categories}
    return SparseEncoder(embedding_tables(prefix, features, counts, cfg.algo.embedding_dim), sparse_grad)


def build_actors(
    cfg: Config,
    n_users: int,
    n_items: int,
    n_categories: int,
    cem_weights: Tensor,
    sparse_grad: bool = False,
) -> StageActors:
    """mu^1..mu^N: a StageHead per learning stage over one shared encoder, FixedAction (CEM weights) for the others.

    Also how a trained-actors artifact is rebuilt before its weights are loaded (unexrl/rl/actors.py).
    ``sparse_grad``: the encoder's large tables return sparse gradients (trained in one process, RowWiseAdagrad).
    """
    a, c = cfg.algo, cfg.cascade
    learning = learning_stages(cfg)
    encoder = _encoder(cfg, "actors", ACTOR_FEATURES, (n_users, n_items, n_categories), sparse_grad)
    weights = cem_weights.reshape(-1).float()
    heads: list[nn.Module] = []
    for i, (d, part) in enumerate(zip(c.action_dims, stage_slices(c))):
        if i in learning:
            heads.append(
                StageHead(
                    encoder.out_dim,
                    state_dim(cfg) + 3 * d,
                    d,
                    sum(c.action_dims[:i]),
                    a.hidden,
                    c.action_low,
                    c.action_high,
                    initial=weights[part],
                    radius=a.action_radius,
                )
            )
        else:
            heads.append(FixedAction(weights[part]))
    return StageActors(encoder, heads)


class Critic(nn.Module):
    """A sparse encoder and the dense critic head(s) that read it (K twins as one ensemble)."""

    def __init__(self, encoder: SparseEncoder, head: CriticHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head


class CascadeAgent(nn.Module):
    """Stage actors, critics and their target heads for one algorithm."""

    def __init__(
        self,
        cfg: Config,
        n_users: int,
        n_items: int,
        n_categories: int,
        cem_weights: Tensor,
        embedding_lr: float | None = None,
    ) -> None:
        """``embedding_lr``: train the embedding tables in this process, with RowWiseAdagrad at this rate
        stepped by the actor and critic optimizers; None leaves them to DMP, which shards them and trains them
        fused (unexrl/train/distributed.py)."""
        super().__init__()
        self.cfg = cfg
        a, c = cfg.algo, cfg.cascade
        self.cic = a.name == "unexrl-cic"
        self.twin = a.name in ("unexrl-cic", "unexrl-ctde", "td3")
        self.global_critic = a.name != "independent-ddpg"
        self.learning = learning_stages(cfg)
        self.keep = [s.keep for s in c.stages]
        rows = (n_users, n_items, n_categories)
        self.embedding_lr = embedding_lr
        sparse_grad = embedding_lr is not None
        self.actors = build_actors(cfg, *rows, cem_weights, sparse_grad)
        k = 1 + self.twin

        def critic(prefix: str, summary_stage: int, action_dim: int) -> Critic:
            encoder = _encoder(cfg, prefix, CRITIC_FEATURES, rows, sparse_grad)
            dense = state_dim(cfg) + 3 * c.action_dims[summary_stage]
            return Critic(encoder, CriticHead(encoder.out_dim, dense, action_dim, a.hidden, k))

        # the global critic reads tau^1 (the whole pool's summary) and every action; an independent stage critic
        # reads its own stage's view and action
        self.critic_stages = [0] if self.global_critic else self.learning
        self.critics = nn.ModuleList(
            [critic("critic", 0, sum(c.action_dims))]
            if self.global_critic
            else [critic(f"critic{i}", i, c.action_dims[i]) for i in self.learning]
        )
        self.target_critics = nn.ModuleList([copy.deepcopy(q.head) for q in self.critics]).requires_grad_(
            False
        )
        self.build_optimizers()
        self.updates = 0
        if cfg.train.compile:
            require_cpp_compiler()

    # --- optimisers ------------------------------------------------------------------------------------------
    def build_optimizers(self, wrap: Callable[[KeyedOptimizer], KeyedOptimizer] | None = None) -> None:
        """Adam for the actors' and the critics' dense heads, and (``embedding_lr``, one process) row-wise Adagrad
        for each role's tables in the same step; sharded tables train inside backward (fused) instead.

        ``wrap`` averages the dense gradients over ranks once the tables are sharded. Keyed by parameter name, so
        the optimizer state checkpoints by name.
        """
        a = self.cfg.algo

        def keyed(
            module: nn.Module, prefix: str, make: Callable[[list[Tensor]], Optimizer]
        ) -> KeyedOptimizer:
            params = {f"{prefix}.{name}": p for name, p in module.named_parameters()}
            return KeyedOptimizerWrapper(params, make)

        def role(heads: nn.Module, encoders: nn.Module, prefix: str, lr: float) -> KeyedOptimizer:
            dense = keyed(heads, f"{prefix}.heads", lambda ps: torch.optim.Adam(ps, lr=lr, fused=True))
            dense = wrap(dense) if wrap is not None else dense
            if self.embedding_lr is None:
                return dense
            table_lr = self.embedding_lr
            tables = keyed(encoders, f"{prefix}.encoders", lambda ps: RowWiseAdagrad(ps, lr=table_lr))
            return CombinedOptimizer([dense, tables])

        self.actor_optimizer = role(self.actors.heads, self.actors.encoder, "actors", a.actor_lr)
        self.critic_optimizer = role(
            nn.ModuleList([q.head for q in self.critics]),
            nn.ModuleList([q.encoder for q in self.critics]),
            "critics",
            a.critic_lr,
        )

    # --- input scaling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_standardizers(self, batch: Batch) -> None:
        """Fit every dense input's standardisation on one large batch of the first data, and copy it to the
        targets. The stage views are those the logged actions selected."""
        views = run_cascade(batch.tau.predictions, self.keep, replay_actions(batch.actions)).views
        summaries = [batch.first_summary, *(candidate_summary(v.predictions) for v in views[1:])]
        state = batch.tau.state
        for i in self.learning:
            self.actors.heads[i].dense.fit(torch.cat([state, summaries[i]], dim=1))
        for q, i in zip(self.critics, self.critic_stages):
            q.head.dense.fit(torch.cat([state, summaries[i]], dim=1))
            q.head.actions.fit(
                torch.cat(list(batch.actions) if self.global_critic else [batch.actions[i]], dim=1)
            )
        self.sync_targets()

    def sync_targets(self) -> None:
        """Target critics equal to the online ones (at the start, and after the standardisation is fitted)."""
        self.target_critics.load_state_dict(nn.ModuleList([q.head for q in self.critics]).state_dict())

    # --- the update step -------------------------------------------------------------------------------------
    def update(self, batch: Batch) -> dict[str, float]:
        """One critic step, and every ``policy_delay`` (TD3) steps a target update and (from ``actor_start`` on)
        one actor step. The targets follow the critic from the first update: held back until the actors start,
        the critic-only updates would fit n rewards plus the initial target's value, not the policy's return."""
        a = self.cfg.algo
        delayed_step = (self.updates + 1) % (a.policy_delay if self.twin else 1) == 0
        actor_step = delayed_step and self.updates >= a.actor_start
        # tau_{t+n} is embedded without a graph: only tau_t's rows get (sparse) table gradients
        kjt = sparse_features(batch.tau)
        critic_embeddings = [q.encoder(kjt) for q in self.critics]
        with torch.no_grad():
            next_kjt = sparse_features(batch.next_tau)
            next_embeddings = [q.encoder(next_kjt) for q in self.critics]
        with torch.set_grad_enabled(actor_step):
            actions, summaries = self._region(type(self).policy_actions, batch, self.actors.embed(kjt))
        centre = [x.detach() for x in actions]

        critic_loss, q, y = self._region(
            type(self).critic_loss, batch, critic_embeddings, next_embeddings, centre, summaries
        )
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()
        self.updates += 1

        out = {"critic_loss": float(critic_loss.detach()), "q": float(q), "target": float(y)}
        if actor_step:
            actor_loss = self._region(
                type(self).actor_loss, batch, actions, summaries, [e.detach() for e in critic_embeddings]
            )
            self.actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_optimizer.step()
            out["actor_loss"] = float(actor_loss.detach())
        if delayed_step:
            self._soft_update()
        return out

    def _region(
        self, region: Callable[Concatenate[CascadeAgent, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """One of the update's dense regions on this agent: compiled by inductor (``train.compile``) or as written.
        Each is its own graph, so the critic step and the actor step stay two steps in TD3's order."""
        run = _compiled(region) if self.cfg.train.compile else region
        return run(self, *args, **kwargs)

    def policy_actions(self, batch: Batch, actor_embedding: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The current actors' actions on tau_t and every stage view's summary: through CIC, each stage acting on
        what its upstream actors selected (CTDE and the baselines: on the logged views). With SG each actor sees
        sg(a^{<i})."""
        _, actions, summaries = cascade_with_actors(
            batch.tau,
            actor_embedding,
            self.keep,
            self.actors,
            stop_gradient=self.cfg.algo.sg,
            select_with=None if self.cic else batch.actions,
            first_summary=batch.first_summary,
        )
        return actions, summaries

    def critic_loss(
        self,
        batch: Batch,
        critic_embeddings: list[Tensor],
        next_embeddings: list[Tensor],
        centre: list[Tensor],
        summaries: list[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """L(phi) = sum_k mean_b (Q_k(tau_t, a_logged; centred on the current actions ``centre``) - y)^2 over every
        critic; also the first critic's mean Q_1 and mean y, which the update reports."""
        y = self._critic_target(batch, next_embeddings)
        q = [
            critic.head(critic.head.state_features(e, x), logged, c)
            for critic, e, (x, logged, c) in zip(
                self.critics, critic_embeddings, self._critic_inputs(batch, batch.actions, centre, summaries)
            )
        ]
        loss = torch.stack([((q_c - y_c) ** 2).mean(1).sum() for q_c, y_c in zip(q, y)]).sum()
        return loss, q[0][0].detach().mean(), y[0].mean()

    def _critic_target(self, batch: Batch, critic_embeddings: list[Tensor]) -> list[Tensor]:
        """y = r~ + gamma^n (1 - done) min_k V'_k(tau^1_{t+n}), per critic (V' = Q' at the target policy's action)."""
        gamma = self.cfg.algo.gamma**self.cfg.algo.n_step
        with torch.no_grad():
            out = []
            for head, e, x in zip(self.target_critics, critic_embeddings, self._next_dense(batch)):
                value = head.value(head.state_features(e, x)).min(0).values  # min over the twins
                out.append(batch.reward + gamma * (1.0 - batch.done) * value)
            return out

    def actor_loss(
        self, batch: Batch, actions: list[Tensor], summaries: list[Tensor], critic_embeddings: list[Tensor]
    ) -> Tensor:
        """sum_i L_i over the actors' own actions ``actions`` (``policy_actions``, with their graph).

            L_i = -Q_1(tau, sg(a^{<i}), mu^i(tau^i), sg(a^{>i})) / mean|Q_1|  +  w ||mu^i(tau^i) - a^i_logged||^2

        One evaluation of Q_1 with every action live has the gradient of that sum: with SG, CIC already gave each
        actor sg(a^{<i}) as input, so a^j carries no path back into mu^{i<j} and each actor gets only dQ/da^i.
        Without SG the actions are chained (a^{i+1} depends on a^i), so mu^i also gets the gradient through every
        downstream action it changes. Stages that do not learn have no parameters to receive anything.
        Q_1 is centred on the actions themselves (detached), so dQ_1/da = g(s)/sigma; it is divided by its batch mean
        magnitude (not differentiated), so the proximal weight w (``algo.proximal``, TD3+BC's 1/alpha) means the
        same at any reward scale; w = 0 is the plain DDPG-style step.
        """
        centre = [x.detach() for x in actions]
        losses = []
        for critic, e, (x, acts, c) in zip(
            self.critics, critic_embeddings, self._critic_inputs(batch, actions, centre, summaries)
        ):
            with torch.no_grad():
                features = critic.head.state_features(e, x, FIRST)
            q = critic.head(features, acts, c)[0]
            losses.append(-q.mean() / q.detach().abs().mean().clamp_min(1e-6))
        loss = torch.stack(losses).sum()
        if self.cfg.algo.proximal > 0:
            loss = loss + self.cfg.algo.proximal * sum(
                ((actions[i] - batch.actions[i]) ** 2).sum(1).mean() for i in self.learning
            )
        return loss

    # --- what the diagnostics read (unexrl/rl/diagnostics.py) -------------------------------------------------
    @torch.no_grad()
    def q_values(self, batch: Batch) -> Tensor:
        """[B] Q_1 of the logged actions (independent DDPG: the first learning stage's critic), centred on the
        actions and views the critic loss centres it on (``policy_actions``: CTDE's on the logged views)."""
        kjt = sparse_features(batch.tau)
        actions, summaries = self.policy_actions(batch, self.actors.embed(kjt))
        critic = self.critics[0]
        x, logged, centre = self._critic_inputs(batch, batch.actions, actions, summaries)[0]
        return critic.head(critic.head.state_features(critic.encoder(kjt), x, FIRST), logged, centre)[0]

    def action_gradient(self, batch: Batch) -> Tensor:
        """[B, sum d_i] dQ_1/da at the actors' own actions (each stage acting on the candidates its upstream actors
        selected, as at serving); NaN on the weights no critic reads (independent DDPG's fixed stages)."""
        kjt = sparse_features(batch.tau)
        actions, summaries = self.greedy_actions(batch, kjt)
        actions = [x.detach().requires_grad_(True) for x in actions]
        centre = [x.detach() for x in actions]
        total = torch.zeros(())
        for critic, (x, acts, c) in zip(self.critics, self._critic_inputs(batch, actions, centre, summaries)):
            with torch.no_grad():
                features = critic.head.state_features(critic.encoder(kjt), x, FIRST)
            total = total + critic.head(features, acts, c)[0].sum()
        grads = torch.autograd.grad(total, actions, allow_unused=True)
        return torch.cat(
            [g if g is not None else torch.full_like(x, float("nan")) for g, x in zip(grads, actions)], 1
        )

    @torch.no_grad()
    def greedy_actions(self, batch: Batch, kjt: KeyedJaggedTensor) -> tuple[list[Tensor], list[Tensor]]:
        """The actors' actions as they act at serving (CIC, whatever the algorithm trains on) and the views' summaries."""
        _, actions, summaries = cascade_with_actors(
            batch.tau,
            self.actors.embed(kjt),
            self.keep,
            self.actors,
            stop_gradient=True,
            first_summary=batch.first_summary,
        )
        return actions, summaries

    # --- what the critics read -------------------------------------------------------------------------------
    def _critic_inputs(
        self, batch: Batch, actions: Sequence[Tensor], centre: Sequence[Tensor], summaries: Sequence[Tensor]
    ) -> list[tuple[Tensor, list[Tensor], list[Tensor]]]:
        """(dense input, actions, centre) of each critic on tau_t: the global one reads [state, pool summary] and
        a^{1:N}; stage critic i reads [state, summary of the view its actor acted on] and a^i."""
        state = batch.tau.state
        if self.global_critic:
            return [(torch.cat([state, batch.first_summary], dim=1), list(actions), list(centre))]
        return [(torch.cat([state, summaries[i]], dim=1), [actions[i]], [centre[i]]) for i in self.learning]

    def _next_dense(self, batch: Batch) -> list[Tensor]:
        """Each critic's dense input on tau_{t+n}; a stage critic reads the view the logged actions selected."""
        state = batch.next_tau.state
        if self.global_critic:
            return [torch.cat([state, batch.next_first_summary], dim=1)]
        views = run_cascade(batch.next_tau.predictions, self.keep, replay_actions(batch.next_actions)).views
        return [
            torch.cat(
                [state, batch.next_first_summary if i == 0 else candidate_summary(views[i].predictions)],
                dim=1,
            )
            for i in self.learning
        ]

    def _soft_update(self) -> None:
        """target <- lerp(target, online, polyak) over the critics' dense heads (the targets own no tables)."""
        targets = [p for target in self.target_critics for p in target.parameters()]
        online = [p for q in self.critics for p in q.head.parameters()]
        with torch.no_grad():
            torch._foreach_lerp_(targets, online, self.cfg.algo.polyak)
