"""Shared fixtures: the small config and a simulator built once per test session."""

from __future__ import annotations

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
def train_logs(tmp_path_factory: pytest.TempPathFactory, cem_artifact: Path) -> Path:
    """A small log directory written by `unexrl simulate` under the CEM artifact (offline training data)."""
    from unexrl.cli import main

    out = tmp_path_factory.mktemp("logs") / "logs"
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
    return out
