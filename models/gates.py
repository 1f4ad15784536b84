"""Channel gates: static (HardConcrete, sigmoid), dynamic (input predictor) and the keep policy.

docs/gates.md states the math (static gates, the blend, the keep policy); the tests in
``tests/unit/test_gates.py`` check each formula against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.config import GateType, ModelConfig
from models.gate_config import GateMode, GateSettings
from models.predictor import InputPredictor

# HardConcrete stretch interval (Louizos et al. 2018).
GAMMA = -0.1
ZETA = 1.1
_U_EPS = 1e-6


def settings_for(
    cfg: ModelConfig,
    mode: GateMode,
    keep_ratio: float | None = None,
    threshold: float | None = None,
    dynamic_weight: float | None = None,
) -> GateSettings:
    """GateSettings for ``mode`` with the model's defaults filled in.

    Dynamic mode falls back to the configured keep policy; static mode keeps every statically
    open channel unless a keep ratio or threshold is given (then ranked by the static gate).
    """
    dp = cfg.dynamic_pruning_config
    if mode == "dynamic" and keep_ratio is None and threshold is None:
        keep_ratio, threshold = dp.keep_ratio, dp.threshold
    return GateSettings(
        mode,
        keep_ratio=keep_ratio,
        threshold=threshold,
        dynamic_weight=dynamic_weight,
        bucket=dp.bucket,
    )


def bucketed_k(keep_ratio: float, n_open: int, bucket: int) -> int:
    """docs/gates.md §4: k = ceil(ρ·n_open) rounded up to a multiple of ``bucket``, never above
    n_open."""
    if n_open <= 0:
        return 0
    k = max(1, math.ceil(keep_ratio * n_open - 1e-9))
    return min(math.ceil(k / bucket) * bucket, n_open)


class RunValues:
    """The knobs a compiled plan takes at run time (the blend weight, a dynamic threshold) for
    one forward: the settings' values for every row, or each row's own where the requests of a
    batch asked for different ones. Requests that differ only in these share a plan, so they
    share a batch too.

    ``rows``: one :class:`GateSettings` per row of the batch (None: every row runs
    ``settings``). Rows may differ from ``settings`` only in ``dynamic_weight`` and, with a
    dynamic threshold policy, ``threshold``; anything else is a different plan (ValueError).
    """

    __slots__ = ("_rows", "_weights", "settings", "threshold")

    def __init__(
        self,
        settings: GateSettings,
        rows: Sequence[GateSettings] | None = None,
        batch: int = 0,
        device: torch.device | None = None,
    ) -> None:
        self.settings = settings
        self._rows: tuple[GateSettings, ...] = ()
        self._weights: dict[float, float | torch.Tensor] = {}
        # The threshold: a float, None (no threshold policy), or (B, 1) per row.
        self.threshold: float | torch.Tensor | None = settings.threshold
        if rows is None:
            return
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} per-row gate settings for a batch of {batch}")
        for row in rows:
            if settings.with_values_of(row) != row:
                raise ValueError(
                    f"per-row gate settings {row} differ from the batch's {settings} in more "
                    "than the blend weight and a dynamic threshold"
                )
        if len({r.dynamic_weight for r in rows}) > 1:
            self._rows = tuple(rows)
        taus = {r.threshold for r in rows}
        if settings.threshold is not None and len(taus) > 1:
            self.threshold = torch.tensor(
                [[r.threshold] for r in rows], dtype=torch.float32, device=device
            )
        elif taus:
            self.threshold = next(iter(taus))
        if rows and not self._rows:  # one weight for every row (None: each layer's own)
            self.settings = settings.model_copy(update={"dynamic_weight": rows[0].dynamic_weight})

    def weight(self, default: float, device: torch.device) -> float | torch.Tensor:
        """The blend weight w: a float, or (B, 1) per row (a row without one: ``default``, the
        layer's configured weight)."""
        if not self._rows:
            w = self.settings.dynamic_weight
            return default if w is None else w
        got = self._weights.get(default)
        if got is None:
            values = [[default if r.dynamic_weight is None else r.dynamic_weight]
                      for r in self._rows]
            got = torch.tensor(values, dtype=torch.float32, device=device)
            self._weights[default] = got
        return got


def per_row(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A (B, 1) per-row value shaped to broadcast over ``like`` (B, …, n); floats as they are."""
    if isinstance(value, torch.Tensor) and like.dim() > 2:
        return value.view(value.shape[0], *([1] * (like.dim() - 1)))
    return value


def temperature_at(step: int, temperature: float, decay: float, freq: int, minimum: float) -> float:
    """docs/gates.md §1: β_t = max(temperature · decay^⌊t / freq⌋, min_temperature)."""
    return max(temperature * decay ** (step // freq), minimum)


class StaticGate(nn.Module):
    """One learned scalar per prunable structure (a channel, a head); docs/gates.md §1."""

    def forward(self) -> torch.Tensor:  # (n,) gate values in [0, 1]
        raise NotImplementedError

    def expected_l0(self) -> torch.Tensor:
        """Differentiable count of open gates (the L0 objective's input)."""
        raise NotImplementedError

    def scores(self) -> torch.Tensor:
        """Monotone importance used to rank channels when a static keep ratio is applied."""
        raise NotImplementedError

    def set_temperature(self, beta: float) -> None:
        """Apply the trainer's temperature schedule (no-op for gates without one)."""


class HardConcreteGate(StaticGate):
    """HardConcrete gates, one per structure (Louizos, Welling, Kingma 2018; as in CoFi/DPHuBERT).

    Stochastic stretched-and-clamped samples in training, deterministic exact 0/1-capable values
    in eval. The temperature β is a buffer so that checkpoints carry the schedule's last value.
    """

    def __init__(
        self,
        n: int,
        init_mean: float = 0.01,
        temperature: float = 1.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        mean = math.log(1.0 - init_mean) - math.log(init_mean)
        self.log_alpha = nn.Parameter(torch.normal(mean, 0.01, (n,), device=device))
        self.register_buffer("beta", torch.tensor(float(temperature), device=device))
        self.beta: torch.Tensor

    def forward(self) -> torch.Tensor:
        """-> (n,) gate values in [0, 1]."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(_U_EPS, 1.0 - _U_EPS)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def expected_l0(self) -> torch.Tensor:
        """Differentiable expected number of open gates: Σ σ(log_alpha − β·ln(−γ/ζ))."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-GAMMA / ZETA)).sum()

    def scores(self) -> torch.Tensor:
        return self.log_alpha

    def set_temperature(self, beta: float) -> None:
        self.beta.fill_(beta)


class SigmoidGate(StaticGate):
    """Continuous gates z = σ(logit) in training and inference; L0 proxy Σ z (docs/gates.md §1)."""

    def __init__(
        self,
        n: int,
        init_mean: float = 0.01,
        temperature: float = 1.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        del temperature  # accepted for a uniform constructor; sigmoid gates have no temperature
        logit = math.log(1.0 - init_mean) - math.log(init_mean)
        self.logit = nn.Parameter(torch.full((n,), logit, device=device))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)

    def expected_l0(self) -> torch.Tensor:
        return torch.sigmoid(self.logit).sum()

    def scores(self) -> torch.Tensor:
        return self.logit


STATIC_GATES: dict[GateType, type[HardConcreteGate] | type[SigmoidGate]] = {
    "hardconcrete": HardConcreteGate,
    "sigmoid": SigmoidGate,
}


def make_static_gate(n: int, cfg: ModelConfig, device: torch.device | None = None) -> StaticGate:
    gate_cls = STATIC_GATES[cfg.dynamic_pruning_config.gate_type]
    return gate_cls(n, cfg.init_mean, cfg.temperature, device=device)


def apply_keep_policy(
    final: torch.Tensor,
    open_mask: torch.Tensor,
    keep_ratio: float | None,
    threshold: float | torch.Tensor | None,
    bucket: int,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hard keep mask (same shape as ``final``, float 0/1) among statically open channels.

    ``scores`` ranks channels for top-k (defaults to ``final``); ``open_mask`` (n,) marks the
    channels the static gate leaves open. Top-k: k = bucketed_k(ρ, n_open). Threshold: final ≥ τ
    (a float, or per row shaped to broadcast over ``final``).
    A static ranking (``scores`` given) breaks ties by channel index, so every static keep set
    is a prefix of :func:`static_order` (compiled plans read it as a slice of shared weights).
    """
    n_open = int(open_mask.sum())
    open_b = open_mask.expand_as(final)
    if keep_ratio is not None:
        k = bucketed_k(keep_ratio, n_open, bucket)
        if k >= n_open:
            return open_b.to(final.dtype)
        ranked = (final if scores is None else scores.expand_as(final)).detach()
        ranked = ranked.masked_fill(~open_b, float("-inf"))
        idx = ranked.topk(k, dim=-1).indices if scores is None else static_order(ranked)[..., :k]
        return torch.zeros_like(final).scatter_(-1, idx, 1.0)
    if threshold is not None:
        return ((final >= threshold) & open_b).to(final.dtype)
    return open_b.to(final.dtype)


def static_order(scores: torch.Tensor) -> torch.Tensor:
    """(…, n) channels by static score, highest first, ties by index: the open channels come
    first (a static value is monotone in its score) and every static keep set of
    :func:`apply_keep_policy` (top-k, threshold) is a prefix."""
    return scores.detach().sort(descending=True, stable=True).indices


def straight_through(final: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Forward ``final · hard`` (exact zeros), backward as if nothing were dropped.

    The gradient at a dropped channel then says whether opening it would help, which is what the
    predictor needs to learn a ranking (docs/gates.md §4: training uses the serving policy).
    """
    return final - (final * (1.0 - hard)).detach()


class DynamicStructuredGate(nn.Module):
    """Static gate blended with an SE-style input predictor (docs/gates.md §3), plus the keep
    policy.

    ``final = (1 − w)·static + w·(static · dynamic)``; a channel closed by the static gate stays
    closed in every mode. ``forward`` returns the gate to multiply the block's hidden channels by
    (None in dense mode) and, per request, the number of channels actually kept.
    """

    def __init__(
        self,
        n: int,
        in_channels: int,
        cfg: ModelConfig,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        dp = cfg.dynamic_pruning_config
        self.n = n
        self.dynamic_weight = dp.dynamic_weight
        self.dynamic_mode = cfg.dynamic_mode
        self.per_step = cfg.input_gating and not dp.predictor_config.use_global_pool
        self.static_gate: StaticGate = make_static_gate(n, cfg, device=device)
        self.predictor: InputPredictor | None = (
            InputPredictor(in_channels, n, dp.predictor_config, device=device)
            if cfg.input_gating
            else None
        )

    def static_values(self) -> torch.Tensor:
        """(n,) static gate values: stochastic in training, deterministic in eval."""
        values: torch.Tensor = self.static_gate()
        return values

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        settings: GateSettings,
        values: RunValues | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x (B, T, C_in), mask (B, T) -> (gate (B, 1, n) or (B, T, n) or None, kept (B,)).
        ``values``: the blend weight and threshold of each row (default: the settings')."""
        batch = x.shape[0]
        if values is None:
            values = RunValues(settings)
        if settings.mode == "dense":
            return None, torch.full((batch,), float(self.n), device=x.device)
        static = self.static_values()  # (n,)
        open_mask = static > 0
        use_dynamic = (
            settings.mode == "dynamic"
            and self.predictor is not None
            and (self.dynamic_mode or not self.training)
        )
        if use_dynamic:
            assert self.predictor is not None
            dynamic = self.predictor(x, mask)  # (B, n) or (B, T, n)
            w = per_row(values.weight(self.dynamic_weight, x.device), dynamic)
            final = (1.0 - w) * static + w * (static * dynamic)
            scores = None
        else:
            final = static.expand(batch, self.n)  # (B, n)
            scores = self.static_gate.scores()
        threshold = values.threshold
        hard = apply_keep_policy(
            final,
            open_mask,
            settings.keep_ratio,
            None if threshold is None else per_row(threshold, final),
            settings.bucket,
            scores,
        )
        gate = straight_through(final, hard) if self.training else final * hard
        if gate.dim() == 2:
            gate = gate.unsqueeze(1)  # (B, 1, n)
            kept = hard.sum(-1)
        else:
            valid = mask.to(hard.dtype)
            kept = (hard.sum(-1) * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        return gate, kept.to(torch.float32)
