from __future__ import annotations

import numpy as np

from unexrl.evaluate.stats import bootstrap_mean, bootstrap_uplift


def test_interval_contains_mean_and_shrinks_with_data() -> None:
    rng = np.random.default_rng(0)
    small = [rng.normal(10, 2, 50) for _ in range(3)]
    large = [rng.normal(10, 2, 2000) for _ in range(3)]
    a, b = bootstrap_mean(small), bootstrap_mean(large)
    assert a.low < a.mean < a.high and b.low < b.mean < b.high
    assert (b.high - b.low) < (a.high - a.low)
    assert b.low < 10 < b.high


def test_paired_uplift() -> None:
    rng = np.random.default_rng(1)
    ref = [rng.lognormal(6, 1, 500) for _ in range(3)]
    same = bootstrap_uplift(ref, ref)
    assert same.mean == 0 and same.low == 0 and same.high == 0
    better = bootstrap_uplift([r * 1.05 for r in ref], ref)
    assert abs(better.mean - 5.0) < 1e-9 and better.low > 0
    noisy = bootstrap_uplift([r * rng.normal(1.0, 0.2, r.shape) for r in ref], ref)
    assert noisy.low < 0 < noisy.high
