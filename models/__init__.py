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
from models.gates import GateSettings, settings_for
from models.networks import GatedNetwork, NetworkOutput, build_network

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
    "build_network",
    "load_checkpoint",
    "load_config",
    "parse_config",
    "read_metadata",
    "resolve_device",
    "save_checkpoint",
    "settings_for",
]
