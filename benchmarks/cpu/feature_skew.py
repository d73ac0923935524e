"""What the within-session feature skew costs trained actors (docs/features.md).

A request's training row includes its own session's earlier pages in `user_behaviour`; the online store's row,
written only by materialisation, does not, and serving read it alone until sessions kept their own totals
(unexrl/serve/behaviour.py). On each validation seed this first simulates `--burn-in` sessions with the actors
(the users' histories, as the logs and so the store would hold them), then rolls the next `--sessions` out from
copies of those histories: with the features as trained (the session's own pages in: what serving reads now) and
from the store's row alone (the user's earlier sessions only, the store materialised just before each batch).
`--baseline` adds actors trained without the features on the same sessions. Differences are paired by session.

    python benchmarks/cpu/feature_skew.py --actors RUN/export --baseline NOFEATURES_RUN/export \
        --burn-in 10000 --sessions 1000
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from unexrl.config import load_config
from unexrl.evaluate.rollout import rollout
from unexrl.evaluate.stats import bootstrap_mean, bootstrap_uplift
from unexrl.rl.actors import load_actor_policy
from unexrl.sim.behaviour import UserBehaviour
from unexrl.sim.env import Simulator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="configs/default.yaml")
parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
parser.add_argument("--actors", type=Path, required=True, help="actors trained with the user features")
parser.add_argument("--baseline", type=Path, help="actors trained with algo.user_features=false")
parser.add_argument("--burn-in", type=int, default=10_000, help="sessions of history per seed (0: none)")
parser.add_argument("--sessions", type=int, default=1000, help="sessions measured per validation seed")
args = parser.parse_args()

torch.set_num_threads(2)
cfg = load_config(args.config, args.set)
sim = Simulator(cfg)
policy = load_actor_policy(args.actors, cfg, sim.world)
TRAINED, STORE_ROW, BASELINE = (
    "features as trained and served (the session's own pages in)",
    "the store's row alone (earlier sessions only)",
    "actors trained without the features",
)
arms = {TRAINED: (policy, True), STORE_ROW: (policy, False)}
if args.baseline is not None:
    no_features = load_config(args.config, [*args.set, "algo.user_features=false"])
    arms[BASELINE] = (load_actor_policy(args.baseline, no_features, sim.world), True)

batch = cfg.evaluation.batch_size
watch: dict[str, list[np.ndarray]] = {name: [] for name in arms}
for seed in cfg.seeds.validation:
    history = UserBehaviour(cfg, sim.world)
    if args.burn_in:
        rollout(sim, policy, seed, args.burn_in, batch, behaviour=history, progress=True)
    measured = torch.arange(args.burn_in, args.burn_in + args.sessions)
    for name, (actors, within) in arms.items():
        behaviour = history.copy(within_session=within)
        watch[name].append(rollout(sim, actors, seed, measured, batch, behaviour=behaviour).watch_time)

print(
    f"validation seeds {list(cfg.seeds.validation)}: {args.burn_in} sessions of history, then {args.sessions} "
    f"measured; actors {args.actors}"
)
for name, values in watch.items():
    paired = "" if name == TRAINED else f"   {bootstrap_uplift(values, watch[TRAINED]).fmt()} % vs as trained"
    print(f"  {name:52s} {bootstrap_mean(values).fmt()} s{paired}")
if BASELINE in watch:
    print(
        f"  the store's row alone vs trained without the features: "
        f"{bootstrap_uplift(watch[STORE_ROW], watch[BASELINE]).fmt()} %"
    )
