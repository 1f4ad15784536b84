"""Multiply-accumulate counts of what a gated network executes, for any network.

Counts are per request (a request of length L costs the same whatever its batch mates), in
float64 so long sequences do not overflow. Gated layers count what they ran (their own formula
over the channels they computed, the predictor's when it ran); everything else in the network
is counted once, at first use, by torch's FLOP counter (``torch.utils.flop_counter``) run on the
dense network at a few lengths and fitted as a quadratic in the length (every stride-1 layer,
attention included, is one), one quadratic per residue class of the length when strided convs
or pooling floor it, an exact table per length if even that does not hold. A network whose
input has a fixed shape (an image) runs at one length, its ``max_length``: its rest is one
count. Nothing is traced on the serving path. Checkpoints record the fitted count
(``mac_model`` in the weights file's metadata, with a fingerprint of the network's structure),
so a server loading them never runs the counter: its first use imports torch's compiler stack,
some 70 MB of resident memory.

Only matmuls and convolutions count (the FLOP counter's convention); element-wise work (norms,
activations, gate multiplies) does not, as is usual.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from models.gate_config import GateSettings

if TYPE_CHECKING:
    from models.layers import GatedLayer, Record
    from models.networks import GatedNetwork

logger = logging.getLogger(__name__)


def quadratic(values: torch.Tensor) -> torch.Tensor:
    """Coefficients (c0, c1, c2) of a quadratic from its values at lengths 0, 1, 2."""
    v = values.to(torch.float64)
    c2 = (v[2] - 2 * v[1] + v[0]) / 2
    return torch.stack([v[0], v[1] - v[0] - c2, c2])


def eval_quadratic(c: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    seq = lengths.to(torch.float64)
    return c[0] + seq * (c[1] + seq * c[2])  # (B,)


class MacModel:
    """MACs of the ungated rest of a network as a function of the request length, plus the
    gated layers' own formulas over what each ran (:meth:`count`).

    The rest is a quadratic in the length, one per residue class of the length modulo the
    network's ``length_period`` (strided convs and pooling floor the lengths, which makes every
    count affine in ⌊L / period⌋ within a class): ``coef`` is (period, 3).
    """

    def __init__(self, coef: torch.Tensor | None, table: torch.Tensor | None) -> None:
        self.coef = coef  # (P, 3) float64: rest(L) = c0 + c1·L + c2·L², c = coef[L mod P]
        self.table = table  # (max_length + 1,) float64 when no fit holds
        self._on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def fit(cls, net: GatedNetwork) -> MacModel:
        """Count the rest of ``net`` with torch's FLOP counter at three lengths of each residue
        class and verify each quadratic at two more; if one fails, count every length up to
        ``max_length`` (slow for long models: a warning says so). A fixed-shape input has one
        length, ``max_length``: the rest is counted once, a constant quadratic."""
        fixed = net.fixed_length
        if fixed is not None:  # one input shape (an image): the rest is one constant
            return cls(torch.tensor([[_rest_at(net, fixed), 0.0, 0.0]], dtype=torch.float64), None)
        max_len = net.config.model.max_length
        period = max(1, int(getattr(net, "length_period", 1)))
        coefs = []
        started = time.monotonic()
        shortest = net.min_length
        for r in range(period):
            # Every class is fitted and checked on short inputs; the longest lengths, a full
            # forward each, are checked on a few classes only when there are many (a strided
            # front end: 320 classes for a Wav2Vec2-style feature extractor).
            long_check = period <= LONG_CHECKS or r % (period // LONG_CHECKS) == 0
            coef = _fit_class(net, r, period, max_len, long_check, shortest)
            if r and r % 64 == 0:
                logger.info("MAC count of %s: %d/%d length classes (%.0f s)",
                            type(net).__name__, r, period, time.monotonic() - started)
            if coef is None:
                logger.warning(
                    "MACs of %s are not a quadratic in the length (per residue modulo %d): "
                    "counting each of its %d lengths once",
                    type(net).__name__,
                    period,
                    max_len,
                )
                return cls(None, _table(net, max_len))
            coefs.append(coef)
        return cls(torch.stack(coefs), None)

    def to_dict(self, net: GatedNetwork) -> dict[str, object]:
        """What a checkpoint records (with the network's structure, checked at load)."""
        src = self.coef if self.coef is not None else self.table
        assert src is not None
        kind = "quadratic" if self.coef is not None else "table"
        return {"kind": kind, "values": src.tolist(), "structure": structure(net)}

    @classmethod
    def from_dict(cls, data: object, net: GatedNetwork) -> MacModel | None:
        """The recorded model, or None when absent or recorded for another structure."""
        if not isinstance(data, dict) or data.get("structure") != structure(net):
            return None
        values = torch.tensor(data.get("values"), dtype=torch.float64)
        if data.get("kind") == "quadratic" and values.dim() == 2 and values.shape[1] == 3:
            return cls(values, None)
        if data.get("kind") == "table" and values.dim() == 1:
            return cls(None, values)
        return None

    @property
    def quadratic(self) -> bool:
        """One quadratic for every length (the plans' closed form then applies)."""
        return self.coef is not None and self.coef.shape[0] == 1

    def rest(self, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) float64 MACs of everything but the gated layers."""
        src = self.coef if self.coef is not None else self.table
        assert src is not None
        dev = lengths.device
        on = self._on.get(dev)
        if on is None:
            on = self._on[dev] = src.to(dev)
        if self.coef is None:
            return on[lengths.long().clamp(0, on.numel() - 1)]
        if on.shape[0] == 1:
            return eval_quadratic(on[0], lengths)
        c = on[lengths.long() % on.shape[0]]  # (B, 3)
        seq = lengths.to(torch.float64)
        return c[:, 0] + seq * (c[:, 1] + seq * c[:, 2])

    def count(
        self,
        lengths: torch.Tensor,
        records: Mapping[GatedLayer, Record],
        with_predictor: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(executed, dense) MACs per request (B,) float64."""
        rest = self.rest(lengths)
        macs, dense = rest, rest
        for layer, first in records.items():
            for rec in first.calls():
                pred = rec.pred_length if with_predictor else None
                macs = macs + layer.macs(rec.length, rec.executed, pred)
                full = torch.full_like(rec.length, layer.n, dtype=torch.float64)
                dense = dense + layer.macs(rec.length, full, None)
        return macs, dense


def structure(net: GatedNetwork) -> str:
    """A fingerprint of what the count depends on: module types, parameter shapes, the input
    contract. A recorded count is reused only for the same fingerprint."""
    import hashlib

    parts = [type(m).__name__ for m in net.modules()]
    parts += [f"{k}:{tuple(v.shape)}" for k, v in net.state_dict().items()]
    cfg = net.config.model
    parts += [cfg.name, repr(sorted(cfg.args.items())), str(cfg.in_channels), str(cfg.max_length)]
    parts.append(str(getattr(net, "length_period", 1)))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def shortest_input(net: GatedNetwork) -> int:
    """The shortest input ``net`` runs (a convolutional front end needs its receptive field),
    by doubling then bisecting; at most ``max_length``."""
    max_len = net.config.model.max_length

    def runs(length: int) -> bool:
        try:
            _rest_at(net, length)
        except Exception:  # noqa: BLE001 - whatever a too short input makes the module raise
            return False
        return True

    hi = 1
    while not runs(hi):
        if hi >= max_len:
            return max_len
        hi = min(2 * hi, max_len)
    lo = hi // 2  # does not run (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs(mid) else (mid, hi)
    return hi


def _fit_class(
    net: GatedNetwork, r: int, period: int, max_len: int, long_check: bool = True,
    shortest: int = 1,
) -> torch.Tensor | None:
    """(3,) coefficients in L of the rest's MACs over lengths ≡ r (mod period), or None."""
    # Lengths L = r + period·m; fit in m at m0, m0+1, m0+2, verify at two larger m: the
    # longest and a middle one, or (``long_check`` off) the next two.
    m_max = (max_len - r) // period
    if m_max < 4:
        return None
    first = max(1, -(-(shortest - r) // period))  # the first m whose length runs
    m0 = max(first, min(16 // period + 1, m_max - 4))
    if m0 + 2 > m_max:
        return None
    ms = [m0, m0 + 1, m0 + 2]
    values = torch.tensor([_rest_at(net, r + period * m) for m in ms], dtype=torch.float64)
    c = quadratic(values)  # in s = m − m0
    # rest = c0 + c1·s + c2·s², s = (L − r)/period − m0 = (L − L0)/period, L0 = r + period·m0
    l0, p = float(r + period * m0), float(period)
    coef = torch.stack(
        [
            c[0] - c[1] * l0 / p + c[2] * l0 * l0 / (p * p),
            c[1] / p - 2 * c[2] * l0 / (p * p),
            c[2] / (p * p),
        ]
    )
    checks = {m_max, (m0 + m_max) // 2 + 1} if long_check else {min(m0 + k, m_max) for k in (3, 4)}
    for m in sorted(checks - set(ms)):
        length = r + period * m
        got = float(eval_quadratic(coef, torch.tensor([length]))[0])
        if not math.isclose(got, _rest_at(net, length), rel_tol=1e-9, abs_tol=0.5):
            return None
    return coef


# With more length classes than this, only this many are also checked at long lengths.
LONG_CHECKS = 8


def _cpu_flash_attention(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], *args: object, **kw: object
) -> int:
    """FLOPs of the CPU flash-attention kernel, which the counter has no formula for."""
    return int(sdpa_flop_count(query, key, value))  # type: ignore[no-untyped-call]


# Kernels the FLOP counter does not know, by the same formula as their known siblings.
_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention,
}


def _rest_at(net: GatedNetwork, length: int) -> float:
    """Counted MACs of one dense request of ``length`` steps minus its gated layers'."""
    from models.layers import forward_context

    x, lengths = net.example_input(length)
    fwd = net.open_forward(x, lengths, GateSettings("dense"))
    # nn.MultiheadAttention's native fast path is one fused kernel the FLOP counter has no
    # formula for; its decomposed form does the same matmuls and is counted.
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        # no_grad, not inference_mode: the counter's module tracker hooks the inputs of every
        # module that gets parameters requiring grad (a weight_norm parametrization does), which
        # fails on inference tensors.
        with (
            torch.no_grad(),
            FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter,
            forward_context(fwd),
        ):
            net.compute(x, lengths)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    gated = 0.0
    for layer, first in fwd.records.items():
        for rec in first.calls():
            full = torch.full_like(rec.length, layer.n, dtype=torch.float64)
            gated += float(layer.macs(rec.length, full, None)[0])
    return float(counter.get_total_flops()) / 2.0 - gated


def _table(net: GatedNetwork, max_len: int) -> torch.Tensor:
    values = [0.0]
    for n in range(1, max_len + 1):
        try:
            values.append(_rest_at(net, n))
        except Exception:  # noqa: BLE001 - lengths this network cannot run at all
            values.append(math.nan)
    table = torch.tensor(values, dtype=torch.float64)
    valid = ~table.isnan()
    if not bool(valid.any()):
        raise RuntimeError(f"{type(net).__name__}: no length runs, cannot count its MACs")
    first = float(table[valid][0])
    return torch.where(valid, table, torch.full_like(table, first))
