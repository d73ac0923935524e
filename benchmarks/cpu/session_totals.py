"""What a session's behaviour totals cost serving per call (unexrl/serve/behaviour.py; docs/benchmarks.md).

Times, in this process on one thread (as the service runs), each step serving takes with a session's totals
against the row alone: turning the store's row into totals (a session's first request), building the user input
from the totals (its later requests) or from the row (the path before), and adding an answered page (a
feedback). Medians of `--repeats` rounds of `--calls` calls each, on a user with a full recent window.

    PYTHONPATH=. python benchmarks/cpu/session_totals.py --config configs/default.yaml
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from unexrl.config import load_config
from unexrl.serve.behaviour import SessionBehaviour
from unexrl.sim.env import Simulator
from unexrl.user_features import served_inputs

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="configs/default.yaml")
parser.add_argument("--repeats", type=int, default=7)
parser.add_argument("--calls", type=int, default=300)
args = parser.parse_args()

torch.set_num_threads(1)
cfg = load_config(args.config)
world = Simulator(cfg).world
n, window = cfg.world.n_categories, cfg.features.recent_items
row = {  # a user with some history and a full recent window
    f"user_behaviour__{name}": value
    for name, value in {
        "requests": 40,
        "sessions": 5,
        "items_viewed": 120,
        "watch_time_s": 2400.0,
        "mean_watch_time_s": 20.0,
        "mean_watch_fraction": 0.45,
        "mean_viewed_duration_s": 44.0,
        "click_rate": 0.1,
        "like_rate": 0.05,
        "recent_watch_fraction": 0.5,
        "category_watch_share": [1.0 / n] * n,
        "recent_watch_fractions": [0.5] * window,
    }.items()
}
page = {
    "viewed": [3, 5, 7],
    "watch_time_s": [4.0, 9.0, 1.5],
    "click": [True, False, False],
    "like": [False] * 3,
}
totals = SessionBehaviour.of_row(row, cfg).with_page(world, cfg, first=True, **page)


def per_call_ms(call: Callable[[], object]) -> float:
    call()
    rounds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.calls):
            call()
        rounds.append((time.perf_counter() - start) / args.calls * 1e3)
    return statistics.median(rounds)


steps = {
    "row -> totals (a session's first request)": lambda: SessionBehaviour.of_row(row, cfg),
    "totals -> user input (its later requests)": lambda: totals.inputs(cfg),
    "row -> user input (the row alone, as before)": lambda: served_inputs(row, cfg),
    "totals + an answered page (a feedback)": lambda: totals.with_page(world, cfg, first=False, **page),
}
print(f"{args.config}, one thread, median of {args.repeats} x {args.calls} calls:")
for name, call in steps.items():
    print(f"  {name:48s} {per_call_ms(call):.3f} ms")
