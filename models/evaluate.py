"""Accuracy and executed-FLOPs of a gated network on a data split, for one gate setting."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from models.data import Split
from models.gate_config import GateSettings
from models.networks import GatedNetwork


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    flops_ratio: float  # executed MACs / dense MACs, mean over samples
    macs: float  # executed MACs per sample, mean
    dense_macs: float
    active_channel_ratio: float  # kept / total gated channels, mean over samples and layers
    samples: int
    gate_mode: str
    keep_ratio: float | None
    threshold: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.inference_mode()
def evaluate(
    model: GatedNetwork, split: Split, settings: GateSettings, batch_size: int = 500
) -> EvalResult:
    """Run ``model`` over ``split`` in eval mode (deterministic gates) and aggregate."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    ratios: list[torch.Tensor] = []
    macs: list[torch.Tensor] = []
    dense: list[torch.Tensor] = []
    active: list[torch.Tensor] = []
    widths = model.gated_widths()
    for start in range(0, len(split), batch_size):
        x = split.x[start : start + batch_size].to(device)
        y = split.y[start : start + batch_size].to(device)
        lengths = split.lengths[start : start + batch_size].to(device)
        out = model(x, lengths, settings)
        correct += int((out.logits.argmax(-1) == y).sum())
        ratios.append(out.flops_ratio.cpu())
        macs.append(out.macs.cpu())
        dense.append(out.dense_macs.cpu())
        per_layer = [out.kept[name].cpu() / width for name, width in widths.items()]
        active.append(torch.stack(per_layer, 1).mean(1))
    model.train(was_training)
    return EvalResult(
        accuracy=correct / len(split),
        flops_ratio=float(torch.cat(ratios).mean()),
        macs=float(torch.cat(macs).mean()),
        dense_macs=float(torch.cat(dense).mean()),
        active_channel_ratio=float(torch.cat(active).mean()),
        samples=len(split),
        gate_mode=settings.mode,
        keep_ratio=settings.keep_ratio,
        threshold=settings.threshold,
    )
