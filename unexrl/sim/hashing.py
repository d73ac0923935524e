"""Counter-based random numbers: a value is a pure function of its key, not of the order it is drawn in.

The simulator keys every random draw by (seed, stream, session, step, slot, ...), so a request's pool, its
stage predictions and the user's response are the same whatever batch the request is simulated in. That makes
rollouts reproducible across batch sizes and lets the trainer and the server rebuild any logged request.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK = (1 << 62) - 1
_C1 = 0x3F58476D1CE4E5B9
_C2 = 0x14057B7EF767814F
_GOLDEN = 0x1E3779B97F4A7C15


def _mix(x: Tensor) -> Tensor:
    """A splitmix-style finaliser on 62-bit non-negative int64 (masking keeps shifts logical)."""
    x = x & _MASK
    x = ((x ^ (x >> 31)) * _C1) & _MASK
    x = ((x ^ (x >> 29)) * _C2) & _MASK
    return x ^ (x >> 32)


def hash_key(*parts: Tensor | int) -> Tensor:
    """Combine integer parts (tensors broadcast) into one well-mixed non-negative int64 key."""
    key: Tensor | None = None
    for part in parts:
        p = part if isinstance(part, Tensor) else torch.tensor(part, dtype=torch.int64)
        p = p.to(torch.int64)
        key = _mix(p + _GOLDEN) if key is None else _mix(key * 31 + p + _GOLDEN)
    if key is None:
        raise ValueError("hash_key needs at least one part")
    return key


def uniform(key: Tensor) -> Tensor:
    """Uniform float32 in (0, 1) from a key (23 bits, so the largest value stays below 1 in float32)."""
    return ((_mix(key) >> 39).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def uniform_pair(key: Tensor) -> tuple[Tensor, Tensor]:
    """Two independent uniforms in (0, 1) from one mix (two disjoint 23-bit fields)."""
    x = _mix(key)
    scale = 1.0 / (1 << 23)
    return ((x >> 39).to(torch.float32) + 0.5) * scale, (
        ((x >> 9) & 0x7FFFFF).to(torch.float32) + 0.5
    ) * scale


def normal(key: Tensor) -> Tensor:
    """Standard normal float32 from a key (Box-Muller over two derived uniforms)."""
    u1 = uniform(key)
    u2 = uniform(key ^ 0x2545F4914F6CDD1D)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
