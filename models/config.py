"""Model configuration: the single source of truth for gates, architecture, data and training.

The top level accepts the parameter guide's complete YAML example verbatim (docs/gates.md §6)
and adds three sections of our own: ``model`` (architecture), ``data`` and ``training``. Every
section forbids
unknown keys; :func:`load_config` turns validation failures into one :class:`ConfigError` whose
message names the key path, the offending value and the allowed range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models.errors import ConfigError
from models.gate_config import GATE_MODES, Bucket, DynamicWeight, GateMode, KeepRatio, Threshold
from models.gate_config import describe as format_validation_error

__all__ = ["GATE_MODES", "GateMode", "ModelConfig", "format_validation_error"]

GateType = Literal["hardconcrete", "sigmoid"]

UnitOpen = Annotated[float, Field(gt=0.0, lt=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class PredictorConfig(_Strict):
    """SE-style input predictor (docs/gates.md §2)."""

    reduction_ratio: int = Field(16, ge=1, description="bottleneck: hidden = max(F // r, 8)")
    use_global_pool: bool = Field(True, description="per-request stats (true) or per time step")
    use_std: bool = Field(True, description="add the population std to the mean statistics")
    window: int = Field(5, ge=1, description="centred window for per-time-step statistics")
    min_hidden: int = Field(8, ge=1, description="floor of the bottleneck width")


class DynamicPruningConfig(_Strict):
    """The guide's ``dynamic_pruning_config`` plus the serving keep policy (docs/gates.md §3-§4)."""

    gate_type: GateType = "hardconcrete"
    dynamic_weight: DynamicWeight = 0.5
    use_input_gating: bool = True
    predictor_config: PredictorConfig = PredictorConfig()
    # Keep policy (docs/gates.md §4). keep_ratio and threshold are alternatives; keep_ratio wins
    # when both are set. None for both keeps every statically open channel.
    keep_ratio: KeepRatio | None = 0.5
    threshold: Threshold | None = None
    # k is rounded up to a multiple of `bucket` so that requests share a few kernel shapes.
    bucket: Bucket = 8


# Widths of the built-in architectures; a network found by import path takes ``args`` instead.
BUILTIN_WIDTHS = frozenset((
    "channels", "hidden", "num_blocks", "kernel_size", "norm", "d_model", "ffn", "num_heads",
    "num_layers",
))


class ArchitectureConfig(_Strict):
    """Which gated network to build: a built-in by name, or a user's factory by import path.

    ``name`` is a built-in architecture (``conv``, ``transformer``, with the widths below) or
    ``package.module:factory``: the factory is called as ``factory(**args)`` (or, taking one
    parameter named ``config``, with the whole :class:`ModelConfig`) and returns a
    ``models.GatedNetwork`` or a plain ``torch.nn.Module`` that the loader gates with
    ``models.attach_gates`` (docs/model-contract.md). The built-ins' widths are refused for
    such a network: what it needs goes under ``args``.
    """

    name: str = Field("conv", min_length=1)
    in_channels: int = Field(1, ge=1, description="features per time step")
    num_classes: int = Field(10, ge=2)
    max_length: int = Field(512, ge=1, description="longest sequence the model accepts")
    args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of an import-path factory"
    )
    # Explicit FFN pairs for attach_gates, as module paths [[fc1, fc2], ...] or
    # [[gate_proj, up_proj, down_proj], ...]; empty: found automatically.
    ffns: list[list[str]] = Field(default_factory=list)
    # conv
    channels: int = Field(32, ge=1, description="residual width C")
    hidden: int = Field(64, ge=1, description="gated hidden width H of each block")
    num_blocks: int = Field(3, ge=1)
    kernel_size: int = Field(5, ge=1)
    # Norm before each gated conv: per-request statistics ("sequence", over valid steps and
    # channels), per time step ("layer") or running batch statistics ("batch"; these differ
    # between the dense and the pruned passes, so pruned modes lose accuracy).
    norm: Literal["batch", "layer", "sequence"] = "sequence"
    # transformer
    d_model: int = Field(64, ge=1)
    ffn: int = Field(256, ge=1, description="gated FFN intermediate width")
    num_heads: int = Field(4, ge=1)
    num_layers: int = Field(2, ge=1)

    @property
    def is_builtin(self) -> bool:
        return ":" not in self.name

    @model_validator(mode="after")
    def _fields_of_the_architecture(self) -> ArchitectureConfig:
        if self.is_builtin:
            if self.args or self.ffns:
                raise ValueError(
                    f"args and ffns are for import-path networks; {self.name!r} is built in"
                )
            return self
        stray = sorted(BUILTIN_WIDTHS & self.model_fields_set)
        if stray:
            raise ValueError(
                f"{', '.join(stray)}: widths of the built-in architectures; a network found by "
                f"import path ({self.name}) takes its own settings under model.args"
            )
        return self

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd (same padding); allowed: 1, 3, 5, ...")
        return v

    @field_validator("num_heads")
    @classmethod
    def _heads_divide_width(cls, v: int, info: ValidationInfo) -> int:
        d_model = info.data.get("d_model")
        if d_model is not None and d_model % v:
            raise ValueError(f"must divide d_model ({d_model})")
        return v


class DataConfig(_Strict):
    """Dataset selection: MNIST-1D, generated locally by the ``mnist1d`` package, or a tensor
    file of the user's own (``dataset: file``; ``models/data.py`` documents its keys)."""

    dataset: Literal["mnist1d", "file"] = "mnist1d"
    seed: int = Field(42, ge=0, description="mnist1d generation seed; 42 is the standard split")
    # dataset: file. The training file (.npz or .safetensors); the test split is test_path, or
    # else test_fraction of the file's rows drawn with seed.
    path: Path | None = None
    test_path: Path | None = None
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _file_needs_a_path(self) -> DataConfig:
        if self.dataset == "file" and self.path is None:
            raise ValueError("dataset 'file' needs path (an .npz or .safetensors file)")
        if self.dataset != "file" and (self.path is not None or self.test_path is not None):
            raise ValueError("path and test_path are for dataset 'file'")
        return self


class TrainingConfig(_Strict):
    """Optimisation recipe (docs/gates.md §5 plus the schedule we found to work)."""

    seed: int = Field(0, ge=0)
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    # Static sparsity: fraction of gated structures the Lagrangian drives closed (docs/gates.md §5).
    target_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    sparsity_warmup_epochs: float = Field(10.0, ge=0.0)
    lagrangian_lr: float = Field(0.05, gt=0.0)
    gate_lr: float = Field(0.05, gt=0.0, description="lr of log_alpha / logits")
    # Epochs of plain dense training before any gate acts.
    dense_warmup_epochs: int = Field(5, ge=0)
    # Keep ratios of the gated pass: one is drawn at random per step (the dense pass runs every
    # step). Empty: use dynamic_pruning_config.keep_ratio only.
    train_keep_ratios: list[KeepRatio] = Field(
        default_factory=lambda: [1.0, 0.5, 0.25, 0.125]
    )
    # The dense pass keeps training the unpruned baseline and teaches the gated pass.
    gated_task_weight: float = Field(1.0, ge=0.0, description="cross-entropy of the gated pass")
    distill_weight: float = Field(1.0, ge=0.0)
    distill_temperature: float = Field(2.0, gt=0.0)


class ModelConfig(_Strict):
    """The whole model config. Top-level keys are the parameter guide's, verbatim."""

    use_dynamic_pruning: bool = True
    dynamic_pruning_config: DynamicPruningConfig = DynamicPruningConfig()
    dynamic_l1_weight: float = Field(0.001, ge=0.0)
    dynamic_mode: bool = True
    init_mean: UnitOpen = 0.01
    temperature: float = Field(1.0, gt=0.0)
    min_temperature: float = Field(0.1, gt=0.0)
    temperature_decay: float = Field(0.95, gt=0.0, le=1.0)
    temperature_decay_freq: int = Field(100, ge=1)

    model: ArchitectureConfig = ArchitectureConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()

    @field_validator("min_temperature")
    @classmethod
    def _min_below_start(cls, v: float, info: ValidationInfo) -> float:
        start = info.data.get("temperature")
        if start is not None and v > start:
            raise ValueError(f"out of range; allowed: (0, temperature={start}]")
        return v

    @property
    def input_gating(self) -> bool:
        """Whether the dynamic predictor exists at all (docs/gates.md §3)."""
        return self.use_dynamic_pruning and self.dynamic_pruning_config.use_input_gating

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        if not self.model.is_builtin:  # the built-ins' widths mean nothing to this network
            for key in BUILTIN_WIDTHS:
                data["model"].pop(key, None)
        return yaml.safe_dump(data, sort_keys=False)


def parse_config(data: Any, source: str = "config") -> ModelConfig:
    """Validate a mapping (e.g. parsed YAML) into a :class:`ModelConfig` or raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path) -> ModelConfig:
    """Read and validate a YAML model config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(data, str(path))
