"""Distribution for `unexrl train` under torchrun: process group, device and backend, sharding plan, wrapping.

Every embedding table of the agent is sharded with TorchRec's DistributedModelParallel over a plan from an explicit
EmbeddingShardingPlanner; the online tables train with fused row-wise Adagrad inside backward. The dense MLPs are
replicated and data-parallel, but not through DMP's DDP wrapper: the agent's update calls its actors and critics
directly, never DMP.forward, and DDP only synchronises backward passes that follow its own forward. So the dense
optimizers average their gradients over ranks themselves (:class:`GradientAveraging`, one all-reduce per step).

A plain process (no torchrun) trains alone: no process group, nothing sharded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import OptimizerWrapper

from unexrl.rl.agent import CascadeAgent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the world, its device and the backend (None: no process group)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0 validates, writes the curve, the export and each checkpoint's progress record."""
        return self.rank == 0


def device_and_backend(name: str, local_rank: int) -> tuple[torch.device, str]:
    """NCCL on CUDA (one GPU per local rank), gloo on the CPU."""
    device = torch.device(name)
    if device.type != "cuda":
        return device, "gloo"
    if not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is visible")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)  # "cuda" elsewhere in the code (the simulator) now means this rank's GPU
    return device, "nccl"


def init(device: str) -> Context:
    """Join the process group when launched by torchrun (WORLD_SIZE set); a plain process trains alone."""
    if "WORLD_SIZE" not in os.environ:
        return Context(device=torch.device(device))
    dev, backend = device_and_backend(device, int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, device_id=dev if backend == "nccl" else None)
    ctx = Context(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev, backend=backend)
    log.info(
        "process group up rank=%d world_size=%d backend=%s device=%s", ctx.rank, ctx.world_size, backend, dev
    )
    return ctx


def destroy(ctx: Context) -> None:
    """Leave the process group: without it, exit after training sometimes aborts (docs/training.md)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast(tensor: Tensor, ctx: Context) -> Tensor:
    """Rank 0's ``tensor`` on every rank (through the device: NCCL moves only GPU tensors)."""
    if not ctx.distributed:
        return tensor
    on_device = tensor.to(ctx.device)
    dist.broadcast(on_device, 0)
    return on_device.to(tensor.device)


def average(tensor: Tensor, ctx: Context) -> Tensor:
    """The mean of ``tensor`` over ranks."""
    if not ctx.distributed:
        return tensor
    on_device = tensor.to(ctx.device)
    dist.all_reduce(on_device)
    return (on_device / ctx.world_size).to(tensor.device)


class ModelParallelSharder(EmbeddingBagCollectionSharder):
    """Every sharding type but data-parallel, on every device.

    TorchRec offers row-wise and table-row-wise sharding only for CUDA, yet fbgemm's CPU kernels run them over gloo,
    so the CUDA list is offered everywhere. Data-parallel is left out: a replicated table silently drops its
    in-backward optimizer and falls to the dense one.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [t for t in super().sharding_types("cuda") if t != ShardingType.DATA_PARALLEL.value]


class _NoDataParallel(DataParallelWrapper):
    """Leave the dense modules unwrapped: :class:`GradientAveraging` makes them data-parallel."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        return None


class GradientAveraging(OptimizerWrapper):
    """Average the dense gradients over ranks, then step: DDP done at the optimizer (see the module docstring)."""

    def step(self, closure: object = None) -> None:
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        super().step(closure)


def sharding_plan(agent: CascadeAgent, ctx: Context) -> ShardingPlan:
    """The planner's plan for every table, computed on rank 0 and shared, so every rank shards alike. The target
    critics own no tables (they read the online encoder's embeddings), so only the online tables are placed."""
    topology = Topology(
        world_size=ctx.world_size,
        compute_device=ctx.device.type,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)),
    )
    return EmbeddingShardingPlanner(topology=topology).collective_plan(
        agent, [ModelParallelSharder()], dist.GroupMember.WORLD
    )


def describe(plan: ShardingPlan) -> dict[str, str]:
    """``{table: "<sharding type> on ranks [..]"}``: what logs and manifests record."""
    return {
        table: f"{p.sharding_type} on ranks {p.ranks}"
        for _, module_plan in sorted(plan.plan.items())
        for table, p in module_plan.items()  # type: ignore[attr-defined]
    }


def shard(
    agent: CascadeAgent, ctx: Context, embedding_lr: float
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Shard ``agent`` (already on ``ctx.device``) in place: fused row-wise Adagrad for the online tables,
    rank-averaged Adam for the dense rest.

    Rank 0's initial weights are broadcast first and copied into the shards (sharding re-initialises tables), so
    every rank starts from the same networks and each target equals its online network.
    """
    initial = agent.state_dict()
    for tensor in initial.values():
        dist.broadcast(tensor, 0)
    for encoder in (agent.actors.encoder, *(q.encoder for q in agent.critics)):
        apply_optimizer_in_backward(RowWiseAdagrad, encoder.ebc.parameters(), {"lr": embedding_lr})
    plan = sharding_plan(agent, ctx)
    dmp = DistributedModelParallel(
        agent,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=ctx.device,
        plan=plan,
        sharders=[ModelParallelSharder()],
        data_parallel_wrapper=_NoDataParallel(),
    )
    with torch.no_grad():
        for name, value in agent.state_dict().items():
            if isinstance(value, ShardedTensor):
                for shard_ in value.local_shards():
                    shard_.tensor.copy_(initial[name][_region(shard_)])
    agent.build_optimizers(wrap=GradientAveraging)
    log.info("sharded the agent's tables: %s", describe(plan))
    return dmp, plan


def _region(shard_: Shard) -> tuple[slice, ...]:
    """Where a local shard sits in its whole table."""
    return tuple(slice(o, o + n) for o, n in zip(shard_.metadata.shard_offsets, shard_.metadata.shard_sizes))


def full_state_dict(module: nn.Module, device: torch.device) -> dict[str, Tensor]:
    """``module``'s state with every sharded table assembled whole (on ``device``, the collective's), as CPU copies.

    A collective when the module is sharded: every rank calls it (one all-reduce per sharded table).
    """
    out = {}
    for name, value in module.state_dict().items():
        if isinstance(value, ShardedTensor):
            whole = torch.zeros(value.size(), dtype=value.dtype, device=device)
            for shard_ in value.local_shards():
                whole[_region(shard_)] = shard_.tensor
            dist.all_reduce(whole)  # shards do not overlap: the sum is the table
            value = whole
        out[name] = value.detach().to("cpu", copy=True).contiguous()
    return out


class ActingCopy:
    """An unsharded, unfused replica of the actors for rollouts: collection on every rank, validation on rank 0.

    A rollout steps only this rank's sessions, which end at different times on different ranks, so it cannot drive
    sharded tables (every sharded forward is a collective); nor can a copy share a fused table's kernel. The replica
    is built plain (``build``) and refreshed from the online actors, a collective, whenever they have changed since
    the last refresh; in one process that is a plain copy.
    """

    def __init__(self, build: Callable[[], nn.Module], device: torch.device) -> None:
        self.actors = build().to(device).requires_grad_(False)
        self.device = device
        self._version: int | None = None

    def refresh(self, online: nn.Module, version: int) -> nn.Module:
        """The replica as of ``version`` (the update count); every rank calls it at the same versions."""
        if version != self._version:
            self.actors.load_state_dict(full_state_dict(online, self.device))
            self._version = version
        return self.actors
