"""Gated networks: configs, gates, gated layers, networks, plans, training and checkpoints.

The service uses only what this module exports. Names load lazily (PEP 562): importing
``models.gate_config`` (the gate configuration type, pydantic only) does not import torch, so
torch-free code such as the wire protocol can validate gate parameters.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "GATE_MODES": "models.gate_config",
    "GATE_PARAMETERS": "models.gate_config",
    "GateMode": "models.gate_config",
    "GateSettings": "models.gate_config",
    "ArchitectureError": "models.errors",
    "CheckpointError": "models.errors",
    "ConfigError": "models.errors",
    "DeviceError": "models.errors",
    "InvalidInputError": "models.errors",
    "ModelError": "models.errors",
    "ModelConfig": "models.config",
    "ModelContract": "models.contract",
    "TensorSpec": "models.contract",
    "load_config": "models.config",
    "parse_config": "models.config",
    "load_checkpoint": "models.checkpoint",
    "read_metadata": "models.checkpoint",
    "resolve_device": "models.checkpoint",
    "save_checkpoint": "models.checkpoint",
    "export_checkpoint": "models.export",
    "settings_for": "models.gates",
    "GatedNetwork": "models.networks",
    "NetworkOutput": "models.networks",
    "attach_gates": "models.networks",
    "build_network": "models.networks",
    "GatedFFN": "models.layers",
    "HeadGatedAttention": "models.layers",
    "CalibrationCache": "models.sparse",
    "SparsePlan": "models.sparse",
    "Workspace": "models.sparse",
    "compile_plan": "models.sparse",
}

__all__ = [
    "ArchitectureError",
    "CalibrationCache",
    "CheckpointError",
    "ConfigError",
    "DeviceError",
    "GATE_MODES",
    "GATE_PARAMETERS",
    "GateMode",
    "GateSettings",
    "GatedFFN",
    "GatedNetwork",
    "HeadGatedAttention",
    "InvalidInputError",
    "ModelConfig",
    "ModelContract",
    "ModelError",
    "NetworkOutput",
    "SparsePlan",
    "TensorSpec",
    "Workspace",
    "attach_gates",
    "build_network",
    "compile_plan",
    "export_checkpoint",
    "load_checkpoint",
    "load_config",
    "parse_config",
    "read_metadata",
    "resolve_device",
    "save_checkpoint",
    "settings_for",
]

if TYPE_CHECKING:
    from models.checkpoint import load_checkpoint, read_metadata, resolve_device, save_checkpoint
    from models.config import ModelConfig, load_config, parse_config
    from models.contract import ModelContract, TensorSpec
    from models.errors import (
        ArchitectureError,
        CheckpointError,
        ConfigError,
        DeviceError,
        InvalidInputError,
        ModelError,
    )
    from models.export import export_checkpoint
    from models.gate_config import GATE_MODES, GATE_PARAMETERS, GateMode, GateSettings
    from models.gates import settings_for
    from models.layers import GatedFFN, HeadGatedAttention
    from models.networks import GatedNetwork, NetworkOutput, attach_gates, build_network
    from models.sparse import CalibrationCache, SparsePlan, Workspace, compile_plan


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
