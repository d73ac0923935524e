"""`unexrl traffic`: simulated users browse a running service over HTTP.

Sessions start as in the simulator (users drawn from the seed); every step each live session asks /recommend
for a page (the first without a session id: the service issues one, sent back from then on), the simulator's
user model answers the page the service returned (:meth:`Simulator.respond`), and the viewed items go back as
/feedback, with ``session_end`` when the user leaves. Bounded by a number of sessions and a wall-clock budget;
``concurrency`` sessions are in flight at once. Every request carries the service's bearer token. Given several
replicas' URLs, each session's calls go round-robin: with two, its pages alternate between them and every
feedback goes to the replica that did not serve the page (what a load balancer without affinity may do).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import torch

from unexrl.config import Config
from unexrl.serve.gateway import bearer
from unexrl.sim.env import Simulator


@dataclass
class TrafficReport:
    sessions_started: int = 0
    sessions_ended: int = 0
    requests: int = 0
    feedbacks: int = 0
    errors: int = 0
    watch_time_s: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _drive(
    urls: Sequence[str],
    token: str,
    sim: Simulator,
    seed: int,
    sessions: int,
    seconds: float,
    concurrency: int,
    report: TrafficReport,
) -> None:
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=url.rstrip("/"), headers=bearer(token), timeout=30.0, limits=limits
                )
            )
            for url in urls
        ]

        def client(row: int, step: int, feedback: bool = False) -> httpx.AsyncClient:
            """Round-robin: the session's page ``step`` on replica row + step, its feedback on the next one."""
            return clients[(row + step + feedback) % len(clients)]

        first = 0
        while first < sessions and time.monotonic() < deadline:
            ids = torch.arange(first, min(first + concurrency, sessions))
            first += len(ids)
            report.sessions_started += len(ids)
            state = sim.start(seed, ids)
            served_session: dict[int, int] = {}  # row -> the session id the service issued
            while bool(state.alive.any()) and time.monotonic() < deadline:
                live = state.alive.nonzero().squeeze(1).tolist()
                pages = await asyncio.gather(
                    *(
                        client(i, int(state.step[i])).post(
                            "/recommend",
                            json={"user_id": int(state.user[i])}
                            | ({"context": {"session_id": served_session[i]}} if i in served_session else {}),
                        )
                        for i in live
                    )
                )
                report.requests += len(live)
                items = torch.zeros(len(ids), sim.cfg.cascade.page_size, dtype=torch.long)
                request_ids: dict[int, str] = {}
                for i, reply in zip(live, pages):
                    if reply.status_code != 200:
                        report.errors += 1
                        state.alive[i] = False
                        continue
                    body = reply.json()
                    items[i] = torch.tensor(body["items"])
                    request_ids[i] = body["request_id"]
                    served_session[i] = body["session_id"]
                response, reward, _, done = sim.respond(state, items)
                report.watch_time_s += float(reward.sum())
                answers = await asyncio.gather(
                    *(
                        client(i, int(state.step[i]) - 1, feedback=True).post(
                            "/feedback",
                            json={
                                "request_id": rid,
                                "session_id": served_session[i],
                                "items": [
                                    {
                                        "item_id": int(items[i, k]),
                                        "watch_time_s": float(response.watch_time[i, k]),
                                        "click": bool(response.click[i, k]),
                                        "like": bool(response.like[i, k]),
                                    }
                                    for k in range(items.shape[1])
                                    if response.viewed[i, k]
                                ],
                                "session_end": bool(done[i]),
                            },
                        )
                        for i, rid in request_ids.items()
                    )
                )
                report.feedbacks += len(answers)
                report.errors += sum(a.status_code != 200 for a in answers)
                report.sessions_ended += int(done[list(request_ids)].sum()) if request_ids else 0


def run_traffic(
    cfg: Config,
    url: str | Sequence[str],
    token: str,
    *,
    sessions: int,
    seconds: float,
    concurrency: int = 8,
    seed: int | None = None,
) -> TrafficReport:
    """Drive ``url`` (API token ``token``; several URLs: replicas, round-robin) with up to ``sessions`` simulated
    sessions for at most ``seconds``.

    The config must describe the world the served policy was trained in (same ``seeds.world`` and sizes),
    so that the users' responses and the service's item ids refer to the same catalogue.
    """
    if sessions < 1 or seconds <= 0 or concurrency < 1:
        raise ValueError("traffic needs sessions >= 1, seconds > 0 and concurrency >= 1")
    sim = Simulator(cfg)
    report = TrafficReport()
    start = time.monotonic()
    asyncio.run(
        _drive(
            [url] if isinstance(url, str) else list(url),
            token,
            sim,
            seed if seed is not None else cfg.seeds.evaluation[0],
            sessions,
            seconds,
            concurrency,
            report,
        )
    )
    report.seconds = time.monotonic() - start
    return report
