"""Sparse execution plans: a closed channel costs nothing (SPEC §4).

:func:`compile_plan` turns a loaded gated network and one :class:`GateSettings` into a
:class:`SparsePlan`, a drop-in for the network's forward (same inputs, same
:class:`NetworkOutput`: logits, kept, macs, dense_macs) that executes only what the gates keep:

- ``dense``: every channel and head, no gate math.
- ``static``: the static keep set is input independent, so it is applied once at compile time:
  closed channels and heads are physically removed and the gate values are folded into the
  second projection (``W2[:, j] · z_j``; a head's ``z`` into its columns of the output
  projection). A request runs plain, smaller matmuls.
- ``dynamic``: the predictor runs per request, the keep policy picks the channels, and only those
  are computed. Both projections of a gated layer are packed hidden-channel-major in one matrix
  ``[W1 row | W2ᵀ row]`` of shape (H, D_in + D_out + pad), so the kept set of a request is one
  ``index_select`` of contiguous rows (and one of the bias vector: a bias read from a column of
  the packed matrix is a strided load per element, several times slower to broadcast).
  Execution strategies, picked per (batch size, k) by a short timing at compile time:
  per-request gather + matmul, batched gather + ``baddbmm`` over chunks of requests (the
  gathered weights of a chunk stay in cache), and the dense fallback (all open channels, kept
  ones scaled, the others multiplied by zero) which wins when the kept fraction is high.
  Requests of a batch that share a bucketed k share a kernel call; with a threshold policy the
  batch is split into such groups. Per-time-step gates (``use_global_pool: false``) run the
  dense fallback with the per-step mask: correct, no saving.

The conv architecture uses the same kernels: its k-wide convolution is a matmul over the
unfolded input (B, T, C·k), the 1×1 convolution a matmul over channels.

Everything runs on the device of the model's weights, under ``torch.inference_mode``. The hot
loop has no host-device synchronisation except with a threshold policy, whose per-request kept
counts decide the kernel shapes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from models.gates import DynamicStructuredGate, GateSettings, apply_keep_policy, bucketed_k
from models.networks import (
    GatedConvBlock,
    GatedConvNet,
    GatedEncoderLayer,
    GatedNetwork,
    GatedTransformer,
    NetworkOutput,
)
from models.predictor import InputPredictor, time_mask

_VAR_EPS = 1e-5  # SPEC §2, as in models.predictor
_PACK_ALIGN = 16  # packed rows padded to a multiple of 16 floats (64 bytes) for aligned loads
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 8, 32)


@dataclass(frozen=True)
class Strategy:
    """How one gated layer runs for one (batch size, k): ``dense`` or gather in chunks.

    ``chunk`` requests share one gather + ``baddbmm``; chunk 1 is the per-request loop (plain
    ``addmm``), chunk ≥ batch one batched call.
    """

    kind: str  # "dense" | "gather"
    chunk: int = 1

    def __str__(self) -> str:
        return "dense" if self.kind == "dense" else f"gather/{self.chunk}"


DENSE = Strategy("dense")


# --------------------------------------------------------------------------- kernels


class _GatedMLP:
    """One gated hidden layer: y = x + (gelu(u·W1ᵀ + b1) · g)·W2ᵀ + b2, over kept channels only.

    ``u`` (B, T, D_in) is the layer's input features (the unfolded input for a conv),
    ``x`` (B, T, D_out) the residual. The dense weights cover the channels that may ever be
    kept (statically open ones); the packed matrix covers all H so that top-k indices over the
    full gate vector index it directly.
    """

    def __init__(
        self,
        w1: torch.Tensor,  # (H, D_in)
        b1: torch.Tensor,  # (H,)
        w2: torch.Tensor,  # (D_out, H)
        b2: torch.Tensor,  # (D_out,)
        dense_rows: torch.Tensor | None,  # (n_dense,) channels of the dense path; None = all
        scale: torch.Tensor | None = None,  # (H,) folded into W2's columns (static mode)
        packed: bool = False,
    ) -> None:
        d_in, d_out = w1.shape[1], w2.shape[0]
        self.d_in, self.d_out = d_in, d_out
        self.b2 = b2.detach().contiguous()
        w1, b1 = w1.detach(), b1.detach()
        w2 = w2.detach() if scale is None else w2.detach() * scale  # (D_out, H)
        rows = dense_rows
        self.packed: torch.Tensor | None = None
        self.b1_all = b1.contiguous()  # (H,): gathered with the packed rows
        if packed:
            width = -(-(d_in + d_out) // _PACK_ALIGN) * _PACK_ALIGN
            pk = w1.new_zeros(w1.shape[0], width)  # (H, W)
            pk[:, :d_in] = w1
            pk[:, d_in : d_in + d_out] = w2.t()
            self.packed = pk
        # Weights are views wherever a layout allows (BLAS takes row strides and transposes):
        # a plan then adds no copy of the model's weights, and the dense path of a packed
        # layer reads the packed matrix, so a plan's weights stay in cache once, not twice.
        if rows is None and self.packed is not None:
            self.w1 = self.packed[:, :d_in]  # (H, D_in), row stride W
            self.w2t = self.packed[:, d_in : d_in + d_out]  # (H, D_out)
            self.b1 = self.b1_all
        elif rows is None:
            self.w1, self.b1 = w1.contiguous(), b1.contiguous()
            self.w2t = w2.t()  # (H, D_out), a transposed view
        else:
            self.w1, self.b1 = w1[rows].contiguous(), b1[rows].contiguous()  # (n, D_in), (n,)
            self.w2t = w2[:, rows].t().contiguous()  # (n, D_out)
        self.width = self.w1.shape[0]

    def dense(
        self,
        u: torch.Tensor,
        x: torch.Tensor,
        gate: torch.Tensor | None,
        ws: Workspace,
    ) -> torch.Tensor:
        """u (B, T, D_in), gate (B, 1|T, n) or None; adds the layer into x (B, T, D_out)."""
        b, t, _ = u.shape
        x.add_(self.b2)  # the residual takes the bias first: the matmul then accumulates
        if self.width == 0:
            return x
        h = ws.get("h", (b * t, self.width), x)
        _addmm_gelu(self.b1, u.reshape(b * t, -1), self.w1.t(), h)  # (B·T, n)
        if gate is not None:
            h.view(b, t, -1).mul_(gate)
        x.view(b * t, -1).addmm_(h, self.w2t)  # (B·T, D_out)
        return x

    def gather(
        self,
        u: torch.Tensor,
        x: torch.Tensor,
        idx: torch.Tensor,
        values: torch.Tensor,
        chunk: int,
        ws: Workspace,
    ) -> torch.Tensor:
        """Kept channels only: idx (B, k) into the packed rows, values (B, k) their gates;
        adds the layer into x (B, T, D_out)."""
        assert self.packed is not None
        b, t, _ = u.shape
        k = idx.shape[1]
        d_in, d_out = self.d_in, self.d_out
        x.add_(self.b2)
        if k == 0:
            return x
        width = self.packed.shape[1]
        bias = ws.get("bk", (b, k), x)
        torch.index_select(self.b1_all, 0, idx.reshape(-1), out=bias.view(-1))  # (B, k)
        if chunk <= 1:
            for i in range(b):
                g = ws.get("g", (k, width), x)
                torch.index_select(self.packed, 0, idx[i], out=g)  # (k, W): contiguous rows
                h = ws.get("hk", (t, k), x)
                _addmm_gelu(bias[i], u[i], g[:, :d_in].t(), h).mul_(values[i])  # (T, k)
                x[i].addmm_(h, g[:, d_in : d_in + d_out])  # (T, D_out)
        else:
            for s in range(0, b, chunk):
                e = min(b, s + chunk)
                g = ws.get("g", (e - s, k, width), x)
                torch.index_select(self.packed, 0, idx[s:e].reshape(-1), out=g.view(-1, width))
                h = ws.get("hk", (e - s, t, k), x)
                torch.baddbmm(bias[s:e].unsqueeze(1), u[s:e], g[:, :, :d_in].transpose(1, 2), out=h)
                torch.ops.aten.gelu_(h).mul_(values[s:e].unsqueeze(1))  # (c, T, k)
                x[s:e].baddbmm_(h, g[:, :, d_in : d_in + d_out])  # (c, T, D_out)
        return x

    def run(
        self,
        u: torch.Tensor,
        x: torch.Tensor,
        idx: torch.Tensor,
        values: torch.Tensor,
        strategy: Strategy,
        dense_map: torch.Tensor | None,
        ws: Workspace,
    ) -> torch.Tensor:
        """Kept channels (idx, values) by ``strategy``, added into x in place; ``dense_map``
        (H,) maps a channel to its dense column."""
        if strategy.kind == "gather":
            return self.gather(u, x, idx, values, strategy.chunk, ws)
        gate = values.new_zeros(idx.shape[0], self.width)  # (B, n)
        # Add, not assign: padding picks of a threshold policy carry 0 and may map (through a
        # closed channel) onto the column of an open one, whose value must survive.
        gate.scatter_add_(1, idx if dense_map is None else dense_map[idx], values)
        return self.dense(u, x, gate.unsqueeze(1), ws)


def _addmm_gelu(
    bias: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out = gelu(bias + m1 @ m2), exact (erf) GELU.

    Inside a forward every kernel call costs several µs beyond its work, so on CPU the matmul
    and its GELU are one call (``_addmm_activation``: the same addmm, then GELU in place). On
    CUDA that op applies the tanh approximation, so it runs as two calls there.
    """
    if out.device.type == "cpu":
        return torch._addmm_activation(bias, m1, m2, use_gelu=True, out=out)
    torch.addmm(bias, m1, m2, out=out)
    return cast(torch.Tensor, torch.ops.aten.gelu_(out))


class Workspace:
    """Buffers reused across calls, one per role (a plan runs on one thread at a time).

    The CPU allocator hands large blocks back to the OS, so a fresh (B, T, H) activation or a
    batch of gathered weights page-faults on every call: on small VMs that costs more than the
    gather itself. Layers run one after another, so a role's buffer is shared by all layers;
    plans that never run at the same time (a server's, on its one compute thread) may share one
    workspace, which bounds the memory of many plans by that of the largest batch.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.device != like.device or buf.dtype != like.dtype:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:n].view(*shape)


@contextmanager
def _without_onednn() -> Iterator[None]:
    """Run ATen's own CPU kernels instead of oneDNN's.

    oneDNN compiles and caches a kernel per input shape (GELU is one of its ops here): a server
    sees unboundedly many shapes, and that cache alone grew a serving process by hundreds of MB.
    ATen's kernels cache nothing and are within noise at these sizes. The flag is process-wide;
    a plan runs on one thread at a time and restores it.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a ContextProp
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of ``fn``, synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _candidates(batch: int) -> list[Strategy]:
    chunks = sorted({1, *(c for c in (4, 8) if c < batch), batch})
    return [DENSE, *(Strategy("gather", c) for c in chunks)]


def _calibrate(
    mlp: _GatedMLP,
    open_rows: torch.Tensor,
    dense_map: torch.Tensor | None,
    batch: int,
    k: int,
    length: int,
    reps: int,
) -> tuple[Strategy, dict[str, float]]:
    """Time each strategy on random inputs of this shape; interleaved repeats, medians."""
    dev = open_rows.device
    gen = torch.Generator(device="cpu").manual_seed(batch * 7919 + k)
    u = torch.randn(batch, length, mlp.d_in, generator=gen).to(dev)
    x0 = torch.randn(batch, length, mlp.d_out, generator=gen).to(dev)
    x = x0.clone()
    scores = torch.rand(batch, open_rows.numel(), generator=gen).to(dev)
    values, pos = scores.topk(k, dim=-1)
    idx = open_rows[pos]  # (B, k) full channel indices
    cands = _candidates(batch)
    ws = Workspace()
    # Small batches run in well under a millisecond: more repeats for the same noise.
    reps = reps * max(1, 8 // batch)
    times: dict[Strategy, list[float]] = {s: [] for s in cands}
    with _without_onednn():  # the kernels a plan runs
        for rep in range(reps + 1):
            for s in cands:
                x.copy_(x0)  # the kernels add into x in place
                t = time_once(partial(mlp.run, u, x, idx, values, s, dense_map, ws), dev)
                if rep:  # the first round only warms up allocators and kernels
                    times[s].append(t)
    medians = {s: statistics.median(v) for s, v in times.items()}
    best = min(medians, key=lambda s: medians[s])
    return best, {str(s): round(v * 1e3, 4) for s, v in medians.items()}


# --------------------------------------------------------------------------- gates


class _FastPredictor:
    """SPEC §2 global-pool predictor, same math as :class:`InputPredictor`, cheaper squeeze.

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

    def __call__(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        """x (B, T, C) -> (B, n) gates in (0, 1)."""
        mean = torch.bmm(ctx.step_weights, x)  # (B, 1, C)
        if self.use_std:
            # Two passes like the reference: no cancellation, no clamp needed. Inside a forward
            # every small kernel costs several µs (its code is cold after the big matmuls), so
            # (x − mean)² is one kernel (mse_loss, elementwise) and ε rides on the second bmm.
            sq = ctx.ws.get("sq", x.shape, x)
            # reduction 0 = none (the binding takes the enum; its stub says str, without out=)
            dev = torch._C._nn.mse_loss(x, mean.expand_as(x), 0, out=sq)  # type: ignore[call-arg, arg-type]
            var = torch.baddbmm(self.eps, ctx.step_weights, dev)  # (B, 1, C): var + ε
            stats = torch.cat([mean, var.sqrt_()], dim=-1)[:, 0]  # (B, 2C)
        else:
            stats = mean[:, 0]  # (B, C)
        hidden = torch._addmm_activation(self.b1, stats, self.w1.t())  # (B, hidden), ReLU'd
        return torch.addmm(self.b2, hidden, self.w2.t()).sigmoid_()  # (B, n)


@dataclass
class _Context:
    """Per-forward values shared by every layer."""

    mask: torch.Tensor  # (B, T) bool
    mf: torch.Tensor  # (B, T, 1) float
    count: torch.Tensor  # (B, 1) valid steps
    step_weights: torch.Tensor  # (B, 1, T): 1/count on valid steps, 0 on padding
    ws: Workspace
    full: bool  # known without a device sync that no request is padded
    # Channels computed per request by layers that ran more than they kept (the dense
    # fallback, per-step gates, bucket padding of a threshold policy): MACs count these.
    executed: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _GatedLayer:
    """A dynamically gated hidden layer compiled for one GateSettings."""

    name: str
    mlp: _GatedMLP
    gate: DynamicStructuredGate
    n_open: int
    # dynamic mode only
    predictor: _FastPredictor | None = None
    per_step: bool = False
    open_rows: torch.Tensor | None = None  # (n_open,)
    closed: torch.Tensor | None = None  # (n,) bool, None when every channel is open
    dense_map: torch.Tensor | None = None  # (n,) full -> dense column, None when identity
    static_part: torch.Tensor | None = None  # (n,) (1 − w)·static
    weighted_static: torch.Tensor | None = None  # (n,) w·static
    k: int | None = None  # fixed k (keep ratio); None with a threshold policy
    strategies: dict[tuple[int, int], Strategy] = field(default_factory=dict)
    kept_const: float | None = None  # channels kept when input independent
    forced: Strategy | None = None
    kept_vec: torch.Tensor | None = None  # (1,) channels kept when the same for every request
    width_vec: torch.Tensor | None = None  # (1,) channels the dense path computes

    def kept(self, batch: int) -> torch.Tensor:
        return cast(torch.Tensor, self.kept_vec).expand(batch)  # (B,) float32

    def strategy(self, batch: int, k: int) -> Strategy:
        if self.forced is not None:
            return self.forced
        if not self.strategies:
            return DENSE
        key = min(
            self.strategies,
            key=lambda bk: (abs(math.log(bk[0] / batch)), abs(bk[1] - k), -bk[1]),
        )
        return self.strategies[key]

    def forward(
        self,
        f: torch.Tensor,
        u: torch.Tensor,
        x: torch.Tensor,
        ctx: _Context,
        settings: GateSettings,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictor input f (B, T, C), features u, residual x -> (B, T, D_out), kept (B,).

        The layer is added into ``x`` in place (the caller no longer needs the residual alone).
        """
        batch = x.shape[0]
        ws = ctx.ws
        if self.predictor is None:  # dense, static, or dynamic without a predictor
            kept = self.kept(batch)
            return self.mlp.dense(u, x, None, ws), kept
        if self.per_step:
            # Per-step gates differ at every time step: a token-level gather costs more than it
            # saves at these widths, so the reference gate runs and its mask multiplies.
            gate, kept = self.gate(f, ctx.mask, settings)
            assert gate is not None
            if self.dense_map is not None:
                gate = gate[..., cast(torch.Tensor, self.open_rows)]
            self._ran_dense(ctx, batch)
            return self.mlp.dense(u, x, gate, ws), kept
        # SPEC §3: final = (1 − w)·static + w·(static·dynamic), one fused multiply-add.
        dynamic = self.predictor(f, ctx)  # (B, n)
        static_part = cast(torch.Tensor, self.static_part)
        final = torch.addcmul(static_part, dynamic, cast(torch.Tensor, self.weighted_static))
        if self.k is not None:
            if self.k >= self.n_open:
                kept = self.kept(batch)
                gate = final if self.open_rows is None else final[:, self.open_rows]
                return self.mlp.dense(u, x, gate.unsqueeze(1), ws), kept
            ranked = final if self.closed is None else final.masked_fill(self.closed, -math.inf)
            values, idx = ranked.topk(self.k, dim=-1, sorted=False)  # (B, k)
            kept = self.kept(batch)
            strat = self.strategy(batch, self.k)
            if strat.kind != "gather":
                self._ran_dense(ctx, batch)
            return self.mlp.run(u, x, idx, values, strat, self.dense_map, ws), kept
        tau = cast(float, settings.threshold)
        return self._threshold(final, u, x, tau, settings.bucket, ctx)

    def _ran_dense(self, ctx: _Context, batch: int) -> None:
        if self.width_vec is None:
            self.width_vec = self.mlp.b1.new_full((1,), float(self.mlp.width))
        ctx.executed[self.name] = self.width_vec.expand(batch)

    def _threshold(
        self,
        final: torch.Tensor,
        u: torch.Tensor,
        x: torch.Tensor,
        tau: float,
        bucket: int,
        ctx: _Context,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ws = ctx.ws
        keep = final >= tau  # (B, n)
        if self.closed is not None:
            keep &= ~self.closed
        counts = keep.sum(-1)  # (B,)
        kept = counts.to(torch.float32)
        ranked = final.masked_fill(~keep, -math.inf)
        # Kernel shapes depend on the counts: the one host sync of this policy.
        ks = [min(-(-c // bucket) * bucket, self.n_open) for c in counts.tolist()]
        groups: dict[int, list[int]] = {}
        for i, kb in enumerate(ks):
            groups.setdefault(kb, []).append(i)
        executed = list(ks)  # bucket padding runs too
        if len(groups) == 1:
            kb = ks[0]
            values, idx = ranked.topk(kb, dim=-1, sorted=False)
            values = values.clamp_min_(0.0)  # padding picks (-inf) compute with a zero gate
            strat = self.strategy(x.shape[0], kb)
            if strat.kind != "gather":
                executed = [self.mlp.width] * len(ks)
            ctx.executed[self.name] = kept.new_tensor(executed)
            return self.mlp.run(u, x, idx, values, strat, self.dense_map, ws), kept
        out = x
        for kb, members in groups.items():
            rows = torch.tensor(members, device=x.device)
            values, idx = ranked[rows].topk(kb, dim=-1, sorted=False)
            values = values.clamp_min_(0.0)
            strat = self.strategy(len(members), kb)
            if strat.kind != "gather":
                for i in members:
                    executed[i] = self.mlp.width
            # x[rows] is a copy, so each group writes back once it is done.
            out[rows] = self.mlp.run(u[rows], x[rows], idx, values, strat, self.dense_map, ws)
        ctx.executed[self.name] = kept.new_tensor(executed)
        return out, kept


# --------------------------------------------------------------------------- MAC counts


def _quadratic(fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> torch.Tensor:
    """Coefficients (c0, c1, c2) of a per-request count that is a polynomial of degree ≤ 2 in
    the length (every MAC formula is). Integer counts stay exact in float64."""
    v = fn(torch.tensor([0, 1, 2], device=device))  # (3,) float64
    c2 = (v[2] - 2 * v[1] + v[0]) / 2
    return torch.stack([v[0], v[1] - v[0] - c2, c2])


def _eval_quadratic(c: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    seq = lengths.to(torch.float64)
    return c[0] + seq * (c[1] + seq * c[2])  # (B,)


# --------------------------------------------------------------------------- plan


@dataclass
class _Attention:
    """Attention of one encoder layer with closed heads removed and z folded into ``proj``."""

    qkv_w: torch.Tensor  # (3·h·hd, D)
    qkv_b: torch.Tensor  # (3·h·hd,)
    proj_w: torch.Tensor  # (D, h·hd)
    proj_b: torch.Tensor  # (D,)
    heads: int
    head_dim: int

    def __call__(
        self,
        x: torch.Tensor,
        norm: nn.Module,
        attn_mask: torch.Tensor | None,
        ws: Workspace,
        out_name: str,
    ) -> torch.Tensor:
        """x (B, T, D) -> x + attention, in the workspace buffer ``out_name``."""
        b, t, d = x.shape
        out = ws.get(out_name, x.shape, x)
        if self.heads == 0:
            return torch.add(x, self.proj_b, out=out)
        width = self.heads * self.head_dim
        qkv = ws.get("qkv", (b, t, 3 * width), x)
        torch.addmm(self.qkv_b, norm(x).view(b * t, d), self.qkv_w.t(), out=qkv.view(b * t, -1))
        q, k, v = qkv.view(b, t, 3, self.heads, self.head_dim).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        ).transpose(1, 2)  # (B, T, h, hd)
        if not a.is_contiguous():
            a = ws.get("attn", a.shape, x).copy_(a)
        torch.addmm(self.proj_b, a.reshape(b * t, width), self.proj_w.t(), out=out.view(b * t, d))
        return out.add_(x)


def _fold_heads(layer: GatedEncoderLayer, z: torch.Tensor | None) -> _Attention:
    """Physically remove heads with z = 0; fold z into the output projection (SPEC §4)."""
    nh, hd, d = layer.num_heads, layer.head_dim, layer.d_model
    if z is None or bool((z == 1).all()):  # nothing to remove or fold: the model's weights
        return _Attention(
            qkv_w=layer.qkv.weight.detach(),
            qkv_b=layer.qkv.bias.detach(),
            proj_w=layer.proj.weight.detach(),
            proj_b=layer.proj.bias.detach(),
            heads=nh,
            head_dim=hd,
        )
    qkv_w = layer.qkv.weight.detach().view(3, nh, hd, d)
    qkv_b = layer.qkv.bias.detach().view(3, nh, hd)
    proj_w = layer.proj.weight.detach().view(d, nh, hd)
    keep = (z > 0).nonzero().flatten()
    scale = z[keep]
    h = int(keep.numel())
    return _Attention(
        qkv_w=qkv_w[:, keep].reshape(3 * h * hd, d).contiguous(),
        qkv_b=qkv_b[:, keep].reshape(-1).contiguous(),
        proj_w=(proj_w[:, keep] * scale.view(1, -1, 1)).reshape(d, h * hd).contiguous(),
        proj_b=layer.proj.bias.detach().contiguous(),
        heads=h,
        head_dim=hd,
    )


class SparsePlan:
    """A gated network compiled for one :class:`GateSettings`; call it like the network.

    ``plan(x (B, T, C_in), lengths (B,)) -> NetworkOutput`` with the reference's contract;
    ``settings`` may be passed again for drop-in use but must equal the compiled ones (only
    ``dynamic_weight`` and the policy matter). ``report`` lists the chosen strategies and the
    calibration timings (ms) per layer shape, batch size and k.

    A plan reuses its buffers and switches oneDNN off process-wide while it runs: run plans
    from one thread at a time (a server's compute thread). Where nothing is removed or folded
    (dense mode, attention with every head open at z = 1) the plan reads the model's own weight
    tensors: compile a new plan after changing them, as after loading new weights.
    """

    def __init__(
        self, model: GatedNetwork, settings: GateSettings, workspace: Workspace | None = None
    ) -> None:
        if not isinstance(model, GatedConvNet | GatedTransformer):
            raise TypeError(
                f"compile_plan supports the built-in conv and transformer networks, "
                f"not {type(model).__name__}"
            )
        self.model = model
        self.settings = settings
        self.device = next(model.parameters()).device
        self.is_conv = isinstance(model, GatedConvNet)
        self.layers: list[_GatedLayer] = []
        self.attention: list[_Attention] = []
        self.report: dict[str, dict[str, object]] = {}
        self._macs_coef: torch.Tensor | None = None
        self._dense_coef: torch.Tensor | None = None
        # MACs are affine in each gated layer's computed channels: base (3,) + Σ slope_l (L, 3)
        # · channels_l, each a quadratic in the length. None: count with the model's formula.
        self._macs_base: torch.Tensor | None = None
        self._macs_slopes: torch.Tensor | None = None
        self._head_kept: list[float] = []
        self._head_vecs: list[torch.Tensor] = []
        self._ws = workspace if workspace is not None else Workspace()

    # ------------------------------------------------------------------ running

    def __call__(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        settings: GateSettings | None = None,
    ) -> NetworkOutput:
        if settings is not None and settings != self.settings:
            raise ValueError(f"plan compiled for {self.settings}, called with {settings}")
        with _without_onednn(), torch.inference_mode():
            return self._forward(x, lengths)

    def _context(self, x: torch.Tensor, lengths: torch.Tensor) -> _Context:
        # Host lengths tell for free whether any request is padded; device lengths would sync.
        full = lengths.device.type == "cpu" and bool((lengths == x.shape[1]).all())
        mask = time_mask(lengths.to(x.device), x.shape[1])  # (B, T)
        mf = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        count = mf.sum(1).clamp_min(1.0)  # (B, 1)
        weights = (mf / count.unsqueeze(1)).transpose(1, 2)  # (B, 1, T)
        return _Context(mask, mf, count, weights, self._ws, full)

    def _forward(self, x: torch.Tensor, lengths: torch.Tensor) -> NetworkOutput:
        self.model.check_input(x, lengths)
        ctx = self._context(x, lengths)
        lengths = lengths.to(x.device)
        kept: dict[str, torch.Tensor] = {}
        logits = self._conv(x, ctx, kept) if self.is_conv else self._transformer(x, ctx, kept)
        with_predictor = self.settings.mode == "dynamic"
        if self._macs_coef is not None and not ctx.executed:
            macs = _eval_quadratic(self._macs_coef, lengths)
        elif self._macs_slopes is not None:
            ran_l = torch.stack(
                [ctx.executed.get(layer.name, kept[layer.name]) for layer in self.layers], 1
            ).to(torch.float64)  # (B, L) channels each layer computed
            seq = lengths.to(torch.float64)
            poly = torch.stack([torch.ones_like(seq), seq, seq * seq], 1)  # (B, 3)
            base = cast(torch.Tensor, self._macs_base)
            macs = poly @ base + (poly @ self._macs_slopes.t()).mul_(ran_l).sum(1)
        else:
            ran = {**kept, **{k: v.to(lengths.device) for k, v in ctx.executed.items()}}
            macs = self.model.count_macs(lengths, ran, with_predictor)
        dense = _eval_quadratic(cast(torch.Tensor, self._dense_coef), lengths)
        return NetworkOutput(logits, kept, macs, dense)

    def _conv(self, x: torch.Tensor, ctx: _Context, kept: dict[str, torch.Tensor]) -> torch.Tensor:
        model = cast(GatedConvNet, self.model)
        mf = ctx.mf
        h = _conv_same(x, model.stem, mf, ctx.ws)  # (B, T, C), contiguous
        for block, layer in zip(
            cast(Sequence[GatedConvBlock], model.blocks), self.layers, strict=True
        ):
            f = block.norm(h, ctx.mask) * mf  # (B, T, C); zero padding, as the conv's own
            u = _unfold(f, block.kernel_size, ctx.ws)  # (B, T, C·k)
            h, kept[layer.name] = layer.forward(f, u, h, ctx, self.settings)
            h.mul_(mf)
        pooled = (h * mf).sum(1) / ctx.count  # (B, C)
        return cast(torch.Tensor, model.head(pooled))

    def _transformer(
        self, x: torch.Tensor, ctx: _Context, kept: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        model = cast(GatedTransformer, self.model)
        b = x.shape[0]
        h = _conv_same(x, model.embed, ctx.mf, ctx.ws, zero_out=False)
        h.add_(model.pos[: x.shape[1]])  # (B, T, D), = model.embed_tokens
        # Without padding the key mask is all true: SDPA skips it.
        attn_mask = None if ctx.full else ctx.mask[:, None, None, :]  # (B, 1, 1, T)
        ffn_kept: dict[str, torch.Tensor] = {}
        for i, (enc, attn, layer) in enumerate(
            zip(
                cast(Sequence[GatedEncoderLayer], model.layers),
                self.attention,
                self.layers,
                strict=True,
            )
        ):
            # Attention writes the buffer that does not hold its input; the FFN adds in place.
            h = attn(h, enc.norm1, attn_mask, ctx.ws, f"res{i % 2}")
            kept[f"layers.{i}.heads"] = self._head_vecs[i].expand(b)
            f = enc.norm2(h)  # (B, T, D)
            h, ffn_kept[layer.name] = layer.forward(f, f, h, ctx, self.settings)
        kept.update(ffn_kept)  # the reference lists every layer's heads, then every FFN
        pooled = (model.norm(h) * ctx.mf).sum(1) / ctx.count  # (B, D)
        return cast(torch.Tensor, model.head(pooled))


def _unfold(f: torch.Tensor, kernel: int, ws: Workspace) -> torch.Tensor:
    """(B, T, C) -> (B, T, C·k): the same-padded conv's input windows, channel-major like the
    conv weight (H, C, k), so the conv is one matmul with W1 viewed (H, C·k)."""
    if kernel == 1:
        return f
    b, t, c = f.shape
    half = kernel // 2
    padded = F.pad(f, (0, 0, half, half))  # (B, T + k − 1, C)
    windows = padded.unfold(1, kernel, 1)  # (B, T, C, k), a view
    return ws.get("unfold", windows.shape, f).copy_(windows).view(b, t, c * kernel)


def _conv_same(
    x: torch.Tensor, conv: nn.Conv1d, mf: torch.Tensor, ws: Workspace, zero_out: bool = True
) -> torch.Tensor:
    """A same-padded ``nn.Conv1d`` over x (B, T, C_in) as one matmul over the unfolded windows
    -> (B, T, C_out); padding steps are zeroed in the input and, with ``zero_out``, the output.

    With a handful of input channels oneDNN's direct convolution is many times slower than
    this, and it compiles and caches a kernel per input shape.
    """
    b, t, _ = x.shape
    u = _unfold(x * mf, conv.kernel_size[0], ws)  # (B, T, C_in·k)
    w = conv.weight.detach().flatten(1)  # (C_out, C_in·k), a view
    bias = cast(torch.Tensor, conv.bias).detach()
    out = torch.addmm(bias, u.reshape(b * t, -1), w.t())  # (B·T, C_out)
    out = out.view(b, t, -1)
    return out.mul_(mf) if zero_out else out


def _layer_weights(
    model: GatedNetwork, i: int
) -> tuple[str, DynamicStructuredGate, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(model, GatedConvNet):
        block = cast(GatedConvBlock, model.blocks[i])
        w1 = block.conv1.weight.detach().flatten(1)  # (H, C·k)
        w2 = block.conv2.weight.detach().squeeze(-1)  # (C, H)
        b1, b2 = cast(torch.Tensor, block.conv1.bias), cast(torch.Tensor, block.conv2.bias)
        return f"blocks.{i}", block.gate, w1, b1, w2, b2
    layer = cast(GatedEncoderLayer, cast(GatedTransformer, model).layers[i])
    return (
        f"layers.{i}.ffn",
        layer.ffn_gate,
        layer.fc1.weight.detach(),  # (H, D)
        layer.fc1.bias,
        layer.fc2.weight.detach(),  # (D, H)
        layer.fc2.bias,
    )


def static_keep_mask(gate: DynamicStructuredGate, settings: GateSettings) -> torch.Tensor:
    """(n,) float 0/1: the reference's static-mode keep set (input independent)."""
    static = gate.static_values()  # (n,)
    final = static.unsqueeze(0)  # (1, n)
    hard = apply_keep_policy(
        final,
        static > 0,
        settings.keep_ratio,
        settings.threshold,
        settings.bucket,
        gate.static_gate.scores(),
    )
    return hard[0]


def compile_plan(
    model: GatedNetwork,
    settings: GateSettings,
    *,
    calibrate: bool = True,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    calib_length: int | None = None,
    reps: int = 5,
    threshold_ks: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    strategy: Strategy | None = None,
    workspace: Workspace | None = None,
) -> SparsePlan:
    """Compile ``model`` (eval mode, weights on their device) for ``settings``.

    Static keep sets are applied here once. For dynamic mode with a per-request global
    predictor, each layer's strategy is timed per batch size in ``batch_sizes`` and per k
    (the configured bucketed k, or with a threshold policy the bucketed k at each fraction of
    ``threshold_ks``) at ``calib_length`` steps (default min(max_length, 128)); at run time a
    batch uses the nearest calibrated batch size. ``calibrate=False`` uses the dense fallback
    for every (batch, k), which is always correct; ``strategy`` forces one strategy everywhere
    (tests and benchmarks of a single strategy). Plans that never run concurrently may share a
    ``workspace``.
    """
    model.eval()
    plan = SparsePlan(model, settings, workspace)
    mode = settings.mode
    dev = plan.device
    n_layers = (
        len(model.blocks)
        if isinstance(model, GatedConvNet)
        else len(cast(GatedTransformer, model).layers)
    )
    with torch.inference_mode():
        head_kept: list[float] = []
        if isinstance(model, GatedTransformer):
            for enc in cast(Sequence[GatedEncoderLayer], model.layers):
                z = None if mode == "dense" else enc.head_gate()  # (nh,)
                att = _fold_heads(enc, z)
                plan.attention.append(att)
                head_kept.append(float(att.heads))
        plan._head_kept = head_kept
        plan._head_vecs = [torch.tensor([v], device=dev) for v in head_kept]
        calib_cache: dict[tuple[object, ...], tuple[Strategy, dict[str, float]]] = {}
        for i in range(n_layers):
            name, gate, w1, b1, w2, b2 = _layer_weights(model, i)
            plan.layers.append(
                _compile_layer(
                    name,
                    gate,
                    w1,
                    b1,
                    w2,
                    b2,
                    settings,
                    calibrate,
                    batch_sizes,
                    calib_length or min(model.config.model.max_length, 128),
                    reps,
                    threshold_ks,
                    calib_cache,
                    plan.report,
                )
            )
            layer = plan.layers[-1]
            layer.forced = strategy
            if layer.kept_const is not None or layer.k is not None:
                value = layer.kept_const
                if value is None:
                    value = float(min(cast(int, layer.k), layer.n_open))
                layer.kept_vec = torch.tensor([value], device=dev)
        # Dense MACs always, executed MACs when every layer's kept count is input independent,
        # are quadratics in the length: two tensor ops per forward instead of dozens.
        full = {
            **{
                f"layers.{i}.heads": torch.tensor(
                    float(
                        cast(GatedEncoderLayer, cast(GatedTransformer, model).layers[i]).num_heads
                    )
                )
                for i in range(len(head_kept))
            },
            **{name: torch.tensor(float(w)) for name, w in model.gated_widths().items()},
        }

        def at(
            kept: dict[str, torch.Tensor], with_pred: bool
        ) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda seq: model.count_macs(
                seq,
                {n: v.to(dev).expand(seq.shape[0]) for n, v in kept.items()},
                with_pred,
            )

        plan._dense_coef = _quadratic(at(full, False), dev)
        if all(layer.kept_const is not None or layer.k is not None for layer in plan.layers) and (
            all(not layer.per_step for layer in plan.layers)
        ):
            const = {
                **{f"layers.{i}.heads": torch.tensor(v) for i, v in enumerate(head_kept)},
                **{
                    layer.name: torch.tensor(
                        layer.kept_const
                        if layer.kept_const is not None
                        else float(min(cast(int, layer.k), layer.n_open))
                    )
                    for layer in plan.layers
                },
            }
            plan._macs_coef = _quadratic(at(const, mode == "dynamic"), dev)
        _affine_macs(plan, at, head_kept)
    return plan


def _affine_macs(
    plan: SparsePlan,
    at: Callable[[dict[str, torch.Tensor], bool], Callable[[torch.Tensor], torch.Tensor]],
    head_kept: Sequence[float],
) -> None:
    """Fit executed MACs as base + Σ slope_l · channels_l (quadratics in the length), so that a
    forward whose channel counts vary (dense fallback, threshold policy) counts them in a few
    tensor ops. Checked against the model's formula at random counts; left unset if it differs."""
    dev = plan.device
    with_pred = plan.settings.mode == "dynamic"
    heads = {f"layers.{i}.heads": torch.tensor(v) for i, v in enumerate(head_kept)}
    names = [layer.name for layer in plan.layers]
    zero = {**heads, **{n: torch.tensor(0.0) for n in names}}
    base = _quadratic(at(zero, with_pred), dev)
    slopes = torch.stack(
        [_quadratic(at({**zero, n: torch.tensor(1.0)}, with_pred), dev) - base for n in names]
    )  # (L, 3)
    gen = torch.Generator().manual_seed(0)
    probe = {n: torch.randint(0, 64, (), generator=gen).double() for n in names}
    seq = torch.tensor([3.0, 17.0, 40.0], dtype=torch.float64, device=dev)
    expected = at({**heads, **probe}, with_pred)(seq)
    poly = torch.stack([torch.ones_like(seq), seq, seq * seq], 1)
    counts = torch.stack([probe[n] for n in names]).to(dev)  # (L,)
    fitted = poly @ base + (poly @ slopes.t()) @ counts
    if torch.allclose(fitted, expected.to(torch.float64), rtol=1e-9, atol=0.5):
        plan._macs_base, plan._macs_slopes = base, slopes


def _compile_layer(
    name: str,
    gate: DynamicStructuredGate,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    settings: GateSettings,
    calibrate: bool,
    batch_sizes: Sequence[int],
    calib_length: int,
    reps: int,
    threshold_ks: Sequence[float],
    cache: dict[tuple[object, ...], tuple[Strategy, dict[str, float]]],
    report: dict[str, dict[str, object]],
) -> _GatedLayer:
    n = gate.n
    if settings.mode == "dense":
        return _GatedLayer(name, _GatedMLP(w1, b1, w2, b2, None), gate, n, kept_const=float(n))
    static = gate.static_values()  # (n,)
    open_mask = static > 0
    n_open = int(open_mask.sum())
    dynamic = settings.mode == "dynamic" and gate.predictor is not None
    if not dynamic:
        # Input-independent keep set: remove the others now, fold z into W2's columns.
        keep = static_keep_mask(gate, settings) > 0
        rows = keep.nonzero().flatten()
        mlp = _GatedMLP(w1, b1, w2, b2, rows, scale=static)
        return _GatedLayer(name, mlp, gate, n_open, kept_const=float(rows.numel()))
    open_rows = open_mask.nonzero().flatten()  # (n_open,)
    all_open = n_open == n
    dense_map = None
    if not all_open:
        dense_map = torch.zeros(n, dtype=torch.long, device=static.device)
        dense_map[open_rows] = torch.arange(n_open, device=static.device)
    mlp = _GatedMLP(w1, b1, w2, b2, None if all_open else open_rows, packed=True)
    w = gate.dynamic_weight if settings.dynamic_weight is None else settings.dynamic_weight
    assert gate.predictor is not None
    layer = _GatedLayer(
        name,
        mlp,
        gate,
        n_open,
        predictor=_FastPredictor(gate.predictor),
        per_step=gate.per_step,
        open_rows=None if all_open else open_rows,
        closed=None if all_open else ~open_mask,
        dense_map=dense_map,
        static_part=(1.0 - w) * static,
        weighted_static=w * static,
    )
    if settings.keep_ratio is not None:
        layer.k = bucketed_k(settings.keep_ratio, n_open, settings.bucket)
        ks = [layer.k]
    elif settings.threshold is not None:
        ks = sorted({bucketed_k(r, n_open, settings.bucket) for r in threshold_ks})
    else:
        layer.k = n_open  # no policy: every open channel, scaled by its final gate
        ks = []
    if gate.per_step or not calibrate:
        return layer
    for batch in batch_sizes:
        for k in ks:
            if k >= n_open or k == 0:
                continue
            key = (
                tuple(mlp.packed.shape) if mlp.packed is not None else None,
                n_open,
                calib_length,
                batch,
                k,
            )
            if key not in cache:
                cache[key] = _calibrate(mlp, open_rows, dense_map, batch, k, calib_length, reps)
            best, times = cache[key]
            layer.strategies[(batch, k)] = best
            report.setdefault(name, {})[f"b{batch}/k{k}"] = {"chosen": str(best), **times}
    return layer
