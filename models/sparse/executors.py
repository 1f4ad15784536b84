"""Layer executors: what a compiled plan runs in place of each gated layer (docs/plans.md).

- :class:`FFNExecutor` — a :class:`models.layers.GatedFFN` compiled for one gate setting:
  ``dense`` reads the model's weights; ``static`` reads only its kept channels and scales them
  by z; ``dynamic`` runs the predictor per request and computes only the kept
  channels, by one of three strategies chosen per (batch size, k) by calibration: per-request
  gather + matmul, batched gather + ``baddbmm`` over chunks of requests, or the dense fallback.
  Each projection of a layer is held once for all its static and dynamic plans (:class:`Sides`),
  hidden-channel-major, ``W_in``, ``(W_up)`` and ``W_outᵀ`` as (H, D) matrices with the
  channels in static-score order: a static plan's kept set is a leading slice of rows (no
  copy), a request's kept set one ``index_select`` of contiguous rows per side. Called
  projection by projection (a user's ``fc2(act(fc1(x)))``), the input side returns a compact
  (B, T, k) tensor and the output side gathers its own rows of the same kept indices;
  called as a whole (``layer(x, residual)``), one fused loop keeps each request's gathered
  weights in cache and accumulates into the residual in place.
- :class:`AttentionExecutor` — heads with z = 0 removed, z folded into the output projection.
- :func:`conv_unfolded` — an ungated ``UnfoldConv1d`` as one matmul over unfolded windows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from models.errors import InvalidInputError
from models.gate_config import GateSettings
from models.gates import RunValues, apply_keep_policy, bucketed_k, static_order
from models.layers import (
    Forward,
    GatedConv1d,
    GatedFFN,
    HeadGatedAttention,
    Record,
    UnfoldConv1d,
    _Projection,
)
from models.predictor import InputPredictor, time_mask
from models.sparse.kernels import act_, addmm_act, unfold
from models.sparse.workspace import Workspace

_VAR_EPS = 1e-5  # the predictor's variance epsilon (models.predictor)


@dataclass(frozen=True)
class Strategy:
    """How one gated layer runs for one (batch size, k): ``dense`` or gather in chunks.

    ``chunk`` requests share one gather + ``baddbmm``; chunk 1 is the per-request loop (plain
    ``addmm``), chunk ≥ batch one batched call.
    """

    kind: str  # "dense" | "gather" | "union"
    chunk: int = 1

    def __str__(self) -> str:
        return self.kind if self.kind != "gather" else f"gather/{self.chunk}"


DENSE = Strategy("dense")
# The union of a batch's kept sets, one gather and one dense matmul over it, each request's own
# channels selected by a gate that is zero elsewhere: for projection-by-projection calls, chosen
# per batch when the union is small enough (requests of one batch often keep similar sets).
UNION = Strategy("union")


def static_keep_mask(layer: GatedFFN, settings: GateSettings) -> torch.Tensor:
    """(n,) float 0/1: the reference's static keep set (input independent)."""
    gate = layer.gate
    static = gate.static_values()  # (n,)
    hard = apply_keep_policy(
        static.unsqueeze(0),
        static > 0,
        settings.keep_ratio,
        settings.threshold,
        settings.bucket,
        gate.static_gate.scores(),
    )
    return hard[0]


def _rows(p: _Projection) -> torch.Tensor:
    """An input projection's weight as (H, D_in·k) rows (a view)."""
    return p.weight.detach().flatten(1)


def _out_cols(p: _Projection) -> torch.Tensor:
    """The output projection's weight as (D_out, H) (a view)."""
    w = p.weight.detach()
    return w.squeeze(-1) if w.dim() == 3 else w


@dataclass(frozen=True)
class Sides:
    """A gated FFN's weights as its static and dynamic plans read them, held once per layer.

    Row r of each matrix is hidden channel ``order[r]``: channels by static score, highest first
    (:func:`models.gates.static_order`), so the open channels are the first rows and every
    static keep set is a leading slice.
    """

    order: torch.Tensor  # (H,) the channel of each row
    pos: torch.Tensor  # (H,) the row of each channel
    mats: list[torch.Tensor]  # [W_in, (W_up), W_outᵀ], each (H, D) contiguous
    biases: list[torch.Tensor]  # the input sides' biases, (H,) in row order


def shared_sides(layer: GatedFFN) -> Sides:
    """The :class:`Sides` of ``layer``, made once per version of its weights and static scores
    (an in-place update, as training or loading does, makes new ones)."""
    scores = layer.gate.static_gate.scores()
    tracked = [*(p.weight for p in layer.inputs), layer.output.weight, scores]
    tracked += [p.bias for p in layer.inputs if p.bias is not None]
    key = tuple((t.data_ptr(), t._version, t.device) for t in tracked)
    cached = layer.__dict__.get("_sides")
    if cached is not None and cached[0] == key:
        return cast(Sides, cached[1])
    order = static_order(scores)
    rows = torch.arange(order.numel(), device=order.device)
    pos = torch.empty_like(order)
    pos[order] = rows
    in_order = bool((order == rows).all())
    w_ins = [_rows(p) for p in layer.inputs]
    # Already in order (fresh gates): the input weights themselves where they are contiguous.
    mats = [w.contiguous() if in_order else w.index_select(0, order) for w in w_ins]
    mats.append(_out_cols(layer.output).t().index_select(0, order))  # (H, D_out)
    biases = [_bias(p).index_select(0, order) for p in layer.inputs]
    sides = Sides(order, pos, mats, biases)
    layer.__dict__["_sides"] = (key, sides)
    return sides


def _bias(p: _Projection) -> torch.Tensor:
    b = p.bias
    if b is None:
        return p.weight.new_zeros(p.weight.shape[0])
    return b.detach()


class _FastPredictor:
    """The global-pool predictor, same math as :class:`InputPredictor`, cheaper squeeze.

    The padding-aware mean and variance are small batched matmuls with per-request step
    weights (1/count on valid steps, 0 on padding, shared by every layer): reductions over the
    time axis of a (B, T, C) tensor are many times slower than that on CPU.
    """

    def __init__(self, predictor: InputPredictor) -> None:
        self.use_std = predictor.use_std
        self.w1 = predictor.fc1.weight.detach()
        self.b1 = predictor.fc1.bias.detach()
        self.w2 = predictor.fc2.weight.detach()
        self.b2 = predictor.fc2.bias.detach()
        self.eps = self.b2.new_full((1, 1, 1), _VAR_EPS)

    def __call__(self, x: torch.Tensor, step_weights: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """x (B, T, C), step_weights (B, 1, T) -> (B, n) gates in (0, 1)."""
        mean = torch.bmm(step_weights, x)  # (B, 1, C)
        if self.use_std:
            # Two passes like the reference: no cancellation, no clamp needed. (x − mean)² is
            # one kernel (mse_loss, elementwise) and ε rides on the second bmm.
            sq = ws.get("sq", x.shape, x)
            # reduction 0 = none (the binding takes the enum; its stub says str, without out=)
            dev = torch._C._nn.mse_loss(x, mean.expand_as(x), 0, out=sq)  # type: ignore[call-arg, arg-type]
            var = torch.baddbmm(self.eps, step_weights, dev)  # (B, 1, C): var + ε
            stats = torch.cat([mean, var.sqrt_()], dim=-1)[:, 0]  # (B, 2C)
        else:
            stats = mean[:, 0]  # (B, C)
        hidden = torch._addmm_activation(self.b1, stats, self.w1.t())  # (B, hidden), ReLU'd
        return torch.addmm(self.b2, hidden, self.w2.t()).sigmoid_()  # (B, n)


@dataclass
class _Selection:
    """What the input side chose for a batch, handed to the output side."""

    strategy: Strategy
    idx: torch.Tensor | None  # (B, k) kept rows of the sides; union: its (u,) rows
    values: torch.Tensor | None  # (B, k) their gate values, gather only
    gate: torch.Tensor | None  # (B|1, 1|T, width) multiplier of the dense path's rows


def _nearest(table: Mapping[tuple[int, int], object], batch: int, k: int) -> tuple[int, int]:
    """The calibrated (batch, k) nearest to ``batch`` (log scale) and ``k``."""
    return min(table, key=lambda bk: (abs(math.log(bk[0] / batch)), abs(bk[1] - k), -bk[1]))


class FFNExecutor:
    """One gated FFN compiled for one :class:`GateSettings` (see the module docstring)."""

    def __init__(self, layer: GatedFFN, settings: GateSettings) -> None:
        self.layer = layer
        self.name = layer.name
        self.settings = settings
        self.act = layer.act_kind  # "gelu" | "relu" | "identity" | None (run the module)
        gate = layer.gate
        n = layer.n
        ins = layer.inputs
        self.d_ins = [int(_rows(p).shape[1]) for p in ins]
        self.d_out = int(_out_cols(layer.output).shape[0])
        self.b_out = _bias(layer.output).contiguous()
        self.conv = layer.conv
        self.predictor: _FastPredictor | None = None
        self.per_step = False
        self.k: int | None = None
        self.strategies: dict[tuple[int, int], Strategy] = {}
        # Calibrated medians (ms) per (batch, k): the dense fallback's and the chosen strategy's.
        self.timings: dict[tuple[int, int], tuple[float, float]] = {}
        self.forced: Strategy | None = None
        self.sides: list[torch.Tensor] | None = None  # static, dynamic: the layer's Sides
        self.pos: torch.Tensor | None = None  # dynamic: the row of each channel
        # dynamic: the channel of each open row (None: row r is channel r)
        self.order_open: torch.Tensor | None = None
        self.closed: torch.Tensor | None = None  # dynamic: (n,) channels the static gate closes
        self.scale: torch.Tensor | None = None  # static: (1, 1, kept) z of the kept rows
        mode = settings.mode
        dynamic = mode == "dynamic" and gate.predictor is not None
        if mode == "dense":
            # The model's own weights, as views (BLAS takes row strides and transposes): a
            # dense plan adds no copy of them.
            self.n_open = n
            self.kept_const: float | None = float(n)
            self.w_in = [_rows(p) for p in ins]
            self.b_in = [_bias(p).contiguous() for p in ins]
            self.w_out_t = _out_cols(layer.output).t()  # (H, D_out)
        else:
            shared = shared_sides(layer)
            static = gate.static_values()
            if not dynamic:
                # Input-independent keep set: a leading slice of the shared rows, z scaling
                # the hidden channels (one multiply of the (B·T, kept) activations).
                keep = static_keep_mask(layer, settings) > 0
                self.n_open = int(keep.sum())
                if not bool(keep[shared.order[: self.n_open]].all()):
                    raise RuntimeError(f"gated layer {layer.name}: static keep set out of order")
                self.kept_const = float(self.n_open)
                z = static[shared.order[: self.n_open]]
                if not bool((z == 1).all()):
                    self.scale = z.view(1, 1, -1)
            else:
                open_mask = static > 0
                self.n_open = int(open_mask.sum())  # the first rows of the sides
                self.kept_const = None
                self.pos = shared.pos
                order_open = shared.order[: self.n_open]
                rows = torch.arange(self.n_open, device=order_open.device)
                if not bool((order_open == rows).all()):
                    self.order_open = order_open  # else row r is channel r
                if self.n_open < n:
                    self.closed = ~open_mask
                # The blend weight and a threshold are values, not structure: the plan runs
                # any of them (the blend terms are remade when the weight changes).
                self.static = static
                self._blend: tuple[float, torch.Tensor, torch.Tensor] | None = None
                self.per_step = gate.per_step
                assert gate.predictor is not None
                self.predictor = _FastPredictor(gate.predictor)
                if settings.keep_ratio is not None:
                    self.k = bucketed_k(settings.keep_ratio, self.n_open, settings.bucket)
                elif settings.threshold is None:
                    self.k = self.n_open  # no policy: every open channel, scaled by its gate
            # One set of rows per layer, shared by every static and dynamic plan of it (any
            # keep ratio, threshold or blend weight): a server holds them once, not per plan.
            self.sides = shared.mats
            self.b_in_all = shared.biases
            self.w_in = [m[: self.n_open] for m in shared.mats[:-1]]
            self.b_in = [b[: self.n_open] for b in shared.biases]
            self.w_out_t = shared.mats[-1][: self.n_open]  # (open, D_out)
        self.width = int(self.w_in[0].shape[0])
        dev = layer.output.weight.device
        self.kept_vec = (
            torch.tensor([self.kept_const], device=dev) if self.kept_const is not None else None
        )
        self.k_vec = torch.tensor([float(self.k)], device=dev) if self.k is not None else None
        self.width_vec = torch.tensor([float(self.width)], device=dev)

    # ------------------------------------------------------------------ strategy

    def strategy(self, batch: int, k: int) -> Strategy:
        if self.forced is not None:
            return self.forced
        if not self.strategies:
            return DENSE
        return self.strategies[_nearest(self.strategies, batch, k)]

    def _union_pays(self, batch: int, k: int, union: int) -> bool:
        """Whether the dense matmul over ``union`` channels (predicted from the calibrated
        dense time, scaled by union / open channels) beats the calibrated strategy."""
        if self.forced == UNION:
            return True
        dense_ms, best_ms = self.timings[_nearest(self.timings, batch, k)]
        return dense_ms * union / self.n_open < best_ms

    # ------------------------------------------------------------------ inputs

    def _features(self, x_steps: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """(B, T, C) input -> (B, T', D_in) matmul features (unfolded windows for a conv)."""
        if not self.conv:
            return x_steps
        p = cast(GatedConv1d, self.layer.inputs[0])
        return unfold(x_steps, p.kernel_size, ws, p.padding, p.stride, p.dilation)

    def _select(
        self, x_steps: torch.Tensor, t_in: int, fwd: Forward, ws: Workspace, split: bool = False
    ) -> tuple[_Selection, torch.Tensor, torch.Tensor, tuple[float, float] | None]:
        """Run the gate for a batch -> selection, kept (B,), executed (B,), const counts.
        ``split``: called projection by projection, where the union strategy may run."""
        b = x_steps.shape[0]
        if self.predictor is None:  # dense, static, or dynamic without a predictor
            kept = cast(torch.Tensor, self.kept_vec).expand(b)
            const = cast(float, self.kept_const)
            return _Selection(DENSE, None, None, self.scale), kept, kept, (const, const)
        width = self.width_vec.expand(b)
        if self.per_step:
            # Per-step gates differ at every time step: a token-level gather reads k rows of
            # weights per token, more than the dense matmul; the reference gate runs and its
            # hard mask multiplies.
            mask = fwd.mask_at(t_in, self.name)[0]
            gate, kept = self.layer.gate(x_steps, mask, fwd.settings, fwd.values)
            assert gate is not None
            if self.order_open is not None:
                gate = gate[..., self.order_open]  # the open rows' channels
            return _Selection(DENSE, None, None, gate), kept, width, None
        weights = fwd.mask_at(t_in, self.name)[3]
        dynamic = self.predictor(x_steps, weights, ws)  # (B, n)
        # final = (1 − w)·static + w·(static·dynamic), one fused multiply-add.
        static_part, weighted_static = self._blend_terms(fwd.values, dynamic.device)
        final = torch.addcmul(static_part, dynamic, weighted_static)
        if self.k is not None:
            kvec = cast(torch.Tensor, self.k_vec).expand(b)
            if self.k >= self.n_open:
                gate = final if self.order_open is None else final[:, self.order_open]
                k = float(self.k)
                return _Selection(DENSE, None, None, gate.unsqueeze(1)), kvec, kvec, (k, k)
            ranked = final if self.closed is None else final.masked_fill(self.closed, -math.inf)
            values, idx = ranked.topk(self.k, dim=-1, sorted=False)  # (B, k) channels
            idx = cast(torch.Tensor, self.pos)[idx]  # their rows in the sides
            strat = self.strategy(b, self.k)
            # The union is worth looking at for a batch whose strategy is calibrated (or forced).
            if split and b > 1 and (self.forced == UNION or (self.forced is None and self.timings)):
                union = self._union(idx, values)
                if union is not None:
                    size = float(cast(torch.Tensor, union.idx).numel())
                    return union, kvec, kvec.new_full((b,), size), (float(self.k), size)
            if strat.kind == "gather":
                k = float(self.k)
                return _Selection(strat, idx, values, None), kvec, kvec, (k, k)
            return (
                _Selection(DENSE, None, None, self._dense_gate(idx, values)),
                kvec,
                width,
                (float(self.k), float(self.width)),
            )
        tau = cast("float | torch.Tensor", fwd.values.threshold)  # a float or (B, 1)
        keep = final >= tau  # (B, n)
        if self.closed is not None:
            keep &= ~self.closed
        counts = keep.sum(-1)
        kept = counts.to(torch.float32)
        # Kernel shapes depend on the counts: the one host sync of this policy. Every request
        # runs the batch's largest bucketed count; the padding picks carry a zero gate.
        bucket = self.settings.bucket
        kmax = min(-(-int(counts.max()) // bucket) * bucket, self.n_open) if b else 0
        ranked = final.masked_fill(~keep, -math.inf)
        values, idx = ranked.topk(kmax, dim=-1, sorted=False)
        values = values.clamp_min_(0.0)
        idx = cast(torch.Tensor, self.pos)[idx]  # rows (padding picks carry 0)
        strat = self.strategy(b, kmax)
        if strat.kind == "gather":
            return _Selection(strat, idx, values, None), kept, kept.new_full((b,), kmax), None
        return _Selection(DENSE, None, None, self._dense_gate(idx, values)), kept, width, None

    def _union(self, idx: torch.Tensor, values: torch.Tensor) -> _Selection | None:
        """The union selection of a batch's kept sets (B, k), or None when it does not pay.
        Reading the union's size is a host sync (free on CPU)."""
        b, k = idx.shape
        present = torch.zeros(self.layer.n, dtype=torch.bool, device=idx.device)
        present[idx.reshape(-1)] = True
        members = present.nonzero().flatten()  # (u,) sorted rows
        if not self._union_pays(b, k, int(members.numel())):
            return None
        # Each request's values over every row, then the union's columns: a scatter and a
        # gather of (B, n), where locating each pick among the members (searchsorted) cost
        # ten times more.
        full = values.new_zeros(b, self.layer.n)
        full.scatter_(1, idx, values)
        gate = full.index_select(1, members)
        return _Selection(UNION, members, None, gate.unsqueeze(1))  # gate (B, 1, u)

    def _blend_terms(
        self, values: RunValues, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((1 − w)·static, w·static) for the forward's blend weight (the model's default
        where the settings give none), remade only when the weight changes; (B, n) each when
        the rows have weights of their own."""
        w = values.weight(self.layer.gate.dynamic_weight, device)
        if isinstance(w, torch.Tensor):  # (B, 1)
            return (1.0 - w) * self.static, w * self.static
        blend = self._blend
        if blend is None or blend[0] != w:
            blend = (w, (1.0 - w) * self.static, w * self.static)
            self._blend = blend
        return blend[1], blend[2]

    def _dense_gate(self, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(B, 1, width) multiplier of the dense path's rows from kept rows (B, k) and values.
        Rows are distinct; a threshold policy's padding picks may be closed rows (beyond the
        open width), carrying 0."""
        gate = values.new_zeros(rows.shape[0], self.layer.n)  # (B, n) over every row
        gate.scatter_(1, rows, values)
        return gate[:, : self.width].unsqueeze(1)

    def _record(
        self,
        fwd: Forward,
        kept: torch.Tensor,
        executed: torch.Tensor,
        t_in: int,
        t_hidden: int,
        const: tuple[float, float] | None,
    ) -> None:
        length = self.layer.lengths(t_hidden, fwd)
        pred = self.layer.lengths(t_in, fwd) if self.predictor is not None else None
        fwd.record(self.layer, Record(kept, executed, length, pred, const))

    # ------------------------------------------------------------------ fused

    def fused(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        fwd: Forward,
        ws: Workspace,
        steps: bool = False,
    ) -> torch.Tensor:
        """The whole layer: ``[residual +] out(act(in(x)))``, in the caller's layout, or in
        (B, T, C) for all three with ``steps``."""
        layer = self.layer
        first = layer.inputs[0]
        if steps:
            x_steps, t_in = x, x.shape[1]
        else:
            x_steps = layer.to_steps(x, first)  # (B, T, C)
            t_in = layer.steps_of(x, first, fwd)
        sel, kept, executed, const = self._select(x_steps, t_in, fwd, ws)
        u = self._features(x_steps, ws)  # (B, T', D_in)
        b, t, _ = u.shape
        self._record(fwd, kept, executed, t_in, t, const)
        out_proj = layer.output
        y: torch.Tensor | None = None
        r = None
        if residual is not None:
            r = residual if steps else layer.to_steps(residual, out_proj)
            if _may_accumulate(r, x, (b, t, self.d_out)):
                y = r.add_(self.b_out)  # accumulate in place: the caller no longer needs it
        if y is None:
            # A fresh tensor: the result leaves the layer (a workspace buffer could be
            # overwritten by a second call of this layer while the first result is still used).
            y = self.b_out.expand(b, t, self.d_out).clone()
            if r is not None:
                y.add_(r)
        if sel.strategy.kind == "gather":
            self._gather_fused(
                u,
                y,
                cast(torch.Tensor, sel.idx),
                cast(torch.Tensor, sel.values),
                sel.strategy.chunk,
                ws,
            )
        elif self.width:
            h = self._dense_hidden(u, ws, "h")
            if sel.gate is not None:
                _check_steps(sel.gate, t, self.name)
                h.view(b, t, -1).mul_(sel.gate)
            y.view(b * t, -1).addmm_(h, self.w_out_t)  # (B·T, D_out)
        if steps:
            return y
        return layer.from_steps(y, residual if residual is not None else x, out_proj)

    def _hidden_act(self, h: torch.Tensor) -> torch.Tensor:
        if self.act in ("gelu", "relu", "identity"):
            return h if self.act == "identity" else act_(h, self.act)
        return cast(torch.Tensor, self.layer.act(h))  # type: ignore[misc]

    def _dense_hidden(self, u: torch.Tensor, ws: Workspace, role: str) -> torch.Tensor:
        """(B·T, n) activated hidden channels of the dense path."""
        b, t, _ = u.shape
        u2 = u.reshape(b * t, -1)
        h = ws.get(role, (b * t, self.width), u)
        fused = self.act in ("gelu", "relu") and not self.layer.glu
        addmm_act(self.b_in[0], u2, self.w_in[0].t(), h, self.act if fused else None)
        if not fused:
            h = self._hidden_act(h)
        if self.layer.glu:
            up = torch.addmm(self.b_in[1], u2, self.w_in[1].t())
            h = h * up
        return h

    def _gather_fused(
        self,
        u: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        values: torch.Tensor,
        chunk: int,
        ws: Workspace,
    ) -> None:
        """Kept channels only, accumulated into y (B, T, D_out)."""
        sides = cast(list[torch.Tensor], self.sides)
        b, t, _ = u.shape
        k = idx.shape[1]
        if k == 0:
            return
        glu = self.layer.glu
        fused = self.act in ("gelu", "relu") and not glu
        bias = ws.get("bk", (b, k), y)
        torch.index_select(self.b_in_all[0], 0, idx.reshape(-1), out=bias.view(-1))  # (B, k)
        if glu:
            bias_up = ws.get("bk_up", (b, k), y)
            torch.index_select(self.b_in_all[1], 0, idx.reshape(-1), out=bias_up.view(-1))
        if chunk <= 1:
            for i in range(b):
                # (k, D) contiguous rows of each side
                g = [self._gather_rows(j, idx[i], ws, f"g{j}", y) for j in range(len(sides))]
                h = ws.get("hk", (t, k), y)
                addmm_act(bias[i], u[i], g[0].t(), h, self.act if fused else None)
                if not fused:
                    h = self._hidden_act(h)
                if glu:
                    h = h * torch.addmm(bias_up[i], u[i], g[1].t())
                h.mul_(values[i])  # (T, k)
                y[i].addmm_(h, g[-1])  # (T, D_out)
            return
        for s, e in _chunks(b, chunk):
            rows = idx[s:e]
            g = [self._gather_rows(j, rows, ws, f"g{j}", y) for j in range(len(sides))]
            h = ws.get("hk", (e - s, t, k), y)
            torch.baddbmm(bias[s:e].unsqueeze(1), u[s:e], g[0].transpose(1, 2), out=h)
            h = act_(h, self.act) if fused else self._hidden_act(h)
            if glu:
                h = h * torch.baddbmm(bias_up[s:e].unsqueeze(1), u[s:e], g[1].transpose(1, 2))
            h.mul_(values[s:e].unsqueeze(1))  # (c, T, k)
            y[s:e].baddbmm_(h, g[-1])  # (c, T, D_out)

    def _gather_rows(
        self, side: int, idx: torch.Tensor, ws: Workspace, name: str, like: torch.Tensor
    ) -> torch.Tensor:
        """Rows ``idx`` ((k,) or (B, k)) of one side's (H, D) matrix, as ``idx.shape + (D,)``,
        in a reused buffer of ``ws`` (a fresh tensor of that size per layer would cost a page
        fault per 4 KiB: tens of ms at base sizes)."""
        w = cast(list[torch.Tensor], self.sides)[side]
        g = ws.get(name, (*idx.shape, w.shape[1]), like)
        torch.index_select(w, 0, idx.reshape(-1), out=g.view(-1, w.shape[1]))
        return g

    # ------------------------------------------------------------------ split

    def project(
        self, proj: _Projection, x: torch.Tensor, fwd: Forward, ws: Workspace
    ) -> torch.Tensor:
        """One projection called by the network's own forward (``fc1``, ``up``, ``fc2``)."""
        layer = self.layer
        if proj.role == "out":
            return self._split_out(proj, x, fwd, ws)
        x_steps = layer.to_steps(x, proj)
        u = self._features(x_steps, ws)
        b, t, _ = u.shape
        if layer not in fwd.handoff:  # the first input side to run (GLU: gate or up) selects
            t_in = layer.steps_of(x, proj, fwd)
            sel, kept, executed, const = self._select(x_steps, t_in, fwd, ws, split=True)
            self._record(fwd, kept, executed, t_in, t, const)
            fwd.handoff[layer] = sel
        sel = cast(_Selection, fwd.handoff[layer])
        which = 0 if proj.role == "in" else 1
        if sel.strategy.kind == "union":  # the union's rows of this side, one dense matmul
            members = cast(torch.Tensor, sel.idx)
            w = self._gather_rows(which, members, ws, f"union{which}", u)  # (u, D_in)
            bias = torch.index_select(self.b_in_all[which], 0, members)
            h = torch.addmm(bias, u.reshape(b * t, -1), w.t())
            return layer.from_steps(h.view(b, t, -1), x, proj)
        if sel.strategy.kind != "gather":
            # Dense path: the hidden channels of the dense weights (all, or the open ones).
            h = torch.addmm(self.b_in[which], u.reshape(b * t, -1), self.w_in[which].t())
            return layer.from_steps(h.view(b, t, -1), x, proj)
        idx, k = cast(torch.Tensor, sel.idx), cast(torch.Tensor, sel.idx).shape[1]
        # This side's kept rows only (the output side gathers its own when its projection
        # runs), chunk by chunk as calibrated: a chunk's gathered rows are still in cache when
        # its matmul reads them.
        bias = torch.index_select(self.b_in_all[which], 0, idx.reshape(-1)).view(b, 1, k)
        h = u.new_empty(b, t, k)  # fresh: it leaves the layer
        for s, e in _chunks(b, sel.strategy.chunk):
            g = self._gather_rows(which, idx[s:e], ws, f"split{which}", u)  # (c, k, D_in)
            torch.baddbmm(bias[s:e], u[s:e], g.transpose(1, 2), out=h[s:e])
        return layer.from_steps(h, x, proj)

    def _split_out(
        self, proj: _Projection, h_in: torch.Tensor, fwd: Forward, ws: Workspace
    ) -> torch.Tensor:
        layer = self.layer
        sel = cast("_Selection | None", fwd.handoff.pop(layer, None))
        if sel is None:
            raise RuntimeError(f"gated layer {self.name}: output projection ran before its input")
        h = layer.to_steps(h_in, proj)  # (B, T, k) or (B, T, n)
        b, t, _ = h.shape
        if sel.strategy.kind == "union":  # each request's own channels of the union, scaled
            members = cast(torch.Tensor, sel.idx)
            w_out_t = self._gather_rows(-1, members, ws, "union_out", h)  # (u, D_out)
            h = self._scaled(h, cast(torch.Tensor, sel.gate), ws)
            y = torch.addmm(self.b_out, h.reshape(b * t, -1), w_out_t).view(b, t, -1)
            return layer.from_steps(y, h_in, proj)
        if sel.strategy.kind != "gather":
            if sel.gate is not None:
                _check_steps(sel.gate, h.shape[1], self.name)
                h = self._scaled(h, sel.gate, ws)
            y = torch.addmm(self.b_out, h.reshape(b * t, -1), self.w_out_t).view(b, t, -1)
            return layer.from_steps(y, h_in, proj)
        values = cast(torch.Tensor, sel.values)
        idx = cast(torch.Tensor, sel.idx)
        scaled = self._scaled(h, values.unsqueeze(1), ws)
        y = self.b_out.expand(b, t, self.d_out).clone()  # fresh: it leaves the layer
        for s, e in _chunks(b, sel.strategy.chunk):
            g = self._gather_rows(-1, idx[s:e], ws, "split_out", h)  # (c, k, D_out)
            y[s:e].baddbmm_(scaled[s:e], g)
        return layer.from_steps(y, h_in, proj)

    @staticmethod
    def _scaled(h: torch.Tensor, gate: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """h · gate in a reused buffer (the output matmul reads it at once; a fresh tensor of
        that size costs its page faults on every call)."""
        out = ws.get("split_h", h.shape, h)  # gate broadcasts over h
        return torch.mul(h, gate, out=out)

    # ------------------------------------------------------------------ calibration

    def run_for_timing(
        self,
        u: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        values: torch.Tensor,
        strategy: Strategy,
        ws: Workspace,
    ) -> None:
        """The kernels a strategy runs for a batch (calibration)."""
        if strategy.kind == "gather":
            self._gather_fused(u, y, idx, values, strategy.chunk, ws)
            return
        b, t, _ = u.shape
        h = self._dense_hidden(u, ws, "h")
        h.view(b, t, -1).mul_(self._dense_gate(idx, values))
        y.view(b * t, -1).addmm_(h, self.w_out_t)


class AttentionExecutor:
    """Attention of one layer with closed heads removed and z folded into ``proj``."""

    def __init__(self, layer: HeadGatedAttention, settings: GateSettings) -> None:
        self.layer = layer
        nh, hd, d = layer.num_heads, layer.head_dim, layer.d_model
        z = None if settings.mode == "dense" else layer.head_gate()  # (nh,)
        qkv, proj = layer.qkv, layer.proj
        if z is None or bool((z == 1).all()):  # nothing to remove or fold: the model's weights
            self.qkv_w, self.qkv_b = qkv.weight.detach(), qkv.bias.detach()
            self.proj_w, self.proj_b = proj.weight.detach(), proj.bias.detach()
            self.heads = nh
        else:
            keep = (z > 0).nonzero().flatten()
            scale = z[keep]
            h = int(keep.numel())
            self.qkv_w = qkv.weight.detach().view(3, nh, hd, d)[:, keep].reshape(3 * h * hd, d)
            self.qkv_w = self.qkv_w.contiguous()
            self.qkv_b = qkv.bias.detach().view(3, nh, hd)[:, keep].reshape(-1).contiguous()
            pw = proj.weight.detach().view(d, nh, hd)[:, keep] * scale.view(1, -1, 1)
            self.proj_w = pw.reshape(d, h * hd).contiguous()
            self.proj_b = proj.bias.detach().contiguous()
            self.heads = h
        self.head_dim = hd
        self.heads_vec = torch.tensor([float(self.heads)], device=proj.weight.device)

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None, fwd: Forward, ws: Workspace
    ) -> torch.Tensor:
        """x (B, T, D) -> [residual +] attention."""
        b, t, d = x.shape
        lengths = fwd.lengths_at(t, self.layer.name)
        heads = self.heads_vec.expand(b)
        h = float(self.heads)
        fwd.record(self.layer, Record(heads, heads, lengths, None, (h, h)))
        out: torch.Tensor
        if residual is not None and _may_accumulate(residual, x, x.shape):
            out = residual
        else:
            out = x.new_zeros(x.shape) if residual is None else residual.clone()
        out.add_(self.proj_b)
        if self.heads == 0:
            return out
        width = self.heads * self.head_dim
        qkv = ws.get("qkv", (b, t, 3 * width), x)
        torch.addmm(self.qkv_b, x.reshape(b * t, d), self.qkv_w.t(), out=qkv.view(b * t, -1))
        q, k, v = qkv.view(b, t, 3, self.heads, self.head_dim).unbind(2)
        # Without padding the key mask is all true: SDPA skips it.
        attn_mask = time_mask(lengths, t)[:, None, None, :] if fwd.padded else None
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        ).transpose(1, 2)  # (B, T, h, hd)
        if not a.is_contiguous():
            a = ws.get("attn", a.shape, x).copy_(a)
        out.view(b * t, d).addmm_(a.reshape(b * t, width), self.proj_w.t())
        return out


def _chunks(batch: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of ``chunk`` requests (at least one each)."""
    step = max(1, chunk)
    return [(s, min(batch, s + step)) for s in range(0, batch, step)]


def _check_steps(gate: torch.Tensor, steps: int, name: str) -> None:
    """Per-step gates must cover the hidden time steps (a strided input conv changes them)."""
    if gate.shape[1] not in (1, steps):
        raise InvalidInputError(
            f"gated layer {name}: per-step gates over {gate.shape[1]} steps, hidden has {steps}"
        )


def _may_accumulate(r: torch.Tensor, x: torch.Tensor, shape: object) -> bool:
    """Whether a residual may take the layer's output in place: contiguous, of the output's
    shape, not a parameter, and not sharing memory with the layer's input (which the matmuls
    still read)."""
    return (
        r.is_contiguous()
        and tuple(r.shape) == tuple(shape)  # type: ignore[arg-type]
        and not isinstance(r, torch.nn.Parameter)
        and r.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    )


def conv_unfolded(conv: UnfoldConv1d, x: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """An ungated ``nn.Conv1d`` (groups 1) over x (B, T, C_in) as one matmul over the unfolded
    windows -> (B, T', C_out)."""
    k = int(conv.kernel_size[0])
    pad = conv.padding
    if isinstance(pad, str) or conv.padding_mode != "zeros":
        return torch.nn.Conv1d.forward(conv, x.transpose(1, 2)).transpose(1, 2)
    u = unfold(x, k, ws, int(pad[0]), int(conv.stride[0]), int(conv.dilation[0]))
    b, t, _ = u.shape
    w = conv.weight.detach().flatten(1)  # (C_out, C_in·k), a view
    if conv.bias is None:
        out = torch.mm(u.reshape(b * t, -1), w.t())
    else:
        out = torch.addmm(conv.bias.detach(), u.reshape(b * t, -1), w.t())  # (B·T, C_out)
    return out.view(b, t, -1)
