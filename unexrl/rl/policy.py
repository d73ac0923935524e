"""Stage actors as a simulator policy: what collection, validation, evaluation and serving roll out."""

from __future__ import annotations

import torch
from torch import Tensor

from unexrl.cascade import StageView
from unexrl.config import Config
from unexrl.rl.networks import StageActors
from unexrl.rl.observation import candidate_summary, sparse_features, tau1_from_observation
from unexrl.sim.env import Observation
from unexrl.sim.hashing import hash_key, normal
from unexrl.sim.world import World

_STREAM_ACTOR_EXPLORE = 59


class ActorPolicy:
    """Each stage's actor acts on its view; optional keyed Gaussian exploration noise, clipped to the box."""

    def __init__(
        self, actors: StageActors, cfg: Config, world: World, explore_std: float = 0.0, seed: int = 0
    ) -> None:
        self.actors, self.cfg, self.world = actors, cfg, world
        self.explore_std, self.seed = explore_std, seed
        self._cached: tuple[Observation, Tensor, Tensor] | None = None

    def _inputs(self, obs: Observation) -> tuple[Tensor, Tensor]:
        # act() is called once per stage with the same observation: embed tau^1 once
        if self._cached is None or self._cached[0] is not obs:
            tau = tau1_from_observation(obs, self.world, self.cfg)
            self._cached = (obs, tau.state, self.actors.embed(sparse_features(tau)))
        return self._cached[1], self._cached[2]

    @torch.no_grad()
    def act(self, obs: Observation, view: StageView) -> Tensor:
        state, embedding = self._inputs(obs)
        dense = torch.cat([state, candidate_summary(view.predictions)], dim=1)
        a = self.actors.act(view.stage, embedding, dense, list(view.upstream_actions))
        if self.explore_std > 0:
            head = torch.arange(a.shape[1], device=a.device)
            key = hash_key(
                self.seed, _STREAM_ACTOR_EXPLORE, view.stage, obs.session[:, None], obs.step[:, None], head
            )
            c = self.cfg.cascade
            a = (a + self.explore_std * normal(key)).clamp(c.action_low, c.action_high)
        return a
