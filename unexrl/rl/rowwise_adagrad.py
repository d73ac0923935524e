"""Row-wise Adagrad for embedding tables trained in one process, on sparse or dense gradients.

Under torchrun the tables are sharded by DMP and trained by fbgemm's fused exact row-wise Adagrad inside backward
(unexrl/train/distributed.py). In one process that fused CPU kernel costs about three times a plain
EmbeddingBagCollection's forward and backward (docs/benchmarks.md), so there the tables are plain collections and
this optimizer applies the same update to the rows a batch touched:

    G_r += mean_j g_rj^2            (one accumulator per row; g_r: the row's gradient, duplicates summed)
    w_r -= lr * g_r / (sqrt(G_r) + eps)

A large table's bag returns a sparse gradient (only the rows the batch looked up); a small one, which a batch
touches almost whole, a dense one (unexrl.rl.networks.SparseEncoder decides). On a dense gradient the update runs
over every row, and a row the batch did not touch is left exactly as it was: its gradient is zero, so G_r gains 0
and w_r moves by 0 * scale.

tests/test_rowwise_adagrad.py checks that it trains tables exactly as TorchRec's fused collection does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

FBGEMM_EPS = 1e-8
"""fbgemm's default eps for row-wise Adagrad, which TorchRec's fused tables use"""


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for 2-D parameters with row-sparse (COO) or dense gradients."""

    def __init__(self, params: Iterable[Tensor], lr: float, eps: float = FBGEMM_EPS) -> None:
        if lr <= 0 or eps < 0:
            raise ValueError(f"RowWiseAdagrad: lr must be > 0 and eps >= 0, got lr={lr}, eps={eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2 or (p.grad.is_sparse and p.grad.sparse_dim() != 1):
                    raise ValueError(
                        f"RowWiseAdagrad steps 2-D tables on row-sparse or dense gradients, got a {p.dim()}-D "
                        f"parameter with a {p.grad.layout} gradient"
                    )
                state = self.state[p]
                if not state:
                    state["momentum1"] = torch.zeros(p.shape[0], device=p.device)
                if p.grad.is_sparse:
                    self._sparse(p, p.grad, state["momentum1"], group["lr"], group["eps"])
                else:
                    self._dense(p, p.grad, state["momentum1"], group["lr"], group["eps"])

    @staticmethod
    def _sparse(p: Tensor, grad: Tensor, momentum: Tensor, lr: float, eps: float) -> None:
        grad = grad.coalesce()  # duplicate rows summed, as the fused kernel aggregates them
        rows, g = grad.indices()[0], grad.values()
        accumulated = momentum.index_select(0, rows) + g.square().mean(1)
        momentum.index_copy_(0, rows, accumulated)
        scale = -lr / (accumulated.sqrt() + eps)
        # rows are unique once coalesced: a gather and a copy back cost a third of index_add_ on a large table
        p.index_copy_(0, rows, torch.addcmul(p.index_select(0, rows), g, scale.unsqueeze(1)))

    @staticmethod
    def _dense(p: Tensor, g: Tensor, momentum: Tensor, lr: float, eps: float) -> None:
        momentum.add_(g.square().mean(1))
        p.addcmul_(g, (-lr / (momentum.sqrt() + eps)).unsqueeze(1))
