"""Buffers the plans reuse across calls."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class Workspace:
    """Buffers reused across calls, one per role (a plan runs on one thread at a time).

    The CPU allocator hands large blocks back to the OS, so a fresh (B, T, H) activation or a
    batch of gathered weights page-faults on every call: on small VMs that costs more than the
    gather itself. Layers run one after another, so a role's buffer is shared by all layers
    (roles whose tensors outlive a layer call carry the layer's name); plans that never run at
    the same time (a server's, on its one compute thread) may share one workspace, which bounds
    the memory of many plans by that of the largest batch.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.device != like.device or buf.dtype != like.dtype:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:n].view(*shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())
