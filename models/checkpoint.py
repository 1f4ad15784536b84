"""Checkpoints are directories: ``config.yaml`` (a ModelConfig) + ``model.safetensors``.

Every parameter and buffer is saved (HardConcrete temperatures and BatchNorm statistics
included). Loading validates the config, then the tensor names and shapes, and reports every
mismatch at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.config import ModelConfig, load_config
from models.errors import CheckpointError, DeviceError
from models.networks import GatedNetwork, build_network

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device cuda requested but no CUDA device is available")
    return dev


def save_checkpoint(
    model: GatedNetwork, out_dir: str | Path, metadata: dict[str, object] | None = None
) -> Path:
    """Write ``model`` (and its config) to ``out_dir``; ``metadata`` goes into the weights file,
    with the network's MAC count (``mac_model``, fitted now if it was not), which loading
    reuses."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(model.config.to_yaml())
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    was_training = model.training
    model.eval()
    try:
        macs = model.mac_model.to_dict(model)
    finally:
        model.train(was_training)
    meta = {k: json.dumps(v) for k, v in {**(metadata or {}), "mac_model": macs}.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata=meta)
    # safetensors writes 0600; a checkpoint is read by other users (a container's non-root one).
    (out / WEIGHTS_FILE).chmod(0o644)
    return out


def read_metadata(ckpt_dir: str | Path) -> dict[str, object]:
    """Training metadata stored beside the weights (empty for foreign checkpoints)."""
    from safetensors import safe_open

    with safe_open(str(Path(ckpt_dir) / WEIGHTS_FILE), framework="pt") as f:
        raw = f.metadata() or {}
    return {k: json.loads(v) for k, v in raw.items()}


def _metadata(path: Path) -> dict[str, object]:
    try:
        return read_metadata(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: unreadable: {err}") from None


def load_checkpoint(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> GatedNetwork:
    """Build the network described by ``config.yaml`` and load its weights, in eval mode."""
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name}")
    cfg: ModelConfig = load_config(path / CONFIG_FILE)
    model = build_network(cfg)
    meta = _metadata(path)
    widths = meta.get("pruned_widths")
    if isinstance(widths, dict):
        model.apply_widths({str(k): int(v) for k, v in widths.items()})
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: unreadable: {err}") from None
    expected = model.state_dict()
    problems = [f"missing tensor {k}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in expected]
    problems += [
        f"{k}: shape {list(tensors[k].shape)} in file, {list(v.shape)} expected by config"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        raise CheckpointError(
            f"{path}: weights do not match config.yaml: "
            + "; ".join(problems[:10])
            + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
        )
    model.load_state_dict(tensors)
    from models.flops import MacModel

    recorded = MacModel.from_dict(meta.get("mac_model"), model)
    if recorded is not None:  # counted when it was saved: no FLOP counter at load
        model.__dict__["_mac_model"] = recorded
    return model.to(device).eval()
