"""Export a statically pruned checkpoint: closed channels gone, predictor kept (SPEC §4).

The reference networks have one gated width per architecture (``model.hidden`` for conv,
``model.ffn`` for the transformer), so the export keeps, in every gated layer, the channels the
static keep policy leaves open and sets the shared width to the largest such count. A layer
that keeps fewer is padded with *closed* channels: zero weights and a gate parameter of −1e4,
whose static value is exactly 0 for both gate types, so they never run in static or dynamic
mode, and the sparse plan (:mod:`models.sparse`) drops them at compile time. The result is an
ordinary checkpoint directory that :func:`models.load_checkpoint` loads unchanged.

Kept channels keep their static gate values and their predictor rows, so the export serves
``static`` mode with the same outputs as the source, and ``dynamic`` mode with the same
outputs when exported without a keep policy (each layer keeps its statically open count).
Attention heads cannot shrink in this format (the head width is ``d_model // num_heads``):
closed heads stay stored and gated off; the sparse plan removes them at load.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch

from models.checkpoint import WEIGHTS_FILE, load_checkpoint, read_metadata, save_checkpoint
from models.gates import GateSettings
from models.networks import (
    GatedConvBlock,
    GatedConvNet,
    GatedEncoderLayer,
    GatedNetwork,
    GatedTransformer,
    build_network,
)
from models.sparse import static_keep_mask

CLOSED_GATE = -1.0e4  # σ(−1e4) is exactly 0 in float32: HardConcrete z = 0, sigmoid z = 0


@dataclass(frozen=True)
class ExportReport:
    """Sizes and per-request MACs (at ``length`` steps) of the source and the export."""

    source: str
    out: str
    length: int
    widths_before: dict[str, int]
    kept: dict[str, int]  # channels each layer keeps (the export pads up to the largest)
    width_after: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    dense_macs_before: float  # the unpruned source
    static_macs_before: float  # the source in static mode with the export's keep policy
    dense_macs_after: float  # the export in dense mode (padding channels are computed there)
    static_macs_after: float  # the export in static mode: equals static_macs_before

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _gated_tensors(model: GatedNetwork, i: int) -> tuple[str, dict[str, int]]:
    """Layer key in ``NetworkOutput.kept`` and {state_dict key: dim indexed by channel}."""
    if isinstance(model, GatedConvNet):
        p = f"blocks.{i}."
        gate = cast(GatedConvBlock, model.blocks[i]).gate
        keys = {p + "conv1.weight": 0, p + "conv1.bias": 0, p + "conv2.weight": 1}
        name = f"blocks.{i}"
    else:
        p = f"layers.{i}."
        gate = cast(GatedEncoderLayer, cast(GatedTransformer, model).layers[i]).ffn_gate
        keys = {p + "fc1.weight": 0, p + "fc1.bias": 0, p + "fc2.weight": 1}
        name = f"layers.{i}.ffn"
        p = p + "ffn_"
    for param, _ in gate.static_gate.named_parameters():
        keys[f"{p}gate.static_gate.{param}"] = 0
    if gate.predictor is not None:
        keys[f"{p}gate.predictor.fc2.weight"] = 0
        keys[f"{p}gate.predictor.fc2.bias"] = 0
    return name, keys


def _num_gated(model: GatedNetwork) -> int:
    if isinstance(model, GatedConvNet):
        return len(model.blocks)
    return len(cast(GatedTransformer, model).layers)


def prune_static(
    model: GatedNetwork, settings: GateSettings | None = None
) -> tuple[GatedNetwork, dict[str, int]]:
    """A smaller network with the static keep set of ``settings`` (default: every open
    channel), and the channel count each layer keeps."""
    if not isinstance(model, GatedConvNet | GatedTransformer):
        raise TypeError(f"export supports the built-in architectures, not {type(model)}")
    settings = settings or GateSettings("static")
    if settings.mode != "static":
        raise ValueError(f"export applies a static keep policy; got mode {settings.mode!r}")
    model.eval()
    state = model.state_dict()
    keeps: list[tuple[str, dict[str, int], torch.Tensor]] = []
    with torch.no_grad():
        for i in range(_num_gated(model)):
            name, keys = _gated_tensors(model, i)
            gate = (
                cast(GatedConvBlock, model.blocks[i]).gate
                if isinstance(model, GatedConvNet)
                else cast(GatedEncoderLayer, model.layers[i]).ffn_gate
            )
            rows = (static_keep_mask(gate, settings) > 0).nonzero().flatten()  # (k_i,)
            keeps.append((name, keys, rows))
    width = max(1, *(int(rows.numel()) for _, _, rows in keeps))
    m = model.config.model
    field = "hidden" if isinstance(model, GatedConvNet) else "ffn"
    cfg = model.config.model_copy(update={"model": m.model_copy(update={field: width})})
    new_state = dict(state)
    for _, keys, rows in keeps:
        for key, dim in keys.items():
            src = state[key].index_select(dim, rows)
            pad = list(src.shape)
            pad[dim] = width - rows.numel()
            fill = CLOSED_GATE if ".static_gate." in key else 0.0
            new_state[key] = torch.cat([src, src.new_full(pad, fill)], dim=dim)
    pruned = build_network(cfg).to(next(model.parameters()).device)
    pruned.load_state_dict(new_state)
    return pruned.eval(), {name: int(rows.numel()) for name, _, rows in keeps}


def _macs(model: GatedNetwork, settings: GateSettings, length: int) -> float:
    dev = next(model.parameters()).device
    x = torch.zeros(1, length, model.config.model.in_channels, device=dev)
    with torch.inference_mode():
        return float(model(x, torch.tensor([length], device=dev), settings).macs[0])


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    keep_ratio: float | None = None,
    threshold: float | None = None,
    length: int | None = None,
) -> ExportReport:
    """Load ``ckpt_dir``, prune statically and write the smaller checkpoint to ``out_dir``."""
    model = load_checkpoint(ckpt_dir)
    bucket = model.config.dynamic_pruning_config.bucket
    settings = GateSettings("static", keep_ratio, threshold, bucket=bucket)
    pruned, kept = prune_static(model, settings)
    save_checkpoint(
        pruned,
        out_dir,
        metadata={**read_metadata(ckpt_dir), "exported_from": str(ckpt_dir), "static_keep": kept},
    )
    seq = length or min(model.config.model.max_length, 128)
    return ExportReport(
        source=str(ckpt_dir),
        out=str(out_dir),
        length=seq,
        widths_before=model.gated_widths(),
        kept=kept,
        width_after=max(1, *kept.values()),
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in pruned.parameters()),
        bytes_before=(Path(ckpt_dir) / WEIGHTS_FILE).stat().st_size,
        bytes_after=(Path(out_dir) / WEIGHTS_FILE).stat().st_size,
        dense_macs_before=_macs(model, GateSettings("dense"), seq),
        static_macs_before=_macs(model, settings, seq),
        dense_macs_after=_macs(pruned, GateSettings("dense"), seq),
        static_macs_after=_macs(pruned, GateSettings("static", bucket=bucket), seq),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.export --checkpoint DIR --out DIR2 [--keep-ratio R]``: JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep-ratio", type=float, default=None)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--length", type=int, default=None, help="steps for the MAC counts")
    args = parser.parse_args(argv)
    report = export_checkpoint(
        args.checkpoint, args.out, args.keep_ratio, args.threshold, args.length
    )
    sys.stdout.write(json.dumps(report.as_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
