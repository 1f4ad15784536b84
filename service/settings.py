"""Runtime settings of the inference service: one ``Settings`` object, validated once at startup.

Sources, highest priority first: explicit overrides (command-line flags), ``GATED_*`` environment
variables, an optional YAML file (``gated serve --config settings.yaml``), then the defaults below.
Nothing else in the service reads the environment; the validated object is passed down.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from models.gate_config import GateMode, KeepRatio

ENV_PREFIX = "GATED_"
# The shipped checkpoints live beside the model code; every sub-folder is one served model.
DEFAULT_REPOSITORY = Path(__file__).resolve().parent.parent / "models" / "pretrained"


# The YAML file of the settings being built. A context variable rather than a class attribute so
# that loading settings never mutates the class (tests build many Settings side by side).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("gated_settings_file", default=None)


class SettingsError(Exception):
    """Settings cannot be loaded; the message is one line that names the setting."""


class Settings(BaseSettings):
    """Every runtime knob of ``gated serve``; environment names are ``GATED_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    host: str = Field("127.0.0.1", min_length=1, description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one")
    # The same V2 protocol over gRPC (inference.GRPCInferenceService), as Triton: 8001.
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port; 0 turns gRPC off")
    model_repository: Path = Field(
        DEFAULT_REPOSITORY, description="directory whose <model-name>/ sub-folders are served"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Runtime gate configuration every model starts with (changed later through the admin API).
    default_gate_mode: GateMode = "dynamic"
    # None: the keep policy of each model's own config (dynamic_pruning_config.keep_ratio).
    default_keep_ratio: KeepRatio | None = None
    # The keep ratios a request (or the admin) may ask for, besides default_keep_ratio and each
    # checkpoint's own. Their plans are compiled and calibrated at startup; any other keep
    # ratio is refused with a 400 naming these, so no client can make the server compile.
    # Every value costs a static and a dynamic plan per model (memory, startup time).
    # Environment: GATED_KEEP_RATIOS=0.25,0.5,0.75,1 (or a JSON list).
    keep_ratios: Annotated[tuple[KeepRatio, ...], NoDecode] = Field(
        (0.25, 0.5, 0.75, 1.0), min_length=1, max_length=32
    )
    # Dynamic batching. A batch holds at most max_batch_size requests of one gate configuration;
    # the oldest queued request waits at most max_queue_delay_ms for batch mates. Under load
    # batches fill while the previous one computes, so the delay only matters when the compute
    # thread is idle; on CPU a short one measured best at every concurrency
    # (benchmarks/serve_bench.py), a GPU with a flat cost per batch may want more.
    batching: bool = Field(True, description="false: one forward per request (naive baseline)")
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_queue_delay_ms: float = Field(0.5, ge=0.0, le=10_000.0)
    # Under load (the previous batch held several requests), a batch short of max_batch_size
    # also waits up to this fraction of the previous batch's compute time, counted from its
    # end, for the requests its answers are bringing back: for a base-size model whose batch
    # takes a second, full batches instead of halves; for a small one it is microseconds.
    # 0: off.
    batch_fill_fraction: float = Field(0.05, ge=0.0, le=1.0)
    max_queue_size: int = Field(512, ge=1, description="queued requests per model before 503")
    # Requests may lower or raise this with the V2 `timeout` parameter (microseconds).
    request_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="body limit (413)")
    max_request_rows: int = Field(64, ge=1, description="batch dimension of one request")
    # Rows of one forward: a batch takes requests until the next would pass this. The warm-up
    # computes a batch this large at the model's max_length, so the server's memory is near its
    # peak when it turns ready.
    max_batch_rows: int = Field(64, ge=1, le=65536)
    # Non-finite inputs propagate into every logit of the request; refuse them unless asked.
    allow_non_finite: bool = False
    admin_token: SecretStr | None = Field(None, description="Bearer token of /admin; unset: off")
    # Intra-op threads of the forward pass. "auto": per model, chosen by its warm-up (every
    # core for a base-size model, whose batches run nearly twice as fast on two; one for a
    # small one, whose extra threads mostly spin and steal the core the event loop needs);
    # a number: that many for every model; 0: torch's own default.
    torch_threads: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = "auto"
    # Seconds a SIGTERM waits for queued and in-flight requests before giving up on them.
    drain_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    # Seconds the HTTP server then waits for open connections to close. SIGTERM to exit takes
    # at most drain_timeout_s + shutdown_timeout_s + 2 s (the final stop of the batchers and
    # of gRPC, 1 s each): keep that under the orchestrator's grace period (deploy/).
    shutdown_timeout_s: float = Field(3.0, gt=0.0, le=3600.0)
    # HTTP connections (service/rest/http.py). A request's line and headers: at most this
    # many bytes (431), received within header_timeout_s of the connection's start or of the
    # request's first byte (408); its body within body_timeout_s of the headers' end (408).
    # An idle kept-alive connection is closed after keep_alive_timeout_s.
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=16 * 1024 * 1024)
    header_timeout_s: float = Field(10.0, gt=0.0, le=3600.0)
    body_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    keep_alive_timeout_s: float = Field(5.0, gt=0.0, le=3600.0)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # One log line per request costs more than the request itself on a small model: off by default.
    access_log: bool = False
    # OTLP/HTTP collector (e.g. http://otel-collector:4318) to export request spans to; unset:
    # tracing off. Needs the OpenTelemetry SDK: pip install 'gated-serve[otel]'.
    otel_endpoint: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _request_fits_a_batch(self) -> Settings:
        if self.max_request_rows > self.max_batch_rows:
            raise ValueError(
                f"max_request_rows ({self.max_request_rows}) must not exceed max_batch_rows "
                f"({self.max_batch_rows}): a request is never split across forwards"
            )
        return self

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(
                f"grpc_port ({self.grpc_port}) must differ from port: REST and gRPC each need "
                "their own (0 turns gRPC off)"
            )
        return self

    @field_validator("keep_ratios", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return yaml.safe_load(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    def served_keep_ratios(self) -> tuple[float, ...]:
        """The keep ratios compiled for every model: keep_ratios and default_keep_ratio."""
        return tuple(sorted({*self.keep_ratios, *self.required_keep_ratios()}))

    def required_keep_ratios(self) -> tuple[float, ...]:
        """Keep ratios every model serves, whatever its serving.yaml: the default one."""
        return () if self.default_keep_ratio is None else (self.default_keep_ratio,)

    @field_validator("admin_token", mode="before")
    @classmethod
    def _blank_token_is_unset(cls, value: Any) -> Any:
        # `GATED_ADMIN_TOKEN=` in a shell or a compose file means "no token", not an empty secret
        # that anyone could present.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("admin_token")
    @classmethod
    def _strong_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("model_repository")
    @classmethod
    def _is_directory(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"{value} is not a directory")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build and validate the settings; raises SettingsError with a one-line message.

    ``overrides`` with the value None are ignored, so unset command-line flags fall through to the
    environment, the file and the defaults.
    """
    if config_file is not None:
        _check_file(config_file)
    token = _CONFIG_FILE.set(config_file)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        raise SettingsError(format_settings_error(err)) from None
    finally:
        _CONFIG_FILE.reset(token)


SERVING_FILE = "serving.yaml"


class ModelServing(BaseModel):
    """One model's own batching bounds, from ``<repository>/<model>/serving.yaml`` (optional):
    each replaces the server setting of the same name for that model. A base-size encoder
    needs them: its warm-up runs every plan at ``max_batch_rows`` × ``max_length``, and the
    server's 64 rows of a 512-token BERT would take minutes to warm up and seconds per batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(None, ge=1, le=4096, description="requests per batch")
    max_batch_rows: int | None = Field(None, ge=1, le=65536, description="rows per forward")
    max_request_rows: int | None = Field(None, ge=1, description="batch dimension of a request")
    # The keep ratios this model serves instead of the server's keep_ratios (its plans are
    # compiled at warm-up: fewer ratios, less memory for a large model); the server's
    # default_keep_ratio and the checkpoint's own are served too.
    keep_ratios: tuple[KeepRatio, ...] | None = Field(None, min_length=1, max_length=32)

    def resolved(self, settings: Settings) -> ServingBounds:
        """Every bound set: the model's where it has one, else the server's; a request's rows
        never exceed a batch's."""
        rows = self.max_batch_rows or settings.max_batch_rows
        return ServingBounds(
            max_batch_size=self.max_batch_size or settings.max_batch_size,
            max_batch_rows=rows,
            max_request_rows=min(self.max_request_rows or settings.max_request_rows, rows),
            keep_ratios=self.keep_ratios or settings.keep_ratios,
        )


@dataclass(frozen=True)
class ServingBounds:
    """A model's batching bounds in force: its serving.yaml over the server's settings."""

    max_batch_size: int
    max_batch_rows: int
    max_request_rows: int
    keep_ratios: tuple[float, ...]


def load_model_serving(folder: Path) -> ModelServing:
    """``folder/serving.yaml`` validated (empty bounds when absent); raises SettingsError with a
    one-line message naming the file and the key."""
    path = folder / SERVING_FILE
    if not path.is_file():
        return ModelServing()
    try:
        data = yaml.safe_load(path.read_text())
        return ModelServing.model_validate(data or {})
    except (OSError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SettingsError(f"{path}: unreadable YAML: {first}") from None
    except ValidationError as err:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'file'}: "
                 f"{str(e['msg']).removeprefix('Value error, ')}" for e in err.errors()]
        raise SettingsError(f"{path}: " + "; ".join(parts)) from None


def format_settings_error(err: ValidationError) -> str:
    """One line naming each offending setting, its environment variable and what is allowed."""
    parts = []
    for item in err.errors():
        name = ".".join(str(p) for p in item["loc"]) or "settings"
        env = f"{ENV_PREFIX}{str(item['loc'][0]).upper()}" if item["loc"] else ENV_PREFIX
        got = item.get("input")
        # Never echo a secret back, even a rejected one.
        hidden = name == "admin_token" or isinstance(got, dict) or item["type"] == "missing"
        shown = "" if hidden else f" (got {got!r})"
        message = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{name} ({env}): {message}{shown}")
    return "invalid settings: " + "; ".join(parts)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise SettingsError(f"settings file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SettingsError(f"settings file {path}: unreadable YAML: {first}") from None
    if data is not None and not isinstance(data, dict):
        raise SettingsError(f"settings file {path}: must be a mapping of setting: value")
