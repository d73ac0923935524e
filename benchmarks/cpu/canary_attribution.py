"""Whether the canary analysis can see a worse model when any replica serves any page (docs/deploy.md).

Without a traffic router each page of a session goes to a random replica, stable or canary, and so does each
feedback. In the simulator, pages of `--sessions` sessions are routed to the canary with probability
`--canary-share` (independently per page) and the rest to the stable policy (greedy weights). Each canary's
reward ratio against the stable is then measured three ways:
- true: whole sessions of the canary alone against whole sessions of the stable alone (the same sessions);
- by pages: as serving records it, each ended session shared among the versions that chose its pages
  (`unexrl.serve.sessions.shares`);
- by receiver: as serving recorded it before pages named their model, the whole session under the replica that
  received its last feedback (a random one, whichever model chose the pages).

    PYTHONPATH=. python benchmarks/cpu/canary_attribution.py --config configs/default.yaml
"""

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from unexrl.cascade import StageView
from unexrl.config import load_config
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import RandomPolicy, WeightPolicy, greedy_weights
from unexrl.serve.sessions import shares
from unexrl.sim.env import Observation, Policy, Simulator, Step

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="configs/default.yaml")
parser.add_argument("--sessions", type=int, default=40_000)
parser.add_argument("--canary-share", type=float, default=0.1)
parser.add_argument("--min-reward-ratio", type=float, default=0.97, help="the AnalysisTemplate's threshold")
parser.add_argument("--seed", type=int, default=1234, help="the simulator's seed (sessions and users)")
args = parser.parse_args()

cfg = load_config(args.config)
sim = Simulator(cfg)
c = cfg.cascade
ROUTE = np.random.default_rng(7).random((args.sessions, cfg.session.max_requests + 1)) < args.canary_share
"""[session, step]: the page goes to the canary (drawn apart from the simulator's keyed noise)"""


@dataclass
class Routed:
    """Each page chosen by the canary or the stable policy, as ROUTE sends it."""

    stable: Policy
    canary: Policy

    def to_canary(self, obs: Observation) -> torch.Tensor:
        return torch.from_numpy(ROUTE[obs.session.numpy(), obs.step.numpy()])

    def act(self, obs: Observation, view: StageView) -> torch.Tensor:
        pick = self.to_canary(obs)[:, None]
        return torch.where(pick, self.canary.act(obs, view), self.stable.act(obs, view))


def mean_watch(policy: Policy) -> float:
    return float(rollout(sim, policy, args.seed, args.sessions, 1024).watch_time.mean())


def routed_ratios(routed: Routed) -> tuple[float, float]:
    """(by pages, by receiver): the canary's mean session watch time over the stable's, attributed each way."""
    pages = np.zeros((args.sessions, 2))  # pages each side chose, per session
    watch = np.zeros(args.sessions)

    def count(step: Step) -> None:
        live = step.active
        session = step.obs.session[live].numpy()
        np.add.at(pages, (session, routed.to_canary(step.obs)[live].numpy().astype(int)), 1)
        np.add.at(watch, session, step.reward[live].numpy())

    rollout(sim, routed, args.seed, args.sessions, 1024, on_step=count)
    share = np.array([shares({"stable": int(s), "canary": int(k)}).get("canary", 0.0) for s, k in pages])
    receiver = np.random.default_rng(8).random(args.sessions) < args.canary_share
    by_pages = (share @ watch / share.sum()) / ((1 - share) @ watch / (1 - share).sum())
    by_receiver = watch[receiver].mean() / watch[~receiver].mean()
    return float(by_pages), float(by_receiver)


stable = WeightPolicy(greedy_weights(c), c)
noise = torch.randn(1, sum(c.action_dims), generator=torch.Generator().manual_seed(0))
canaries: dict[str, Policy] = {
    "the stable itself": stable,
    "weights / 2 (same ranking)": WeightPolicy(greedy_weights(c) / 2, c),
    "weights + N(0, 0.15)": WeightPolicy(
        (greedy_weights(c) + 0.15 * noise).clamp(c.action_low, c.action_high), c
    ),
    "weights + N(0, 0.3)": WeightPolicy(
        (greedy_weights(c) + 0.3 * noise).clamp(c.action_low, c.action_high), c
    ),
    "random weights": RandomPolicy(c, seed=5),
}
base = mean_watch(stable)
print(
    f"{args.sessions} sessions of seed {args.seed}, {args.canary_share:.0%} of pages to the canary, "
    f"gate at {args.min_reward_ratio}; stable: {base:.1f} s per session\n"
)
print("| canary | true ratio | by pages (now) | gate | by receiver (before) | gate |")
print("|---|---|---|---|---|---|")
for name, canary in canaries.items():
    true = mean_watch(canary) / base
    by_pages, by_receiver = routed_ratios(Routed(stable, canary))
    gate = ("pass" if r >= args.min_reward_ratio else "fail" for r in (by_pages, by_receiver))
    print(f"| {name} | {true:.3f} | {by_pages:.3f} | {next(gate)} | {by_receiver:.3f} | {next(gate)} |")
