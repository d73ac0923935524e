"""Stage actors mu^i(tau^i) -> a^i and the global twin critic Q^g(tau^{1:N}, a^{1:N}).

Sparse inputs (user id, recent items, recent categories) go through a TorchRec EmbeddingBagCollection; dense
inputs through an MLP. Embeddings are read by key (``kt[key]``) in SPARSE_FEATURES order, never from
``kt.values()``, whose key order differs between sharded and unsharded modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchrec
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from unexrl.rl.observation import SPARSE_FEATURES

_TABLE_OF = {"user_id": "users", "recent_items": "items", "recent_categories": "categories"}


def embedding_tables(prefix: str, n_users: int, n_items: int, n_categories: int, dim: int) -> list[EmbeddingBagConfig]:
    """One table per sparse feature, named ``<prefix>_<table>`` so every network's tables are distinct."""
    rows = {"users": n_users, "items": n_items, "categories": n_categories}
    return [
        EmbeddingBagConfig(
            name=f"{prefix}_{_TABLE_OF[f]}", embedding_dim=dim, num_embeddings=rows[_TABLE_OF[f]], feature_names=[f],
            pooling=torchrec.PoolingType.MEAN if f != "user_id" else torchrec.PoolingType.SUM,
        )
        for f in SPARSE_FEATURES
    ]


class SparseEncoder(nn.Module):
    """EmbeddingBagCollection over SPARSE_FEATURES -> [B, 3E] in a fixed key order."""

    def __init__(self, tables: list[EmbeddingBagConfig], device: torch.device | None = None) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=tables, device=device or torch.device("cpu"))
        self.out_dim = sum(t.embedding_dim for t in tables)

    def forward(self, kjt: KeyedJaggedTensor) -> Tensor:
        kt = self.ebc(kjt)
        return torch.cat([kt[f] for f in SPARSE_FEATURES], dim=1)


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class StageActor(nn.Module):
    """mu^i: (sparse tau^1, session state, summary of stage i's candidates, upstream actions) -> a^i in bounds.

    The summary is :func:`unexrl.rl.observation.candidate_summary` of the stage's view. With ``initial`` (the
    production weights, e.g. CEM's) the actor starts as that policy and moves at most ``radius`` from it per
    dimension: RL personalises the fusion weights around what production runs, and a fresh actor is no worse.
    """

    def __init__(
        self, encoder: SparseEncoder, state_dim: int, action_dim: int, upstream_dim: int, hidden: int,
        low: float, high: float, initial: Tensor | None = None, radius: float | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.net = mlp(encoder.out_dim + state_dim + 3 * action_dim + upstream_dim, hidden, action_dim)
        lo, hi = torch.full((action_dim,), float(low)), torch.full((action_dim,), float(high))
        if initial is not None and radius is not None:
            lo, hi = (initial - radius).clamp_min(low), (initial + radius).clamp_max(high)
        self.register_buffer("center", (hi + lo) / 2)
        self.register_buffer("half_range", (hi - lo) / 2)
        if initial is not None:
            last = self.net[-1]
            with torch.no_grad():
                last.weight.mul_(0.01)
                last.bias.copy_(torch.atanh(((initial - self.center) / self.half_range).clamp(-0.95, 0.95)))

    def forward(self, kjt: KeyedJaggedTensor, state: Tensor, summary: Tensor, upstream: Sequence[Tensor]) -> Tensor:
        x = torch.cat([self.encoder(kjt), state, summary, *upstream], dim=1)
        return self.center + self.half_range * torch.tanh(self.net(x))


class FixedAction(nn.Module):
    """A stage that does not learn (e.g. upstream stages held at CEM weights): the same action for every request."""

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights.detach().clone().float())

    def forward(self, kjt: KeyedJaggedTensor, state: Tensor, summary: Tensor, upstream: Sequence[Tensor]) -> Tensor:
        return self.weights.expand(state.shape[0], -1)


class Critic(nn.Module):
    """Q(tau^{1:N}, a^{1:N}): sparse tau^1, session state, and for every stage its candidate summary and action."""

    def __init__(self, encoder: SparseEncoder, state_dim: int, action_dims: Sequence[int], hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.net = mlp(encoder.out_dim + state_dim + sum(4 * d for d in action_dims), hidden, 1)

    def forward(self, kjt: KeyedJaggedTensor, state: Tensor, summaries: Sequence[Tensor],
                actions: Sequence[Tensor]) -> Tensor:
        parts = [self.encoder(kjt), state]
        for summary, a in zip(summaries, actions):
            parts += [summary, a]
        return self.net(torch.cat(parts, dim=1)).squeeze(1)

