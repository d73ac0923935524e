"""`unexrl bench sim`: simulator throughput against two references measured in the same run.

- memory bound: copy bandwidth of a large tensor, divided by the bytes the cascade must read per request
- lean reference: the leanest batched cascade on the same shapes (one mat-vec over the pool, then gathers of
  survivors only, unsorted top-k): what selection itself costs
- cascade: :func:`unexrl.cascade.run_cascade`, the one function the simulator, CIC and serving use
- simulator step: cascade + user response + session bookkeeping on a given tau^1
- full step (for information): also retrieval and stage-model predictions, i.e. building tau^1
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from unexrl.bench.timing import median_seconds
from unexrl.cascade import replay_actions, run_cascade
from unexrl.config import Config
from unexrl.policies.weights import WeightPolicy, stage_slices
from unexrl.sim.env import Simulator

_COPY_BYTES = 256 * 2**20


def lean_reference_cascade(predictions: list[Tensor], keep: list[int], actions: list[Tensor]) -> Tensor:
    """Selection only: stage 1 scores the whole pool with one batched mat-vec, later stages gather survivors."""
    index = (
        torch.bmm(predictions[0], actions[0].unsqueeze(-1)).squeeze(-1).topk(keep[0], 1, sorted=False).indices
    )
    for pred, k, a in zip(predictions[1:], keep[1:], actions[1:]):
        v = pred.gather(1, index.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
        index = index.gather(1, torch.bmm(v, a.unsqueeze(-1)).squeeze(-1).topk(k, 1, sorted=False).indices)
    return index


def cascade_bytes_per_request(cfg: Config) -> int:
    """float32 predictions the cascade must read: the whole pool for stage 1, the survivors after that."""
    sizes, dims = cfg.cascade.sizes, cfg.cascade.action_dims
    return 4 * sum(n * d for n, d in zip(sizes[:-1], dims))


def bench_sim(cfg: Config) -> dict[str, Any]:
    """Measure requests/s of each part and the ratios between them; returns a JSON-able dict."""
    torch.manual_seed(0)
    device = torch.device(cfg.device)
    sim = Simulator(cfg)
    batch, repeats = cfg.bench.sim_batch, cfg.bench.repeats
    state = sim.start(cfg.seeds.train[0], torch.arange(batch))
    obs = sim.observe(state)
    weights = torch.full((1, sum(cfg.cascade.action_dims)), 0.5, device=device)
    policy = WeightPolicy(weights, cfg.cascade)
    actions = [weights[:, part].expand(batch, -1).contiguous() for part in stage_slices(cfg.cascade)]
    preds = list(obs.predictions)

    src = torch.ones(_COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), repeats, device)
    bandwidth = 2 * _COPY_BYTES / copy_s  # a copy reads and writes every byte
    per_request = cascade_bytes_per_request(cfg)

    lean_s = median_seconds(lambda: lean_reference_cascade(preds, sim.keep, actions), repeats, device)
    cascade_s = median_seconds(lambda: run_cascade(preds, sim.keep, replay_actions(actions)), repeats, device)
    step_s = median_seconds(lambda: sim.serve(copy.copy(state), obs, policy), repeats, device)
    full_s = median_seconds(lambda: sim.step(copy.copy(state), policy), max(3, repeats // 4), device)

    rps = {
        "memory_bound": bandwidth / per_request,
        "lean_reference": batch / lean_s,
        "cascade": batch / cascade_s,
        "simulator_step": batch / step_s,
        "full_step_with_observation": batch / full_s,
    }
    return {
        "config": cfg.name,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "batch": batch,
        "cascade_sizes": list(cfg.cascade.sizes),
        "action_dims": list(cfg.cascade.action_dims),
        "bytes_read_per_request": per_request,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "requests_per_s": {k: round(v, 1) for k, v in rps.items()},
        "ratios": {
            "lean_reference_vs_memory_bound": rps["lean_reference"] / rps["memory_bound"],
            "cascade_vs_lean_reference": rps["cascade"] / rps["lean_reference"],
            "simulator_step_vs_lean_reference": rps["simulator_step"] / rps["lean_reference"],
            "full_step_vs_lean_reference": rps["full_step_with_observation"] / rps["lean_reference"],
        },
        "goals": {"cascade_vs_lean_reference": ">= 1.0", "simulator_step_vs_lean_reference": ">= 0.5"},
    }


def format_bench(result: dict[str, Any]) -> str:
    lines = [
        (
            f"bench sim: config {result['config']}, batch {result['batch']}, cascade {result['cascade_sizes']}, "
            f"{result['device']} ({result['torch_threads']} threads)"
        )
    ]
    for name, value in result["requests_per_s"].items():
        lines.append(f"  {name:28s} {value:14,.0f} requests/s")
    for name, value in result["ratios"].items():
        lines.append(f"  {name:36s} {value:6.3f}")
    return "\n".join(lines)
