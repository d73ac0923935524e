"""What writing a session's row to the online store costs, and what it leaves the next user read (docs/benchmarks.md).

On a live Redis store (the serve bench's: a random-policy log's features materialised by the pipeline's steps),
times serving's `FeatureClient.push_session` (a direct `write_to_online_store` of the user_session view) against
Feast's `FeatureStore.push` to `user_session_push`, and the push of a user_behaviour row that each feedback also
makes (with `SessionBehaviour.row`, which builds it, timed apart), each followed by the user read a next page
makes. Medians of `--calls` rounds, one thread.

    PYTHONPATH=. python benchmarks/cpu/session_push.py --config configs/default.yaml
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch
from feast.data_source import PushMode

from unexrl.config import load_config
from unexrl.environ import environ
from unexrl.features import schema as fs
from unexrl.features.client import FeatureClient
from unexrl.features.redis_server import local_redis
from unexrl.features.store import ENV_ENVIRONMENT
from unexrl.serve.behaviour import SessionBehaviour
from unexrl.serve.local import live_feature_env
from unexrl.sim.world import build_world

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="configs/default.yaml")
parser.add_argument("--calls", type=int, default=200)
args = parser.parse_args()

torch.set_num_threads(1)
cfg = load_config(args.config)
USER = 7


def timed(write: Callable[[], object]) -> tuple[float, float]:
    """Median ms of ``write`` and of the user read right after it."""
    writes, reads = [], []
    for _ in range(args.calls + 5):
        t0 = time.perf_counter()
        write()
        t1 = time.perf_counter()
        client.fetch(USER, [], session=True)
        writes.append(t1 - t0)
        reads.append(time.perf_counter() - t1)
    return 1e3 * statistics.median(writes[5:]), 1e3 * statistics.median(reads[5:])


with tempfile.TemporaryDirectory() as tmp, local_redis() as redis:
    env = live_feature_env(cfg, Path(tmp), redis)
    with environ(env):
        # as a replica reads it: one FeatureStore for the writes and the reads, so a push changes its reads
        live = cfg.model_copy(
            update={"features": cfg.features.model_copy(update={"environment": env[ENV_ENVIRONMENT]})}
        )
        client = FeatureClient(live)
        client.warm_up()
        store = client.store

        def row() -> pd.DataFrame:
            return pd.DataFrame(
                {
                    fs.USER.join_key: [USER],
                    fs.TIMESTAMP: [datetime.now(UTC)],
                    "session_id": [5],
                    "session_step": [1],
                    "session_items_watched": [2],
                    "session_watch_time_s": [3.0],
                    "last_watch_fraction": [0.5],
                }
            )

        ways = {
            "push_session (write_to_online_store)": lambda: client.push_session(
                USER, datetime.now(UTC), 5, 1, 2, 3.0, 0.5
            ),
            "FeatureStore.push(user_session_push)": lambda: store.push(
                fs.USER_SESSION.push_source, row(), to=PushMode.ONLINE
            ),
        }
        world = build_world(cfg)
        totals = SessionBehaviour.of_row(client.fetch(USER, []).user, cfg)
        behaviour = totals.row(world, cfg)
        ways["push(user_behaviour), the row built"] = lambda: client.push(
            fs.USER_BEHAVIOUR, USER, datetime.now(UTC), behaviour
        )
        t0 = time.perf_counter()
        for _ in range(args.calls):
            totals.row(world, cfg)
        print(f"SessionBehaviour.row: {1e3 * (time.perf_counter() - t0) / args.calls:.3f} ms per call")
        print(f"{args.config}, live Redis store, median of {args.calls} calls:")
        for name, write in ways.items():
            write_ms, read_ms = timed(write)
            print(f"  {name:40s} write {write_ms:.2f} ms, the user read after it {read_ms:.2f} ms")
