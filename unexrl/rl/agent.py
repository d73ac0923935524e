"""UNEX-RL and its baselines as one agent with one update step.

| algo             | downstream observations            | critic                    | TD3 tricks | learning stages |
|------------------|------------------------------------|---------------------------|------------|-----------------|
| unexrl-cic       | CIC replay (the actors select)     | global twin Q^g           | yes        | all             |
| unexrl-ctde      | logged (logged actions select)     | global twin Q^g           | yes        | all             |
| td3              | logged                             | global twin Q^g           | yes        | ranking only    |
| ddpg             | logged                             | global Q^g                | no         | ranking only    |
| independent-ddpg | logged                             | one Q_i per stage         | no         | all             |

Stages that do not learn keep CEM weights (``FixedAction``). The update reads as the spec's equations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor
from torchrec.optim.keyed import KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from unexrl.cascade import replay_actions, run_cascade
from unexrl.config import Config
from unexrl.policies.weights import stage_slices
from unexrl.rl.cic import cascade_with_actors
from unexrl.rl.networks import Critic, FixedAction, SparseEncoder, StageActor, embedding_tables
from unexrl.rl.observation import candidate_summary, sparse_features
from unexrl.rl.replay import Batch


def learning_stages(cfg: Config) -> list[int]:
    """Indices of the stages whose actors learn: the last ``algo.agents`` (td3/ddpg: the ranking stage)."""
    n = len(cfg.cascade.stages)
    agents = cfg.algo.agents if cfg.algo.agents is not None else (1 if cfg.algo.name in ("td3", "ddpg") else n)
    if not 1 <= agents <= n:
        raise ValueError(f"algo.agents={agents}: must be between 1 and the {n} stages")
    return list(range(n - agents, n))


def _encoder(cfg: Config, prefix: str, rows: tuple[int, int, int]) -> SparseEncoder:
    return SparseEncoder(embedding_tables(prefix, *rows, cfg.algo.embedding_dim))


def build_actors(cfg: Config, n_users: int, n_items: int, n_categories: int, cem_weights: Tensor) -> nn.ModuleList:
    """mu^1..mu^N: a StageActor per learning stage, FixedAction (CEM weights) for the others.

    Also how a trained-actors artifact is rebuilt before its weights are loaded (unexrl/policies/actors.py).
    """
    a, c = cfg.algo, cfg.cascade
    learning = learning_stages(cfg)
    actors: list[nn.Module] = []
    for i, (d, part) in enumerate(zip(c.action_dims, stage_slices(c))):
        if i in learning:
            actors.append(StageActor(_encoder(cfg, f"actor{i}", (n_users, n_items, n_categories)),
                                     4 + len(cfg.world.user_types), d, sum(c.action_dims[:i]), a.hidden,
                                     c.action_low, c.action_high, initial=cem_weights.reshape(-1)[part].float(),
                                     radius=a.action_radius))
        else:
            actors.append(FixedAction(cem_weights.reshape(-1)[part]))
    return nn.ModuleList(actors)


class CascadeAgent(nn.Module):
    """Stage actors, critics and their targets for one algorithm."""

    def __init__(self, cfg: Config, n_users: int, n_items: int, n_categories: int, cem_weights: Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        a, c = cfg.algo, cfg.cascade
        self.cic = a.name == "unexrl-cic"
        self.twin = a.name in ("unexrl-cic", "unexrl-ctde", "td3")
        self.global_critic = a.name != "independent-ddpg"
        self.learning = learning_stages(cfg)
        self.keep = [s.keep for s in c.stages]
        state_dim = 4 + len(cfg.world.user_types)
        rows = (n_users, n_items, n_categories)

        def encoder(prefix: str) -> SparseEncoder:
            return _encoder(cfg, prefix, rows)

        self.actors = build_actors(cfg, *rows, cem_weights)
        if self.global_critic:
            critics = [Critic(encoder(f"critic{k}"), state_dim, c.action_dims, a.hidden) for k in range(1 + self.twin)]
        else:
            critics = [Critic(encoder(f"critic{i}"), state_dim, [c.action_dims[i]], a.hidden) for i in self.learning]
        self.critics = nn.ModuleList(critics)
        self.target_actors = copy.deepcopy(self.actors).requires_grad_(False)
        self.target_critics = copy.deepcopy(self.critics).requires_grad_(False)
        self.build_optimizers()
        self.updates = 0

    def build_optimizers(self, wrap: Callable[[KeyedOptimizer], KeyedOptimizer] | None = None) -> None:
        """Adam for the actors and for the critics, over every parameter not trained inside backward.

        In one process that is all of them. Once the tables are sharded (unexrl/train/distributed.py) they carry a
        fused optimizer and drop out here, and ``wrap`` averages the dense gradients over ranks. Keyed by parameter
        name, so the optimizer state checkpoints by name.
        """
        a = self.cfg.algo

        def adam(module: nn.Module, lr: float) -> KeyedOptimizer:
            params = dict(in_backward_optimizer_filter(module.named_parameters()))
            optimizer = KeyedOptimizerWrapper(params, lambda ps: torch.optim.Adam(ps, lr=lr))
            return wrap(optimizer) if wrap is not None else optimizer

        self.actor_optimizer = adam(self.actors, a.actor_lr)
        self.critic_optimizer = adam(self.critics, a.critic_lr)

    # --- the update step -------------------------------------------------------------------------------------
    def update(self, batch: Batch) -> dict[str, float]:
        """One critic step, and every ``policy_delay`` (TD3) steps one actor step and a target update."""
        a = self.cfg.algo
        kjt, next_kjt = sparse_features(batch.tau), sparse_features(batch.next_tau)
        y = self._critic_target(batch, next_kjt)

        # Q_k is evaluated on tau^{1:N}_t replayed by CIC with the logged actions (equal to the logged views).
        replayed = run_cascade(batch.tau.predictions, self.keep, replay_actions(batch.actions))
        summaries = [candidate_summary(v.predictions) for v in replayed.views]
        q = self._q(self.critics, kjt, batch.tau.state, summaries, list(batch.actions))
        critic_loss = sum(F.mse_loss(q_k, y_k) for q_k, y_k in zip(q, y))
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()
        self.updates += 1

        out = {"critic_loss": critic_loss.item(), "q": q[0].mean().item(), "target": y[0].mean().item()}
        if self.updates % (a.policy_delay if self.twin else 1) == 0:
            out["actor_loss"] = self._actor_step(batch, kjt)
            self._soft_update(self.actors, self.target_actors)
            self._soft_update(self.critics, self.target_critics)
        return out

    def _critic_target(self, batch: Batch, next_kjt: KeyedJaggedTensor) -> list[Tensor]:
        """y = r~ + gamma (1 - done) min_k Q'_k(CIC(tau^1_{t+1}; target actors + smoothing noise)), per critic.

        CTDE and the baselines read tau^{2:N}_{t+1} from the log instead (selection by the logged actions).
        """
        a = self.cfg.algo
        with torch.no_grad():
            smooth = self._smoothing if self.twin else None
            _, next_actions, summaries = cascade_with_actors(
                batch.next_tau, next_kjt, self.keep, self.target_actors, stop_gradient=True,
                select_with=None if self.cic else batch.next_actions, perturb=smooth,
            )
            q_next = self._q(self.target_critics, next_kjt, batch.next_tau.state, summaries, next_actions)
            if self.global_critic:
                q_next = [torch.min(torch.stack(q_next), dim=0).values] * len(self.critics)
            return [batch.reward + a.gamma * (1.0 - batch.done) * q for q in q_next]

    def _actor_step(self, batch: Batch, kjt: KeyedJaggedTensor) -> float:
        with self._critic_embeddings_detached():
            loss = sum(self.actor_losses(batch, kjt))
        self.actor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_optimizer.step()
        return loss.item()

    def actor_losses(self, batch: Batch, kjt: KeyedJaggedTensor) -> list[Tensor]:
        """One loss per learning actor; actors act through CIC (CTDE: on the logged views) and ascend Q.

            L_i = -Q_1(tau, sg(a^{<i}), mu^i(tau^i), sg(a^{>i}))

        With SG, mu^i sees sg(a^{<i}) when it acts, so L_i reaches only actor i. Without SG the actions are
        chained (a^{i+1} depends on a^i), so L_i also reaches the upstream actors, and the summed loss is the full
        gradient of Q through every appearance of a^i in tau^{>i} and a^{>i}.
        """
        _, actions, summaries = cascade_with_actors(
            batch.tau, kjt, self.keep, self.actors, stop_gradient=self.cfg.algo.sg,
            select_with=None if self.cic else batch.actions,
        )
        state = batch.tau.state
        if not self.global_critic:  # independent DDPG: each actor ascends its own stage critic
            return [-critic(kjt, state, [summaries[i]], [actions[i]]).mean() for critic, i in zip(self.critics, self.learning)]
        return [-self.critics[0](kjt, state, summaries, self._only(actions, i)).mean() for i in self.learning]

    # --- helpers ---------------------------------------------------------------------------------------------
    def _q(self, critics: nn.ModuleList, kjt: KeyedJaggedTensor, state: Tensor, summaries: Sequence[Tensor], actions: Sequence[Tensor]) -> list[Tensor]:
        if self.global_critic:
            return [critic(kjt, state, summaries, actions) for critic in critics]
        return [critic(kjt, state, [summaries[i]], [actions[i]]) for critic, i in zip(critics, self.learning)]

    @staticmethod
    def _only(actions: Sequence[Tensor], i: int) -> list[Tensor]:
        """sg on every action but a^i."""
        return [x if j == i else x.detach() for j, x in enumerate(actions)]

    def _smoothing(self, action: Tensor) -> Tensor:
        a, c = self.cfg.algo, self.cfg.cascade
        noise = (torch.randn_like(action) * a.policy_noise).clamp(-a.noise_clip, a.noise_clip)
        return (action + noise).clamp(c.action_low, c.action_high)

    @contextmanager
    def _critic_embeddings_detached(self) -> Iterator[None]:
        """Cut the critics' embeddings out of the actors' loss: that loss must move only the actors.

        The dense critic gradients it leaves are cleared before the next critic step, but a sharded table applies
        its fused optimizer inside backward, where a gradient that reached it would already be a step.
        """
        hooks = [c.encoder.register_forward_hook(lambda _module, _inputs, out: out.detach()) for c in self.critics]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _soft_update(self, online: nn.Module, target: nn.Module) -> None:
        """target <- lerp(target, online, polyak), paired by name. A sharded table's parameters are its local shards;
        its target is placed like it (unexrl/train/distributed.py), so the shards pair up one to one."""
        targets = dict(target.named_parameters())
        with torch.no_grad():
            for name, p in online.named_parameters():
                targets[name].lerp_(p, self.cfg.algo.polyak)
