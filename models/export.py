"""Export a statically pruned checkpoint: closed channels gone, predictor kept (docs/gates.md §4).

Works for any gated network: in every gated FFN the channels the static keep policy leaves
open are kept (their input-projection rows, output-projection columns, static gate parameters
and predictor output rows), the others removed, so each layer may end with its own width. The
checkpoint records how to rebuild the module: the config builds it as usual (the factory, for
a user's network), then the recorded widths (``pruned_widths`` in the weights file's
metadata, layer name -> channels) are applied before the weights load.

Kept channels keep their static gate values and their predictor rows, so the export serves
``static`` mode with the same outputs as the source, and ``dynamic`` mode with the same
outputs when exported without a keep policy (each layer keeps its statically open count).
Attention heads are not shrunk (their width is ``d_model // num_heads``): closed heads stay
stored and gated off; the sparse plan removes them at load.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.checkpoint import WEIGHTS_FILE, load_checkpoint, read_metadata, save_checkpoint
from models.gate_config import GateSettings
from models.layers import GatedFFN
from models.networks import GatedNetwork
from models.sparse.executors import static_keep_mask


@dataclass(frozen=True)
class ExportReport:
    """Sizes and per-request MACs (at ``length`` steps) of the source and the export."""

    source: str
    out: str
    length: int
    widths_before: dict[str, int]
    kept: dict[str, int]  # channels each layer keeps
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    dense_macs_before: float  # the unpruned source
    static_macs_before: float  # the source in static mode with the export's keep policy
    dense_macs_after: float  # the export in dense mode
    static_macs_after: float  # the export in static mode: equals static_macs_before

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def prune_static(
    model: GatedNetwork, settings: GateSettings | None = None
) -> tuple[GatedNetwork, dict[str, int]]:
    """The network with the static keep set of ``settings`` (default: every open channel)
    applied in place, and the channel count each layer keeps."""
    settings = settings or GateSettings("static")
    if settings.mode != "static":
        raise ValueError(f"export applies a static keep policy; got mode {settings.mode!r}")
    model.eval()
    kept: dict[str, int] = {}
    with torch.no_grad():
        for layer in model.gated():
            if not isinstance(layer, GatedFFN):
                continue
            rows = (static_keep_mask(layer, settings) > 0).nonzero().flatten()
            layer.select_channels(rows)
            kept[layer.name] = int(rows.numel())
    model.__dict__.pop("_mac_model", None)
    model.__dict__.pop("_statics", None)
    return model, kept


def _macs(model: GatedNetwork, settings: GateSettings, length: int) -> float:
    x, lengths = model.example_input(length)
    with torch.inference_mode():
        return float(model(x, lengths, settings).macs[0])


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
    settings = GateSettings("static", keep_ratio=keep_ratio, threshold=threshold, bucket=bucket)
    # A fixed-shape input (an image) has one length, its max_length.
    seq = length or model.fixed_length or min(model.config.model.max_length, 128)
    widths_before = model.gated_widths()
    params_before = sum(p.numel() for p in model.parameters())
    dense_before = _macs(model, GateSettings("dense"), seq)
    static_before = _macs(model, settings, seq)
    pruned, kept = prune_static(model, settings)
    meta = {**read_metadata(ckpt_dir), "exported_from": str(ckpt_dir), "pruned_widths": kept}
    save_checkpoint(pruned, out_dir, metadata=meta)
    return ExportReport(
        source=str(ckpt_dir),
        out=str(out_dir),
        length=seq,
        widths_before=widths_before,
        kept=kept,
        params_before=params_before,
        params_after=sum(p.numel() for p in pruned.parameters()),
        bytes_before=(Path(ckpt_dir) / WEIGHTS_FILE).stat().st_size,
        bytes_after=(Path(out_dir) / WEIGHTS_FILE).stat().st_size,
        dense_macs_before=dense_before,
        static_macs_before=static_before,
        dense_macs_after=_macs(pruned, GateSettings("dense"), seq),
        static_macs_after=_macs(pruned, GateSettings("static", bucket=bucket), seq),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``gated export --checkpoint DIR --out DIR2 [--keep-ratio R]``: JSON report."""
    parser = argparse.ArgumentParser(prog="gated export", description=__doc__.splitlines()[0])
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
