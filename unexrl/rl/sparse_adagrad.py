"""Row-wise Adagrad over the sparse gradients of embedding tables, for training in one process.

Under torchrun the tables are sharded by DMP and trained by fbgemm's fused exact row-wise Adagrad inside backward
(unexrl/train/distributed.py). In one process that fused CPU kernel costs about three times a plain
EmbeddingBagCollection's forward and backward (docs/benchmarks.md), so there the tables are plain collections
whose bags return sparse gradients (only the rows a batch touched), and this optimizer applies the same update to
those rows:

    G_r += mean_j g_rj^2            (one accumulator per row; g_r: the row's gradient, duplicates summed)
    w_r -= lr * g_r / (sqrt(G_r) + eps)

tests/test_sparse_adagrad.py checks that it trains a table exactly as TorchRec's fused collection does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

FBGEMM_EPS = 1e-8
"""fbgemm's default eps for row-wise Adagrad, which TorchRec's fused tables use"""


class SparseRowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for 2-D parameters with sparse (COO) gradients; rows without a gradient are not touched."""

    def __init__(self, params: Iterable[Tensor], lr: float, eps: float = FBGEMM_EPS) -> None:
        if lr <= 0 or eps < 0:
            raise ValueError(f"SparseRowWiseAdagrad: lr must be > 0 and eps >= 0, got lr={lr}, eps={eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse or p.grad.sparse_dim() != 1:
                    raise ValueError(
                        "SparseRowWiseAdagrad needs row-sparse gradients (an embedding bag with sparse=True)"
                    )
                state = self.state[p]
                if not state:
                    state["momentum1"] = torch.zeros(p.shape[0], device=p.device)
                grad = p.grad.coalesce()  # duplicate rows summed, as the fused kernel aggregates them
                rows, g = grad.indices()[0], grad.values()
                accumulated = state["momentum1"].index_select(0, rows) + g.square().mean(1)
                state["momentum1"].index_copy_(0, rows, accumulated)
                scale = -group["lr"] / (accumulated.sqrt() + group["eps"])
                p.index_add_(0, rows, g * scale.unsqueeze(1))
