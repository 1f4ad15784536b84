"""SE-style input predictor: per-request channel gates from the statistics of a block's input.

Hu et al., "Squeeze-and-Excitation Networks" (2018); Gao et al., "Feature Boosting and
Suppression" (2019). Differences from SE (docs/gates.md §2):

- the squeeze is padding-aware: statistics use only each request's valid time steps, so a
  request's gates do not depend on what it is batched with;
- the squeeze may add the population std to the mean (``use_std``);
- with ``use_global_pool: false`` the squeeze is a centred window per time step and the gates are
  per time step, (B, T, C_out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import PredictorConfig

_VAR_EPS = 1e-5


def time_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool mask of valid time steps."""
    steps = torch.arange(max_len, device=lengths.device)
    return steps.unsqueeze(0) < lengths.unsqueeze(1)


class InputPredictor(nn.Module):
    """Predict sigmoid gates (B, C_out) or (B, T, C_out) from an input (B, T, C_in)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cfg: PredictorConfig,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_global_pool = cfg.use_global_pool
        self.use_std = cfg.use_std
        self.window = cfg.window
        self.features = in_channels * (2 if cfg.use_std else 1)
        self.hidden = max(self.features // cfg.reduction_ratio, cfg.min_hidden)
        self.fc1 = nn.Linear(self.features, self.hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(self.hidden, out_channels, device=device, dtype=dtype)

    def _global_stats(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        count = m.sum(1).clamp_min(1.0)  # (B, 1)
        mean = (x * m).sum(1) / count  # (B, C)
        if not self.use_std:
            return mean
        var = (((x - mean.unsqueeze(1)) * m) ** 2).sum(1) / count
        return torch.cat([mean, torch.sqrt(var + _VAR_EPS)], dim=-1)  # (B, 2C)

    def _window_stats(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Box filter over a centred window via cumulative sums; padded steps contribute nothing
        # to the sums or the counts, so statistics near the end of a short request match the
        # same request served alone.
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        half = self.window // 2
        xm = x * m

        def box(v: torch.Tensor) -> torch.Tensor:  # (B, T, K) -> (B, T, K)
            padded = F.pad(v, (0, 0, half, self.window - 1 - half))
            c = F.pad(padded.cumsum(1), (0, 0, 1, 0))  # c[t] = sum of padded[:t]
            return c[:, self.window :] - c[:, : -self.window]

        count = box(m).clamp_min(1.0)
        mean = box(xm) / count  # (B, T, C)
        if not self.use_std:
            return mean
        var = (box(xm * x) / count - mean**2).clamp_min(0.0)
        return torch.cat([mean, torch.sqrt(var + _VAR_EPS)], dim=-1)  # (B, T, 2C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C_in), mask (B, T) bool -> gates in (0, 1): (B, C_out) or (B, T, C_out)."""
        stats = self._global_stats(x, mask) if self.use_global_pool else self._window_stats(x, mask)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(stats))))

    def macs(self, length: torch.Tensor) -> torch.Tensor:
        """Multiply-accumulates for requests of the given lengths (B,) -> (B,) float."""
        stat_passes = 2 if self.use_std else 1
        squeeze = stat_passes * self.in_channels * length.to(torch.float64)
        mlp = float(self.features * self.hidden + self.hidden * self.out_channels)
        if self.use_global_pool:
            return squeeze + mlp
        return squeeze + mlp * length.to(torch.float64)
