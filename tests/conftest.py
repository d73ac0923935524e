"""Shared fixtures: the small config and a simulator built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from unexrl.config import Config, load_config
from unexrl.sim.env import Simulator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_cfg() -> Config:
    return load_config(ROOT / "configs" / "small.yaml")


@pytest.fixture(scope="session")
def small_sim(small_cfg: Config) -> Simulator:
    return Simulator(small_cfg)
