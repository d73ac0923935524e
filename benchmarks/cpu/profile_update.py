"""Where one UNEX-RL-CIC update spends its time: torch.profiler over 50 updates at batch 256 on configs/default.yaml,
with `unexrl bench train`'s setup (256 sessions of CEM + exploration, an actor step in every update), operators by
self CPU time, then the same time in a few groups. The breakdown in docs/benchmarks.md comes from this script.

    python benchmarks/cpu/profile_update.py             # the update as `unexrl train` runs it by default
    python benchmarks/cpu/profile_update.py --compile   # with train.compile (compiled once before the profile)
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from unexrl.bench.train import bench_agent, bench_replay
from unexrl.config import load_config

torch.set_num_threads(2)
cfg = load_config("configs/default.yaml")
buf, world = bench_replay(cfg)
g = torch.Generator().manual_seed(0)
agent = bench_agent(cfg, world, buf, g, "unexrl-cic", actor_start=0, compiled="--compile" in sys.argv[1:])
batch = buf.sample(256, g)
for _ in range(20):
    agent.update(batch)
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(50):
        agent.update(batch)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

GROUPS = {
    "matrix products (MLPs, ensemble, stage scores), forward and backward": ("mm", "addmm", "bmm", "baddbmm"),
    "embedding tables: bags forward and backward, sorting the rows looked up, row-wise Adagrad": (
        "_embedding_bag",
        "_embedding_bag_backward",
        "_embedding_bag_dense_backward",
        "_embedding_bag_sparse_backward",
        "_coalesce",
        "sort",
        "index_copy_",
    ),
    "top-k of the CIC cascade": ("topk",),
    "inductor's fused kernels (with --compile)": ("CompiledFxGraph",),
    "dense Adam": ("_fused_adam_",),
}
events = p.key_averages()
total = sum(e.self_cpu_time_total for e in events)
print(f"\n{total / 50 / 1000:.2f} ms of operator time per update")
grouped = 0.0
for name, ops in GROUPS.items():
    t = sum(
        e.self_cpu_time_total
        for e in events
        if e.key.removeprefix("aten::") in ops or any(e.key.startswith(f"## Call {op}") for op in ops)
    )
    grouped += t
    print(f"  {t / total:5.1%}  {name}")
print(
    f"  {1 - grouped / total:5.1%}  everything else (elementwise, reductions, copies, views, autograd bookkeeping)"
)
