"""Stage actors mu^1..mu^N and the global twin critic Q^g, over TorchRec embeddings and standardised dense inputs.

Each role has one sparse encoder (a TorchRec EmbeddingBagCollection read by key, never through ``kt.values()``,
whose key order differs once sharded), shared by everything in that role:
- the actors' encoder embeds the user id, recent items and recent categories; every stage's head reads it;
- the critic's encoder embeds recent items and categories only (no user id: a per-user row would memorise users'
  returns, not learn how actions change them), and both twin critics read it.
The target critic is a copy of the critic's dense head; it reads the online critic encoder's embeddings, detached.

In one process an encoder's large tables return sparse gradients (the rows a batch touched) and its small ones dense
gradients, which unexrl.rl.rowwise_adagrad.RowWiseAdagrad steps with the update of fbgemm's fused row-wise Adagrad.
Under torchrun it is a plain EmbeddingBagCollection that DMP shards with that fused optimizer
(unexrl/train/distributed.py), so both paths train the tables alike. Acting copies and exports hold plain ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchrec
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

ACTOR_FEATURES = ("user_id", "recent_items", "recent_categories")
"""sparse inputs of the actors, in the order their embeddings are concatenated"""
CRITIC_FEATURES = ("recent_items", "recent_categories")
"""sparse inputs of the critic (no user id)"""
_TABLE_OF = {"user_id": "users", "recent_items": "items", "recent_categories": "categories"}


def embedding_tables(
    prefix: str, features: Sequence[str], rows: dict[str, int], dim: int
) -> list[EmbeddingBagConfig]:
    """One table per feature, ``<prefix>_<table>``: sum-pooled user id, mean-pooled histories."""
    return [
        EmbeddingBagConfig(
            name=f"{prefix}_{_TABLE_OF[f]}",
            embedding_dim=dim,
            num_embeddings=rows[_TABLE_OF[f]],
            feature_names=[f],
            pooling=torchrec.PoolingType.SUM if f == "user_id" else torchrec.PoolingType.MEAN,
        )
        for f in features
    ]


SPARSE_GRAD_MIN_ROWS = 1000
"""tables of at least this many rows return sparse gradients in one process. A batch of 256 with 10-item histories
looks up about 2,500 rows: a smaller table is touched almost whole, and there a dense gradient costs less than
coalescing a sparse one (the 30-row category table: 13 us against 119 us per optimizer step on this CPU)."""


class SparseEncoder(nn.Module):
    """An EmbeddingBagCollection over ``features`` -> [B, sum dims] in that fixed order.

    ``sparse_grad``: the tables of at least ``SPARSE_GRAD_MIN_ROWS`` rows return sparse gradients, for RowWiseAdagrad
    (one process); False: every table returns dense ones (a collection that DMP shards and trains fused under
    torchrun, or an acting copy / export that never trains).
    """

    def __init__(self, tables: list[EmbeddingBagConfig], sparse_grad: bool = False) -> None:
        super().__init__()
        self.features = tuple(f for t in tables for f in t.feature_names)
        self.ebc = EmbeddingBagCollection(tables=tables)
        for bag in self.ebc.embedding_bags.values():
            # nn.EmbeddingBag's own switch, read by its forward
            bag.sparse = sparse_grad and bag.num_embeddings >= SPARSE_GRAD_MIN_ROWS
        self.out_dim = sum(t.embedding_dim for t in tables)

    def forward(self, kjt: KeyedJaggedTensor) -> Tensor:
        kt = self.ebc(kjt)
        return torch.cat([kt[f] for f in self.features], dim=1)


class Standardize(nn.Module):
    """(x - mean) / std per feature, with statistics fitted once on the first data (warm-up or logs) and then
    frozen: part of the network's state, so a checkpoint or an export carries the scaling it was trained with."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-3))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)
    )


class EnsembleLinear(nn.Module):
    """K independent linear layers applied as one batched matmul: [K, B, n_in] -> [K, B, n_out]."""

    def __init__(self, k: int, n_in: int, n_out: int) -> None:
        super().__init__()
        layers = [nn.Linear(n_in, n_out) for _ in range(k)]  # nn.Linear's initialisation, K times
        self.weight = nn.Parameter(torch.stack([layer.weight.detach().T for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach()[None] for layer in layers]))

    def forward(self, x: Tensor, members: slice = slice(None)) -> Tensor:
        return torch.baddbmm(self.bias[members], x, self.weight[members])


class EnsembleMLP(nn.Module):
    """K two-hidden-layer MLPs as batched matmuls; ``members`` evaluates a subset (e.g. only Q_1)."""

    def __init__(self, k: int, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                EnsembleLinear(k, n_in, hidden),
                EnsembleLinear(k, hidden, hidden),
                EnsembleLinear(k, hidden, n_out),
            ]
        )

    def forward(self, x: Tensor, members: slice = slice(None)) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else torch.relu(x), members)
        return x


def straight_through_clamp(x: Tensor, low: float, high: float) -> Tensor:
    """clamp(x) forward, identity backward: an action held at the box's edge can still be pulled back inside."""
    return x + (x.clamp(low, high) - x).detach()


class StageHead(nn.Module):
    """mu^i's dense part: (actor embeddings, standardised [state, stage-i candidate summary], upstream actions) -> a^i.

        a^i = clamp(initial + radius * tanh(net(x)), box)

    The last layer starts at zero, so an untrained actor is exactly the initial (production, e.g. CEM) weights,
    with tanh's full slope there whatever those weights are; ``radius`` bounds how far it may personalise them.
    """

    def __init__(
        self,
        embedding_dim: int,
        dense_dim: int,
        action_dim: int,
        upstream_dim: int,
        hidden: int,
        low: float,
        high: float,
        initial: Tensor,
        radius: float,
    ) -> None:
        super().__init__()
        self.dense = Standardize(dense_dim)
        self.net = mlp(embedding_dim + dense_dim + upstream_dim, hidden, action_dim)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("initial", initial.detach().clone().float())
        self.radius, self.low, self.high = radius, low, high

    def forward(self, embedding: Tensor, dense: Tensor, upstream: Sequence[Tensor]) -> Tensor:
        x = torch.cat([embedding, self.dense(dense), *upstream], dim=1)
        return straight_through_clamp(
            self.initial + self.radius * torch.tanh(self.net(x)), self.low, self.high
        )


class FixedAction(nn.Module):
    """A stage that does not learn (e.g. upstream stages held at CEM weights): the same action for every request."""

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights.detach().clone().float())

    def forward(self, embedding: Tensor, dense: Tensor, upstream: Sequence[Tensor]) -> Tensor:
        return self.weights.expand(dense.shape[0], -1)


class StageActors(nn.Module):
    """mu^1..mu^N: one sparse encoder for every stage and a head per stage (StageHead or FixedAction)."""

    def __init__(self, encoder: SparseEncoder, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(heads)

    def embed(self, kjt: KeyedJaggedTensor) -> Tensor:
        """[B, E] actor embeddings of a batch of tau^1 (``unexrl.rl.observation.sparse_features``)."""
        return self.encoder(kjt)

    def act(self, stage: int, embedding: Tensor, dense: Tensor, upstream: Sequence[Tensor]) -> Tensor:
        return self.heads[stage](embedding, dense, upstream)


class CriticHead(nn.Module):
    """K critics centred on the current policy, evaluated as one ensemble:

        Q_k(tau^1, a) = V_k(s) + g_k(s) . delta - 1/2 sum_j softplus(h_k(s))_j delta_j^2,   delta = (a - mu(s)) / sigma

    s: the critic's embeddings and its standardised dense input (session state, activity group, pool summary); a:
    the concatenated actions a^1 | ... | a^N; mu(s): the current actors' own actions there (through CIC); sigma: the
    actions' spread in the first data. This is the deterministic policy gradient's compatible critic (Silver et al.
    2014) with a concave curvature term: dQ/da at the policy's action is exactly g(s)/sigma, learned from how the
    returns of nearby actions differ, per state; a ReLU network over (s, a) instead extrapolates its slope linearly
    past its data, so its gradient does not turn when the policy passes an optimum (docs/results.md). V(s) is the
    value of acting as the policy does, Q(s, mu(s)); the curvature only absorbs actions far from mu in the data.
    Downstream observations tau^{2:N} are functions of (tau^1, a^{1:N}) (the CIC theorem), so Q reads the actions.
    """

    def __init__(self, embedding_dim: int, dense_dim: int, action_dim: int, hidden: int, k: int) -> None:
        super().__init__()
        self.k, self.action_dim = k, action_dim
        self.dense = Standardize(dense_dim)
        self.actions = Standardize(action_dim)
        self.net = EnsembleMLP(k, embedding_dim + dense_dim, hidden, 1 + 2 * action_dim)

    def state_features(self, embedding: Tensor, dense: Tensor, members: slice = slice(None)) -> Tensor:
        """[K, B, 1 + 2D]: V_k(s), g_k(s), h_k(s), computed once per state and shared by every action evaluated."""
        x = torch.cat([embedding, self.dense(dense)], dim=1)
        return self.net(x.expand(len(range(self.k)[members]), -1, -1), members)

    @staticmethod
    def value(state_features: Tensor) -> Tensor:
        """[K, B] V_k(s) = Q_k(s, mu(s))."""
        return state_features[..., 0]

    def forward(self, state_features: Tensor, actions: Sequence[Tensor], centre: Sequence[Tensor]) -> Tensor:
        """[K, B] Q values of ``actions`` around the policy's actions ``centre`` (both lists of a^i)."""
        delta = (torch.cat(list(actions), dim=1) - torch.cat(list(centre), dim=1)) / self.actions.std
        d = self.action_dim
        slope, curvature = (
            state_features[..., 1 : 1 + d],
            nn.functional.softplus(state_features[..., 1 + d :]),
        )
        return state_features[..., 0] + (slope * delta).sum(-1) - 0.5 * (curvature * delta.square()).sum(-1)
