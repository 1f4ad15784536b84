"""Multiply-accumulate counts of what a gated network actually executes.

Counts are per request (a request of length L costs the same whatever its batch mates), in
float64 so long sequences do not overflow. Only MACs of matmuls/convolutions and the predictor
are counted; element-wise work (norms, activations, gate multiplies) is ignored, as is usual.
"""

from __future__ import annotations

import torch


def conv1d_macs(
    length: torch.Tensor, c_in: float, c_out: torch.Tensor | float, k: int
) -> torch.Tensor:
    """Same-padded 1-D convolution over ``length`` steps: L · c_in · c_out · k."""
    return length.to(torch.float64) * c_in * c_out * k


def linear_macs(
    rows: torch.Tensor, d_in: torch.Tensor | float, d_out: torch.Tensor | float
) -> torch.Tensor:
    """A linear layer applied to ``rows`` vectors: rows · d_in · d_out."""
    return rows.to(torch.float64) * d_in * d_out


def attention_macs(
    length: torch.Tensor, heads: torch.Tensor | float, head_dim: int
) -> torch.Tensor:
    """Scores (Q·Kᵀ) plus the weighted sum (P·V): 2 · L² · heads · head_dim."""
    seq = length.to(torch.float64)
    return 2.0 * seq * seq * heads * head_dim


def flops_ratio(executed: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Executed MACs over dense MACs, per request."""
    return executed / dense.clamp_min(1.0)
