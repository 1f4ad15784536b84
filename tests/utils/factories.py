"""Model factories a user could write, for the serving tests (``model.name: module:factory``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyUserNet(nn.Module):
    """Linear embed → fc1 → GELU → fc2 (residual) → masked mean → head; takes lengths."""

    def __init__(self, width: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(1, width)
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(self.act(self.fc1(h)))
        mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).unsqueeze(-1)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp_min(1))


class TinyEncoder(nn.Module):
    """A stock nn.TransformerEncoder without lengths: served with same-length batches only."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(1, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.inp(x)).mean(1))


def tiny_user(width: int = 8, hidden: int = 16) -> nn.Module:
    return TinyUserNet(width, hidden)


def tiny_encoder() -> nn.Module:
    return TinyEncoder()


def raising() -> nn.Module:
    raise ValueError("no weights for you")


def wrong_type() -> int:
    return 3
