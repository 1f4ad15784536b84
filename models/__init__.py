"""Gated networks: configs, gates, architectures, training and checkpoints (torch only).

The service uses only what this module exports.
"""

from models.checkpoint import load_checkpoint, read_metadata, resolve_device, save_checkpoint
from models.config import GATE_MODES, GateMode, ModelConfig, load_config, parse_config
from models.errors import (
    ArchitectureError,
    CheckpointError,
    ConfigError,
    DeviceError,
    InvalidInputError,
    ModelError,
)
from models.export import export_checkpoint
from models.gates import GateSettings, settings_for
from models.networks import GatedNetwork, NetworkOutput, build_network
from models.sparse import SparsePlan, Workspace, compile_plan

__all__ = [
    "GATE_MODES",
    "ArchitectureError",
    "CheckpointError",
    "ConfigError",
    "DeviceError",
    "GateMode",
    "GateSettings",
    "GatedNetwork",
    "InvalidInputError",
    "ModelConfig",
    "ModelError",
    "NetworkOutput",
    "SparsePlan",
    "Workspace",
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
