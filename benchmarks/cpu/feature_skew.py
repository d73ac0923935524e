"""What serving's within-session feature skew costs trained actors (docs/features.md).

A request's training row includes its own session's earlier pages in `user_behaviour`; the online store, written
only by materialisation, does not. This rolls the same actors out on the config's validation seeds twice: with the
features as trained (the session's pages in) and as served (only the user's earlier sessions), and prints each
mean watch time per session and the paired difference (same seeds, same sessions).

    python benchmarks/cpu/feature_skew.py --config configs/default.yaml --actors RUN/export [--sessions 300]
"""

import argparse
from pathlib import Path

import torch

from unexrl.config import load_config
from unexrl.evaluate.rollout import rollout
from unexrl.evaluate.stats import bootstrap_mean, bootstrap_uplift
from unexrl.rl.actors import load_actor_policy
from unexrl.sim.env import Simulator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="configs/default.yaml")
parser.add_argument("--actors", type=Path, required=True, help="an actors artifact (`unexrl train`'s export)")
parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
parser.add_argument("--sessions", type=int, default=300, help="sessions per validation seed")
args = parser.parse_args()

torch.set_num_threads(2)
cfg = load_config(args.config, args.set)
sim = Simulator(cfg)
policy = load_actor_policy(args.actors, cfg, sim.world)
seeds = cfg.seeds.validation
watch = {
    within: [
        rollout(
            sim, policy, s, args.sessions, cfg.evaluation.batch_size, features_within_session=within
        ).watch_time
        for s in seeds
    ]
    for within in (True, False)
}
print(f"validation seeds {list(seeds)} x {args.sessions} sessions, actors {args.actors}")
print(f"  features as trained (the session's own pages in): {bootstrap_mean(watch[True]).fmt()} s")
print(f"  features as served (earlier sessions only):       {bootstrap_mean(watch[False]).fmt()} s")
print(
    f"  served vs trained, paired by session:             {bootstrap_uplift(watch[False], watch[True]).fmt()} %"
)
