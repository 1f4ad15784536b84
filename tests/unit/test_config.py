"""Model config: the guide's YAML loads verbatim; bad configs fail with the key, value and range."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from models.config import ModelConfig, load_config, parse_config
from models.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SEED_YAML = textwrap.dedent(
    """\
    # Enable dynamic pruning
    use_dynamic_pruning: true

    # Dynamic pruning configuration
    dynamic_pruning_config:
      gate_type: "hardconcrete"           # Static gate type
      dynamic_weight: 0.5                 # Balance between static and dynamic
      use_input_gating: true              # Enable input-dependent gating
      predictor_config:
        reduction_ratio: 16               # SE-style bottleneck compression
        use_global_pool: true             # Global pooling for statistics
        use_std: true                     # Include standard deviation

    # Training configuration
    dynamic_l1_weight: 0.001              # L1 regularization weight
    dynamic_mode: true                    # Enable dynamic mode during training

    # HardConcrete configuration (for static gates)
    init_mean: 0.01
    temperature: 1.0
    min_temperature: 0.1
    temperature_decay: 0.95
    temperature_decay_freq: 100
    """
)


def test_seed_yaml_loads_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_YAML)
    cfg = load_config(path)
    dp = cfg.dynamic_pruning_config
    assert cfg.use_dynamic_pruning is True
    assert dp.gate_type == "hardconcrete"
    assert dp.dynamic_weight == 0.5
    assert dp.use_input_gating is True
    assert dp.predictor_config.reduction_ratio == 16
    assert dp.predictor_config.use_global_pool and dp.predictor_config.use_std
    assert cfg.dynamic_l1_weight == 0.001 and cfg.dynamic_mode is True
    assert (cfg.init_mean, cfg.temperature, cfg.min_temperature) == (0.01, 1.0, 0.1)
    assert (cfg.temperature_decay, cfg.temperature_decay_freq) == (0.95, 100)


def test_defaults_are_the_guides() -> None:
    cfg = ModelConfig()
    assert cfg.dynamic_pruning_config.dynamic_weight == 0.5
    assert cfg.dynamic_pruning_config.predictor_config.reduction_ratio == 16
    assert cfg.dynamic_l1_weight == 0.001 and cfg.dynamic_mode
    assert cfg.model.name == "conv"


def test_shipped_training_configs_load() -> None:
    configs = sorted((REPO / "models" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def _with(path: str, value: object) -> dict:
    data = yaml.safe_load(SEED_YAML)
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return data


BAD = [
    ("dynamic_pruning_config.gate_typo", "hardconcrete", "unknown key"),
    ("dynamic_pruning_config.gate_type", "relu", "'hardconcrete' or 'sigmoid'"),
    ("dynamic_pruning_config.dynamic_weight", 1.5, "allowed: [0, 1]"),
    ("dynamic_pruning_config.dynamic_weight", -0.1, "allowed: [0, 1]"),
    ("dynamic_pruning_config.use_input_gating", "maybe", "boolean"),
    ("dynamic_pruning_config.predictor_config.reduction_ratio", 0, ">= 1"),
    ("dynamic_pruning_config.predictor_config.reduction_ratio", 2.5, "integer"),
    ("dynamic_pruning_config.predictor_config.use_std", [1], "boolean"),
    ("dynamic_l1_weight", -0.001, ">= 0"),
    ("init_mean", 1.0, "< 1"),
    ("init_mean", 0.0, "> 0"),
    ("temperature", 0.0, "> 0"),
    ("min_temperature", 2.0, "(0, temperature=1.0]"),
    ("temperature_decay", 1.01, "<= 1"),
    ("temperature_decay", 0.0, "> 0"),
    ("temperature_decay_freq", 0, ">= 1"),
    ("dynamic_mode", "yes please", "boolean"),
    ("model.depth", 3, "unknown key"),
]


@pytest.mark.parametrize(("path", "value", "allowed"), BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_bad_config_names_key_value_and_range(path: str, value: object, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_with(path, value), "cfg.yaml")
    message = str(info.value)
    assert f"cfg.yaml: {path}: got {value!r}" in message
    assert allowed in message


def test_non_mapping_is_rejected() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config([1, 2], "cfg.yaml")


def test_cli_bad_key_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(SEED_YAML + "temprature: 2.0\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "train",
            "--config",
            str(path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "temprature: got 2.0; unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
