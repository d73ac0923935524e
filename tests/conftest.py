"""Shared fixtures: the small config and a simulator built once per test session."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch

from unexrl.config import Config, load_config
from unexrl.sim.env import Simulator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_cfg() -> Config:
    return load_config(ROOT / "configs" / "small.yaml")


@pytest.fixture(scope="session")
def small_sim(small_cfg: Config) -> Simulator:
    return Simulator(small_cfg)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Train with one intra-op thread: on 2 loaded cores, 2 OpenMP threads per process oversubscribe them
    (one small `unexrl train` run measured 25 s with 2 threads, under 1 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def single_thread() -> Callable[[], AbstractContextManager[None]]:
    """:func:`one_torch_thread`, for fixtures and tests that train in this process."""
    return one_torch_thread


@pytest.fixture(scope="session")
def cem_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quickly tuned global CEM artifact on the small config (fixed stages and warm-up of training runs)."""
    from unexrl.cli import main

    out = tmp_path_factory.mktemp("cem") / "cem"
    fast = ["--set", "cem.iterations=2", "--set", "cem.population=4", "--set", "cem.sessions_per_candidate=4"]
    with one_torch_thread():
        assert main(["cem", "--config", str(ROOT / "configs" / "small.yaml"), *fast, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def train_logs(logged_store: tuple[Path, Path]) -> Path:
    """A small log directory written by `unexrl simulate` under the CEM artifact (offline training data), with its
    point-in-time training set beside the transitions (:func:`training_set_args`), built through Feast."""
    return logged_store[0]


@pytest.fixture(scope="session")
def logged_store(tmp_path_factory: pytest.TempPathFactory, cem_artifact: Path) -> tuple[Path, Path]:
    """(logs, feature repository): :func:`train_logs` and the local Feast repository its features were built,
    materialised (SQLite online store) and joined in; set ``features.repo`` to it to serve from that store."""
    from unexrl.cli import main

    out = tmp_path_factory.mktemp("logs") / "logs"
    repo = tmp_path_factory.mktemp("train-features") / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    features = ["--config", str(ROOT / "configs" / "small.yaml"), "--set", f"features.repo={repo}"]
    with one_torch_thread():
        assert (
            main(
                [
                    "simulate",
                    "--config",
                    str(ROOT / "configs" / "small.yaml"),
                    "--set",
                    "logging.sessions=100",
                    "--policy",
                    str(cem_artifact),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        built = repo.parent / "features"
        assert main(["features", "build", *features, "--logs", str(out), "--out", str(built)]) == 0
        assert main(["features", "materialize", *features, "--features", str(built)]) == 0
        assert main(["features", "training-set", *features, "--logs", str(out)]) == 0
    return out, repo


def training_set_args(logs: Path) -> list[str]:
    """`--training-set` of a log directory whose training set was written beside it (offline training needs it)."""
    from unexrl.features.store import TRAINING_SET_FILE

    return ["--training-set", str(logs / TRAINING_SET_FILE)]


FAST_TRAIN = (
    "train.updates=6",
    "train.eval_sessions=8",
    "train.buffer_size=2000",
    "algo.batch_size=32",
    "algo.hidden=32",
)
"""a few updates of a small network on the small config: enough to export real actors in seconds"""


def _train_small(run: Path, algo: str, cem: Path, logs: Path | None = None) -> Path:
    """`unexrl train` of ``algo`` with FAST_TRAIN into ``run`` (offline from ``logs`` when given); its export."""
    from unexrl.cli import main

    sets = [x for o in FAST_TRAIN for x in ("--set", o)]
    offline = ["--logs", str(logs), *training_set_args(logs)] if logs is not None else []
    args = ["train", "--config", str(ROOT / "configs" / "small.yaml"), *sets, "--algo", algo, *offline]
    with one_torch_thread():
        assert main([*args, "--cem", str(cem), "--out", str(run)]) == 0
    return run / "export"


@pytest.fixture(scope="session")
def train_small() -> Callable[..., Path]:
    """:func:`_train_small`, for fixtures that export actors of their own algorithm or data."""
    return _train_small


@pytest.fixture(scope="session")
def small_actors(tmp_path_factory: pytest.TempPathFactory, cem_artifact: Path) -> Path:
    """An `actors` export of a few unexrl-cic updates on the small config (what serving tests serve)."""
    return _train_small(tmp_path_factory.mktemp("serve-train") / "run", "unexrl-cic", cem_artifact)


@pytest.fixture(scope="module")
def redis_address() -> Iterator[str]:
    """A fresh loopback redis-server per test module (modules never share a keyspace)."""
    from unexrl.features.redis_server import local_redis, redis_server_path

    if redis_server_path() is None:
        pytest.skip("redis-server is not installed here and could not be installed (make test installs it)")
    with local_redis() as address:
        yield address
