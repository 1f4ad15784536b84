"""The gate configuration: one validated type for every place a gate mode is chosen.

The model config file (``dynamic_pruning_config``), the CLI, V2 request parameters, the admin API
and the batcher all describe "how the gates act for this forward" with :class:`GateSettings`;
the bounds of each knob are declared here once (:data:`KeepRatio`, :data:`Threshold`,
:data:`DynamicWeight`, :data:`Bucket`) and nowhere else.

This module imports pydantic only, never torch, so torch-free code (the wire protocol) can
validate gate parameters: ``models/__init__.py`` loads its torch-backed names lazily.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import ConfigError

GateMode = Literal["dense", "static", "dynamic"]
GATE_MODES: tuple[GateMode, ...] = ("dense", "static", "dynamic")

# The bounds, once (docs/gates.md §4 explains each knob).
KeepRatio = Annotated[float, Field(gt=0.0, le=1.0, description="top-k fraction of open channels")]
Threshold = Annotated[float, Field(ge=0.0, le=1.0, description="keep channels whose gate ≥ this")]
DynamicWeight = Annotated[float, Field(ge=0.0, le=1.0, description="blend weight w")]
Bucket = Annotated[int, Field(ge=1, description="k is rounded up to a multiple of this")]



def _interval(annotated: Any) -> str:
    """``(0, 1]`` from an Annotated float's bounds (so messages quote the declared range)."""
    lo, hi = "(-inf", "inf)"
    for meta in annotated.__metadata__:
        for bound in getattr(meta, "metadata", []):
            name = type(bound).__name__
            value = getattr(bound, name.lower(), None)
            if name == "Gt":
                lo = f"({value:g}"
            elif name == "Ge":
                lo = f"[{value:g}"
            elif name == "Lt":
                hi = f"{value:g})"
            elif name == "Le":
                hi = f"{value:g}]"
    return f"{lo}, {hi}"


RANGES: dict[str, str] = {
    "keep_ratio": _interval(KeepRatio),
    "threshold": _interval(Threshold),
    "dynamic_weight": _interval(DynamicWeight),
    "bucket": "integers >= 1",
    "mode": ", ".join(("dense", "static", "dynamic")),
}

GATE_PARAMETERS: tuple[str, ...] = ("gate_mode", "keep_ratio", "threshold", "dynamic_weight")


class GateSettings(BaseModel):
    """How the gates act for one forward pass: one plan for every request of a batch, each
    request with its own run-time values where it brings them (:meth:`with_values_of`).

    ``keep_ratio`` and ``threshold`` are alternatives (``keep_ratio`` wins); both None keeps
    every statically open channel. ``dynamic_weight`` None uses the model's configured weight.
    Numbers are strict: ``"0.5"`` or ``true`` is not a keep ratio. Positional use
    ``GateSettings("static", keep_ratio=0.5)`` is allowed for the mode.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: GateMode = "dynamic"
    keep_ratio: KeepRatio | None = None
    threshold: Threshold | None = None
    dynamic_weight: DynamicWeight | None = None
    bucket: Bucket = 8

    def __init__(self, mode: str | None = None, /, **data: Any) -> None:
        if mode is not None:
            data["mode"] = mode
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(describe(err, "gate")) from None

    @classmethod
    def parse(cls, data: dict[str, Any], source: str = "gate") -> GateSettings:
        """Validate a mapping (request parameters, an admin body); ConfigError names the key."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(describe(err, source)) from None

    def canonical(self) -> GateSettings:
        """The same behaviour with knobs that cannot act removed: dense ignores every knob,
        static ignores the blend weight, a keep ratio overrides a threshold."""
        if self.mode == "dense":
            return GateSettings("dense", bucket=self.bucket)
        threshold = None if self.keep_ratio is not None else self.threshold
        weight = self.dynamic_weight if self.mode == "dynamic" else None
        return self.model_copy(update={"threshold": threshold, "dynamic_weight": weight})


    def with_values_of(self, row: GateSettings) -> GateSettings:
        """These settings with ``row``'s values of the knobs a compiled plan takes at run time:
        its blend weight, and under a dynamic threshold policy its threshold (when it has
        one). ``row`` runs the plan of these settings exactly when the result equals it."""
        update: dict[str, Any] = {"dynamic_weight": row.dynamic_weight}
        dynamic_threshold = self.mode == "dynamic" and self.keep_ratio is None
        if dynamic_threshold and self.threshold is not None and row.threshold is not None:
            update["threshold"] = row.threshold
        return self.model_copy(update=update)


def describe(err: ValidationError, source: str = "config") -> str:
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
        field = str(e["loc"][-1]) if e["loc"] else ""
        allowed = f"; allowed: {RANGES[field]}" if field in RANGES else _bounds(e.get("ctx"))
        lines.append(f"{source}: {path}: got {shown}; {reason}{allowed}")
    return "\n".join(lines)


def _bounds(ctx: dict[str, Any] | None) -> str:
    if not ctx:
        return ""
    parts = []
    for key, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if key in ctx:
            parts.append(f"{sym} {ctx[key]}")
    return f"; allowed: {' and '.join(parts)}" if parts else ""
