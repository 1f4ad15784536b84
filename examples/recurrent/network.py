"""A user's own network: strided conv front end → GRU → residual MLP blocks → pooled head.

Plain PyTorch: nothing here knows about gates. ``gated train`` builds it through ``build`` (the
config's ``model.name: examples.recurrent.network:build``) and gates the hidden channels of
every MLP block with ``models.attach_gates``, which finds them on its own: each block's forward
calls ``fc1 → act → fc2``. The forward takes ``lengths`` and keeps padding out of its result
(the input's padding is zeroed before the conv, the GRU runs forward in time so padding after a
sequence never reaches its valid steps, the pool averages valid steps only), so the server may
batch requests of different lengths together; the gates learn each request's lengths after the
stride-2 conv from the conv's own length formula.

    python -c "from examples.recurrent.network import build; print(build())"
"""

from __future__ import annotations

import torch
from torch import nn


class MLPBlock(nn.Module):
    """x + fc2(act(fc1(norm(x)))): the FFN that gets gated."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class RecurrentClassifier(nn.Module):
    """Sequences (B, T, C) with lengths (B,) -> logits (B, classes)."""

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 64,
        hidden: int = 256,
        blocks: int = 2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.front = nn.Conv1d(in_channels, width, kernel_size=5, stride=2, padding=2)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.blocks = nn.ModuleList(MLPBlock(width, hidden) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        valid = (torch.arange(t, device=x.device)[None] < lengths[:, None]).unsqueeze(-1)
        h = self.front((x * valid).transpose(1, 2)).transpose(1, 2)  # (B, T/2, D)
        short = torch.div(lengths + 1, 2, rounding_mode="floor")  # the conv's length formula
        h, _ = self.rnn(torch.relu(h))
        for block in self.blocks:
            h = block(h)
        mask = (torch.arange(h.shape[1], device=x.device)[None] < short[:, None]).unsqueeze(-1)
        pooled = (self.norm(h) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.head(pooled)


def build(
    in_channels: int = 1, width: int = 64, hidden: int = 256, blocks: int = 2, num_classes: int = 10
) -> RecurrentClassifier:
    """The factory the config names (its ``model.args`` are these arguments)."""
    return RecurrentClassifier(in_channels, width, hidden, blocks, num_classes)
