"""RowWiseAdagrad trains tables exactly as TorchRec's fused row-wise Adagrad does (the torchrun path), on the sparse
gradients of a large table and the dense gradients of a small one."""

import pytest
import torch
import torchrec
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad as FusedRowWiseAdagrad

from unexrl.rl.networks import SPARSE_GRAD_MIN_ROWS, SparseEncoder
from unexrl.rl.rowwise_adagrad import RowWiseAdagrad

USERS, ITEMS = 50, SPARSE_GRAD_MIN_ROWS


def _table(name: str, rows: int, feature: str, pooling: torchrec.PoolingType) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        name=name, embedding_dim=8, num_embeddings=rows, feature_names=[feature], pooling=pooling
    )


TABLES = [
    _table("user_table", USERS, "user", torchrec.PoolingType.SUM),
    _table("item_table", ITEMS, "items", torchrec.PoolingType.MEAN),
]


def _batch(generator: torch.Generator, b: int = 16) -> KeyedJaggedTensor:
    lengths = torch.randint(0, 6, (b,), generator=generator)  # empty histories included
    values = torch.cat(
        [
            torch.randint(0, USERS, (b,), generator=generator),
            torch.randint(0, 8, (int(lengths.sum()),), generator=generator),
        ]
    )  # 8 of the item rows: many duplicates in a batch
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "items"], values=values, lengths=torch.cat([torch.ones(b, dtype=torch.long), lengths])
    )


def test_it_trains_tables_as_the_fused_collection_does() -> None:
    torch.manual_seed(0)
    fused = FusedEmbeddingBagCollection(
        tables=TABLES, optimizer_type=FusedRowWiseAdagrad, optimizer_kwargs={"lr": 0.05}
    )
    encoder = SparseEncoder(TABLES, sparse_grad=True)
    encoder.ebc.load_state_dict(fused.state_dict())
    optimizer = RowWiseAdagrad(encoder.parameters(), lr=0.05)
    start = {k: v.clone() for k, v in fused.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    layouts = set()
    for _ in range(20):
        kjt = _batch(generator)
        target = torch.randn(16, 16, generator=generator)
        ((fused(kjt).values() - target) ** 2).sum().backward()  # steps inside backward
        optimizer.zero_grad(set_to_none=True)
        ((encoder(kjt) - target) ** 2).sum().backward()
        layouts |= {p.grad.layout for p in encoder.parameters()}
        optimizer.step()
    assert layouts == {torch.strided, torch.sparse_coo}  # the small table dense, the large one sparse
    ours = encoder.ebc.state_dict()
    for name, weights in fused.state_dict().items():
        assert not torch.equal(weights, start[name])  # it trained
        torch.testing.assert_close(ours[name], weights, rtol=0, atol=1e-6)


def test_it_refuses_a_parameter_that_is_not_a_table() -> None:
    bias = torch.nn.Parameter(torch.zeros(4))
    bias.grad = torch.ones(4)
    with pytest.raises(ValueError, match="2-D tables"):
        RowWiseAdagrad([bias], lr=0.05).step()
