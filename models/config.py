"""Model configuration: the single source of truth for gates, architecture, data and training.

The top level accepts the parameter guide's complete YAML example verbatim (SPEC §6) and adds three
sections of our own: ``model`` (architecture), ``data`` and ``training``. Every section forbids
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
)

from models.errors import ConfigError

GateType = Literal["hardconcrete", "sigmoid"]
GateMode = Literal["dense", "static", "dynamic"]
GATE_MODES: tuple[GateMode, ...] = ("dense", "static", "dynamic")

UnitOpen = Annotated[float, Field(gt=0.0, lt=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class PredictorConfig(_Strict):
    """SE-style input predictor (SPEC §2)."""

    reduction_ratio: int = Field(16, ge=1, description="bottleneck: hidden = max(F // r, 8)")
    use_global_pool: bool = Field(True, description="per-request stats (true) or per time step")
    use_std: bool = Field(True, description="add the population std to the mean statistics")
    window: int = Field(5, ge=1, description="centred window for per-time-step statistics")
    min_hidden: int = Field(8, ge=1, description="floor of the bottleneck width")


class DynamicPruningConfig(_Strict):
    """The guide's ``dynamic_pruning_config`` plus the serving keep policy (SPEC §3-§4)."""

    gate_type: GateType = "hardconcrete"
    dynamic_weight: float = Field(0.5, ge=0.0, le=1.0)
    use_input_gating: bool = True
    predictor_config: PredictorConfig = PredictorConfig()
    # Keep policy (SPEC §4). keep_ratio and threshold are alternatives; keep_ratio wins when
    # both are set. None for both keeps every statically open channel.
    keep_ratio: float | None = Field(0.5, gt=0.0, le=1.0)
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    # k is rounded up to a multiple of `bucket` so that requests share a few kernel shapes.
    bucket: int = Field(8, ge=1)


class ArchitectureConfig(_Strict):
    """Which gated network to build, and its widths. Unused fields are ignored by an architecture.

    ``name`` is a registered architecture (``conv``, ``transformer``) or an import path
    ``package.module:factory`` whose factory takes a :class:`ModelConfig` and returns a
    ``models.networks.GatedNetwork``.
    """

    name: str = Field("conv", min_length=1)
    in_channels: int = Field(1, ge=1, description="features per time step")
    num_classes: int = Field(10, ge=2)
    max_length: int = Field(512, ge=1, description="longest sequence the model accepts")
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
    """Dataset selection. MNIST-1D is generated locally by the ``mnist1d`` package."""

    dataset: Literal["mnist1d"] = "mnist1d"
    seed: int = Field(42, ge=0, description="mnist1d generation seed; 42 is the standard split")


class TrainingConfig(_Strict):
    """Optimisation recipe (SPEC §5 plus the schedule we found to work)."""

    seed: int = Field(0, ge=0)
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    # Static sparsity: fraction of gated structures the Lagrangian drives closed (SPEC §5).
    target_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    sparsity_warmup_epochs: float = Field(10.0, ge=0.0)
    lagrangian_lr: float = Field(0.05, gt=0.0)
    gate_lr: float = Field(0.05, gt=0.0, description="lr of log_alpha / logits")
    # Epochs of plain dense training before any gate acts.
    dense_warmup_epochs: int = Field(5, ge=0)
    # Keep ratios sampled per step for the gated pass (sandwich rule); the smallest and the
    # largest are always visited. Empty: use dynamic_pruning_config.keep_ratio only.
    train_keep_ratios: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
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
        """Whether the dynamic predictor exists at all (SPEC §3)."""
        return self.use_dynamic_pruning and self.dynamic_pruning_config.use_input_gating

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe_bounds(ctx: dict[str, Any] | None) -> str:
    if not ctx:
        return ""
    parts = []
    for key, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if key in ctx:
            parts.append(f"{sym} {ctx[key]}")
    return f"; allowed: {' and '.join(parts)}" if parts else ""


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line per problem: ``<source>: <key.path>: got <value>; <reason>[; allowed: ...]``."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            reason = "unknown key"
        else:
            reason = e["msg"].removeprefix("Value error, ")
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{source}: {path}: got {shown}; {reason}{_describe_bounds(e.get('ctx'))}")
    return "\n".join(lines)


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
