"""Stage actors as a simulator policy: what collection, validation and evaluation roll out."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor

from unexrl.cascade import StageView
from unexrl.config import Config
from unexrl.rl.observation import Tau1, candidate_summary, sparse_features, tau1_from_observation
from unexrl.sim.env import Observation
from unexrl.sim.hashing import hash_key, normal
from unexrl.sim.world import World

_STREAM_ACTOR_EXPLORE = 59


class ActorPolicy:
    """Each stage's actor acts on its view; optional keyed Gaussian exploration noise, clipped to the box."""

    def __init__(self, actors: nn.ModuleList, cfg: Config, world: World, explore_std: float = 0.0, seed: int = 0) -> None:
        self.actors, self.cfg, self.world = actors, cfg, world
        self.explore_std, self.seed = explore_std, seed
        self._cached: tuple[Observation, Tau1, KeyedJaggedTensor] | None = None

    def _tau(self, obs: Observation) -> tuple[Tau1, KeyedJaggedTensor]:
        # act() is called once per stage with the same observation: build tau^1 and its KJT once
        if self._cached is None or self._cached[0] is not obs:
            tau = tau1_from_observation(obs, self.world, self.cfg.session.max_requests, len(self.cfg.world.user_types))
            self._cached = (obs, tau, sparse_features(tau))
        return self._cached[1], self._cached[2]

    @torch.no_grad()
    def act(self, obs: Observation, view: StageView) -> Tensor:
        tau, kjt = self._tau(obs)
        a = self.actors[view.stage](kjt, tau.state, candidate_summary(view.predictions), list(view.upstream_actions))
        if self.explore_std > 0:
            head = torch.arange(a.shape[1], device=a.device)
            key = hash_key(self.seed, _STREAM_ACTOR_EXPLORE, view.stage, obs.session[:, None], obs.step[:, None], head)
            c = self.cfg.cascade
            a = (a + self.explore_std * normal(key)).clamp(c.action_low, c.action_high)
        return a
