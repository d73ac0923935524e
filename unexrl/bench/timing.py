"""Median wall times of benchmark candidates, each measured after a warm-up call.

Candidates compared as a ratio are timed in interleaved rounds (one call of each per round), so that a change in
the machine's load during the run (these machines are shared) falls on all of them alike instead of on whichever
happened to run then.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    return interleaved_median_seconds({"fn": fn}, repeats, device)["fn"]


def interleaved_median_seconds(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each candidate over ``repeats`` rounds; each round calls every candidate once."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
