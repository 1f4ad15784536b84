"""Gated networks for sequences (B, T, C) with per-request lengths.

Two architectures ship, found by name in :data:`ARCHITECTURES`:

- ``conv`` (default): a residual 1-D CNN; each block is LN → conv k (C→H) → GELU → gate(H) →
  conv 1 (H→C), with the H hidden channels gated statically and per request.
- ``transformer``: a pre-LN encoder whose FFN intermediate channels are gated statically and per
  request and whose attention heads are gated statically.

A user's own network is found by import path ``package.module:factory`` (see
:func:`build_network`). Every network returns, per request, the channels each gated layer kept
and the MACs it executed, so FLOPs are counted from what ran, not from what was configured.

These modules are the reference (masked) implementation used for training and as the ground
truth of the sparse execution plans in ``models/sparse.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.errors import ArchitectureError, InvalidInputError
from models.flops import attention_macs, conv1d_macs, linear_macs
from models.gates import DynamicStructuredGate, GateSettings, StaticGate, make_static_gate
from models.predictor import time_mask


@dataclass
class NetworkOutput:
    """Result of one forward pass; every tensor has the batch as its first dimension."""

    logits: torch.Tensor  # (B, classes)
    kept: dict[str, torch.Tensor]  # layer name -> (B,) channels (or heads) kept
    macs: torch.Tensor  # (B,) float64, executed
    dense_macs: torch.Tensor  # (B,) float64, the unpruned network on the same lengths

    @property
    def flops_ratio(self) -> torch.Tensor:
        return self.macs / self.dense_macs.clamp_min(1.0)


class GatedNetwork(nn.Module):
    """Base class: subclasses implement ``forward(x, lengths, settings) -> NetworkOutput``."""

    config: ModelConfig

    def dynamic_gates(self) -> Iterator[tuple[str, DynamicStructuredGate]]:
        for name, module in self.named_modules():
            if isinstance(module, DynamicStructuredGate):
                yield name, module

    def static_gates(self) -> Iterator[StaticGate]:
        """Every static gate (channels and heads): the structures the L0 objective counts."""
        for module in self.modules():
            if isinstance(module, StaticGate):
                yield module

    def gated_widths(self) -> dict[str, int]:
        """Key of each dynamically gated layer in ``NetworkOutput.kept`` -> its channel count."""
        return {name: gate.n for name, gate in self.dynamic_gates()}

    def count_macs(
        self, lengths: torch.Tensor, kept: dict[str, torch.Tensor], with_predictor: bool
    ) -> torch.Tensor:
        """MACs per request (B,) float64 for per-layer kept counts keyed as in NetworkOutput."""
        raise NotImplementedError

    def predictor_parameters(self) -> Iterator[nn.Parameter]:
        for _, gate in self.dynamic_gates():
            if gate.predictor is not None:
                yield from gate.predictor.parameters()

    def check_input(self, x: torch.Tensor, lengths: torch.Tensor) -> None:
        cfg = self.config.model
        if x.dim() != 3 or x.shape[2] != cfg.in_channels:
            raise InvalidInputError(
                f"input must have shape [batch, T, {cfg.in_channels}], got {list(x.shape)}"
            )
        if x.shape[1] > cfg.max_length:
            raise InvalidInputError(
                f"sequence length {x.shape[1]} exceeds the model's max_length {cfg.max_length}"
            )
        if lengths.shape != (x.shape[0],):
            raise InvalidInputError(f"lengths must have shape [{x.shape[0]}]")
        if x.shape[0] and (int(lengths.min()) < 1 or int(lengths.max()) > x.shape[1]):
            raise InvalidInputError(f"lengths must be in [1, {x.shape[1]}] (the padded T)")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, C)


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each time step."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        del mask
        return super().forward(x)


class _SequenceNorm(nn.Module):
    """Normalise each request over its valid steps and all channels, then a per-channel affine.

    Like BatchNorm it keeps the relative amplitude of time steps (LayerNorm per step does not),
    like LayerNorm it has no running statistics: the same in training and inference, whatever
    the mode or the batch mates.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        count = m.sum((1, 2), keepdim=True).clamp_min(1.0) * x.shape[-1]
        mean = (x * m).sum((1, 2), keepdim=True) / count  # (B, 1, 1)
        var = (((x - mean) * m) ** 2).sum((1, 2), keepdim=True) / count
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class _BatchNorm(nn.BatchNorm1d):
    """BatchNorm over (B, T, C) inputs."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        del mask
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


_NORMS: dict[str, type[nn.Module]] = {
    "batch": _BatchNorm,
    "layer": _ChannelLayerNorm,
    "sequence": _SequenceNorm,
}


class GatedConvBlock(nn.Module):
    """LN → conv k (C→H) → GELU → gate(H) → conv 1 (H→C), residual; padding stays zero."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.model
        self.channels, self.hidden, self.kernel_size = m.channels, m.hidden, m.kernel_size
        self.norm = _NORMS[m.norm](m.channels)
        self.conv1 = nn.Conv1d(m.channels, m.hidden, m.kernel_size, padding=m.kernel_size // 2)
        self.conv2 = nn.Conv1d(m.hidden, m.channels, 1)
        self.gate = DynamicStructuredGate(m.hidden, m.channels, cfg)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, settings: GateSettings
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), mask (B, T) -> (B, T, C), kept (B,)."""
        m = mask.unsqueeze(-1).to(x.dtype)
        h = self.norm(x, mask) * m  # (B, T, C); padding is zero, as the conv's own padding
        gate, kept = self.gate(h, mask, settings)
        h = F.gelu(self.conv1(h.transpose(1, 2))).transpose(1, 2)  # (B, T, H)
        if gate is not None:
            h = h * gate
        y = self.conv2(h.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        return (x + y) * m, kept

    def macs(self, length: torch.Tensor, kept: torch.Tensor, with_predictor: bool) -> torch.Tensor:
        out = conv1d_macs(length, self.channels, kept, self.kernel_size)
        out = out + conv1d_macs(length, 1, kept * self.channels, 1)
        if with_predictor and self.gate.predictor is not None:
            out = out + self.gate.predictor.macs(length)
        return out


class GatedConvNet(GatedNetwork):
    """Residual 1-D CNN with gated hidden channels (the default architecture)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        m = cfg.model
        self.stem = nn.Conv1d(m.in_channels, m.channels, m.kernel_size, padding=m.kernel_size // 2)
        self.blocks = nn.ModuleList(GatedConvBlock(cfg) for _ in range(m.num_blocks))
        self.head = nn.Linear(m.channels, m.num_classes)

    def gated_widths(self) -> dict[str, int]:
        return {f"blocks.{i}": self.config.model.hidden for i in range(len(self.blocks))}

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, settings: GateSettings
    ) -> NetworkOutput:
        """x (B, T, C_in), lengths (B,) -> logits and executed MACs."""
        self.check_input(x, lengths)
        m = self.config.model
        mask = time_mask(lengths, x.shape[1])  # (B, T)
        mf = mask.unsqueeze(-1).to(x.dtype)
        h = self.stem((x * mf).transpose(1, 2)).transpose(1, 2) * mf  # (B, T, C)
        kept: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            h, kept[f"blocks.{i}"] = block(h, mask, settings)
        logits = self.head(_masked_mean(h, mask))
        macs = self.count_macs(lengths, kept, settings.mode == "dynamic")
        full = {name: torch.full_like(lengths, m.hidden) for name in kept}
        return NetworkOutput(logits, kept, macs, self.count_macs(lengths, full, False))

    def count_macs(
        self, lengths: torch.Tensor, kept: dict[str, torch.Tensor], with_predictor: bool
    ) -> torch.Tensor:
        m = self.config.model
        total = conv1d_macs(lengths, m.in_channels, m.channels, m.kernel_size)
        total = total + linear_macs(torch.ones_like(lengths), m.channels, m.num_classes)
        for i, block in enumerate(cast(list[GatedConvBlock], self.blocks)):
            total = total + block.macs(
                lengths, kept[f"blocks.{i}"].to(torch.float64), with_predictor
            )
        return total


class GatedEncoderLayer(nn.Module):
    """Pre-LN transformer layer: statically gated heads, statically+dynamically gated FFN."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.model
        self.d_model, self.ffn_dim, self.num_heads = m.d_model, m.ffn, m.num_heads
        self.head_dim = m.d_model // m.num_heads
        self.norm1 = nn.LayerNorm(m.d_model)
        self.qkv = nn.Linear(m.d_model, 3 * m.d_model)
        self.proj = nn.Linear(m.d_model, m.d_model)
        self.head_gate = make_static_gate(m.num_heads, cfg)
        self.norm2 = nn.LayerNorm(m.d_model)
        self.fc1 = nn.Linear(m.d_model, m.ffn)  # weight (H, D): kept rows are contiguous
        self.fc2 = nn.Linear(m.ffn, m.d_model)
        self.ffn_gate = DynamicStructuredGate(m.ffn, m.d_model, cfg)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, settings: GateSettings
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (B, T, D), kept heads (B,), kept FFN channels (B,)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, T): keys of padding are never attended
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        )  # (B, nh, T, hd)
        if settings.mode == "dense":
            heads = torch.full((b,), float(self.num_heads), device=x.device)
        else:
            z = self.head_gate()  # (nh,)
            a = a * z.view(1, -1, 1, 1)
            heads = (z > 0).sum().float().expand(b)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))

        f = self.norm2(x)
        gate, kept = self.ffn_gate(f, mask, settings)
        h = F.gelu(self.fc1(f))  # (B, T, H)
        if gate is not None:
            h = h * gate
        x = x + self.fc2(h)
        return x, heads, kept

    def macs(
        self, length: torch.Tensor, heads: torch.Tensor, kept: torch.Tensor, with_predictor: bool
    ) -> torch.Tensor:
        width = heads * self.head_dim  # attention width actually computed
        out = linear_macs(length, self.d_model, 3 * width)
        out = out + attention_macs(length, heads, self.head_dim)
        out = out + linear_macs(length, width, self.d_model)
        out = out + linear_macs(length, self.d_model, 2 * kept)
        if with_predictor and self.ffn_gate.predictor is not None:
            out = out + self.ffn_gate.predictor.macs(length)
        return out


class GatedTransformer(GatedNetwork):
    """Transformer encoder classifier with gated FFN channels and attention heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        m = cfg.model
        # A convolutional stem gives the tokens local context; a per-step linear embedding of
        # MNIST-1D's scalar samples leaves attention to rebuild every local feature (~0.7 acc).
        self.embed = nn.Conv1d(m.in_channels, m.d_model, m.kernel_size, padding=m.kernel_size // 2)
        self.pos = nn.Parameter(torch.randn(m.max_length, m.d_model) * 0.02)
        self.layers = nn.ModuleList(GatedEncoderLayer(cfg) for _ in range(m.num_layers))
        self.norm = nn.LayerNorm(m.d_model)
        self.head = nn.Linear(m.d_model, m.num_classes)

    def gated_widths(self) -> dict[str, int]:
        return {f"layers.{i}.ffn": self.config.model.ffn for i in range(len(self.layers))}

    def embed_tokens(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C_in), mask (B, T) -> tokens (B, T, D) with positions; padding zeroed first."""
        mf = mask.unsqueeze(-1).to(x.dtype)
        h: torch.Tensor = self.embed((x * mf).transpose(1, 2)).transpose(1, 2)  # (B, T, D)
        return h + self.pos[: x.shape[1]]

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, settings: GateSettings
    ) -> NetworkOutput:
        self.check_input(x, lengths)
        m = self.config.model
        mask = time_mask(lengths, x.shape[1])
        h = self.embed_tokens(x, mask)  # (B, T, D)
        kept: dict[str, torch.Tensor] = {}
        heads: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            h, heads[f"layers.{i}.heads"], kept[f"layers.{i}.ffn"] = layer(h, mask, settings)
        logits = self.head(_masked_mean(self.norm(h), mask))
        everything = {**heads, **kept}
        macs = self.count_macs(lengths, everything, settings.mode == "dynamic")
        full = {
            name: torch.full_like(lengths, m.num_heads if name.endswith(".heads") else m.ffn)
            for name in everything
        }
        return NetworkOutput(logits, everything, macs, self.count_macs(lengths, full, False))

    def count_macs(
        self, lengths: torch.Tensor, kept: dict[str, torch.Tensor], with_predictor: bool
    ) -> torch.Tensor:
        m = self.config.model
        total = conv1d_macs(lengths, m.in_channels, m.d_model, m.kernel_size)
        total = total + linear_macs(torch.ones_like(lengths), m.d_model, m.num_classes)
        for i, layer in enumerate(cast(list[GatedEncoderLayer], self.layers)):
            total = total + layer.macs(
                lengths,
                kept[f"layers.{i}.heads"].to(torch.float64),
                kept[f"layers.{i}.ffn"].to(torch.float64),
                with_predictor,
            )
        return total


NetworkFactory = Callable[[ModelConfig], GatedNetwork]

ARCHITECTURES: dict[str, NetworkFactory] = {
    "conv": GatedConvNet,
    "transformer": GatedTransformer,
}


def build_network(cfg: ModelConfig) -> GatedNetwork:
    """Build the network named by ``cfg.model.name``: a registered name or ``module:factory``."""
    name = cfg.model.name
    if name in ARCHITECTURES:
        return ARCHITECTURES[name](cfg)
    if ":" not in name:
        raise ArchitectureError(
            f"model.name: unknown architecture {name!r}; use one of "
            f"{sorted(ARCHITECTURES)} or an import path 'package.module:factory'"
        )
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ArchitectureError(f"model.name: cannot import {name!r}: {err}") from None
    net = factory(cfg)
    if not isinstance(net, GatedNetwork):
        raise ArchitectureError(
            f"model.name: {name!r} returned {type(net).__name__}, not a models.GatedNetwork"
        )
    return net
