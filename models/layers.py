"""Gated layers: the unit the sparse machinery understands, in any network.

A **gated layer** is a structure whose channels (or heads) a gate may close:

- :class:`GatedFFN`: an FFN pair, input projection(s) → elementwise activation → output
  projection. The projections are :class:`GatedLinear` (``nn.Linear``'s parameters) or
  :class:`GatedConv1d` (a conv k in, a conv 1×1 out); the GLU form has two input projections
  (gate and up, multiplied after the activation). Its hidden channels are gated statically and
  per request by a :class:`models.gates.DynamicStructuredGate`.
- :class:`HeadGatedAttention`: multi-head self-attention whose heads are gated statically.

The projections replace ``nn.Linear`` / ``nn.Conv1d`` modules *in place* and keep their
parameter names, so a user's forward (``self.fc2(self.act(self.fc1(x)))``) and state dict stay
as they were. What a projection computes depends on the forward pass it runs in, found through
a per-thread context that :class:`models.networks.GatedNetwork` opens:

- no context (a module called on its own): the plain dense layer;
- a reference forward: the dense computation with the hard mask multiplied in (the masked
  reference, used for training and as the ground truth of the plans);
- a compiled plan (:mod:`models.sparse`): the layer's executor, which computes only the kept
  channels; the input projection hands a compact ``(B, T, k)`` tensor through the user's
  activation to the output projection, which reads the same kept indices.

Lengths reach every gated layer without the user's forward changing: the context maps a padded
time size to per-request lengths, seeded with the network input's and extended by
:func:`track_lengths` hooks on modules that change the time resolution (strided or unpadded
convolutions, pooling), using each module's own length formula.

:func:`attach_gates` gates every FFN of a plain ``nn.Module`` (found by pattern or named).
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.errors import ArchitectureError, InvalidInputError
from models.gate_config import GateSettings
from models.gates import DynamicStructuredGate, RunValues, StaticGate
from models.predictor import time_mask

if TYPE_CHECKING:
    from models.sparse.plan import SparsePlan


# --------------------------------------------------------------------------- forward context


@dataclass
class Record:
    """What one gated layer did in one forward, per request (B,)."""

    kept: torch.Tensor  # channels (or heads) the gate kept
    executed: torch.Tensor  # channels computed (≥ kept: dense fallback, bucket padding)
    length: torch.Tensor  # time steps at the layer's hidden resolution
    pred_length: torch.Tensor | None  # time steps the predictor read; None: it did not run
    # Input-independent counts (static, dense, fixed k): the MAC count then has a closed form.
    const: tuple[float, float] | None = None
    # Later calls of the same layer in one forward (a block applied twice): their MACs count too.
    more: list[Record] = field(default_factory=list)

    def calls(self) -> list[Record]:
        return [self, *self.more]


class Forward:
    """One forward pass of a gated network: settings, lengths, plan, what each layer did."""

    __slots__ = (
        "_masks",
        "ambiguous",
        "batch",
        "calls",
        "full_length",
        "handoff",
        "lengths",
        "padded",
        "plan",
        "records",
        "settings",
        "values",
    )

    def __init__(
        self,
        settings: GateSettings,
        batch: int,
        full_length: int,
        lengths: dict[int, torch.Tensor],
        padded: bool,
        plan: SparsePlan | None = None,
        rows: Sequence[GateSettings] | None = None,
    ) -> None:
        self.settings = settings
        # The blend weight and threshold of each row (``rows``: one settings per row, for a
        # batch whose requests asked for different values of one plan).
        self.values = RunValues(settings, rows, batch, lengths[full_length].device)
        self.batch = batch
        self.full_length = full_length  # padded T of the network input
        self.lengths = lengths  # padded time size -> (B,) lengths
        self.padded = padded  # some request is shorter than the padded input
        self.plan = plan
        self.records: dict[GatedLayer, Record] = {}
        self.handoff: dict[GatedLayer, Any] = {}  # input side -> output side of a layer
        self.ambiguous: set[int] = set()
        self._masks: dict[int, tuple[torch.Tensor, ...]] = {}

    def record(self, layer: GatedLayer, rec: Record) -> None:
        """What ``layer`` did; a second call of the layer in this forward adds to the first."""
        first = self.records.get(layer)
        if first is None:
            self.records[layer] = rec
        else:
            first.more.append(rec)

    def lengths_at(self, t: int, where: str) -> torch.Tensor:
        """(B,) lengths of a tensor whose padded time size is ``t``."""
        found = self.lengths.get(t)
        if found is not None and t not in self.ambiguous:
            return found
        if not self.padded:  # no request is padded: every step is valid
            full = torch.full((self.batch,), t, dtype=torch.long)
            self.lengths[t] = full.to(self.lengths[self.full_length].device)
            return self.lengths[t]
        raise InvalidInputError(
            f"{where}: cannot tell per-request lengths at time size {t} (network input "
            f"{self.full_length}); pad requests to one length or make the module that changes "
            "the time resolution a Conv1d/pooling layer whose lengths can be derived"
        )

    def mask_at(self, t: int, where: str) -> tuple[torch.Tensor, ...]:
        """(mask (B, T) bool, mf (B, T, 1), count (B, 1), step_weights (B, 1, T)) at size t."""
        got = self._masks.get(t)
        if got is None:
            lengths = self.lengths_at(t, where)
            mask = time_mask(lengths, t)
            mf = mask.unsqueeze(-1).float()
            count = mf.sum(1).clamp_min(1.0)
            weights = (mf / count.unsqueeze(1)).transpose(1, 2)
            got = self._masks[t] = (mask, mf, count, weights)
        return got


_LOCAL = threading.local()


def current() -> Forward | None:
    """The forward pass running on this thread, or None outside a gated network's forward."""
    stack: list[Forward] | None = getattr(_LOCAL, "stack", None)
    return stack[-1] if stack else None


class forward_context:  # noqa: N801 - used like contextlib's context managers
    """``with forward_context(fwd):`` makes ``fwd`` the current forward of this thread (a
    class, not a generator: it runs on every forward, and costs less)."""

    __slots__ = ("fwd", "stack")

    def __init__(self, fwd: Forward) -> None:
        self.fwd = fwd
        stack = getattr(_LOCAL, "stack", None)
        if stack is None:
            stack = _LOCAL.stack = []
        self.stack: list[Forward] = stack

    def __enter__(self) -> Forward:
        self.stack.append(self.fwd)
        return self.fwd

    def __exit__(self, *exc: object) -> None:
        self.stack.pop()


def _out_length(
    length: torch.Tensor, k: int, s: int, p: int, d: int, ceil: bool = False
) -> torch.Tensor:
    """Valid output steps of a conv/pool over ``length`` valid input steps (PyTorch formula;
    with ``ceil_mode`` a last window may start in the input or its left padding only)."""
    span = length + 2 * p - d * (k - 1) - 1
    if not ceil:
        return torch.div(span, s, rounding_mode="floor").add(1).clamp(0)
    out = torch.div(span + s - 1, s, rounding_mode="floor").add(1)
    out = out - ((out - 1) * s >= length + p).long()
    return out.clamp(0)


def _length_hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
    fwd = current()
    if fwd is None or not fwd.padded or not args or not isinstance(out, torch.Tensor):
        return
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return
    t_in, t_out = x.shape[-1], out.shape[-1]
    lengths = fwd.lengths.get(t_in)
    if lengths is None or t_in in fwd.ambiguous:
        return
    k, s, p, d = _window(module)
    derived = _out_length(lengths, k, s, p, d, bool(getattr(module, "ceil_mode", False)))
    known = fwd.lengths.get(t_out)
    if known is None:
        fwd.lengths[t_out] = derived
    elif not torch.equal(known, derived):
        fwd.ambiguous.add(t_out)


def _window(m: nn.Module) -> tuple[int, int, int, int]:
    def one(v: Any) -> int:
        return int(v[0] if isinstance(v, tuple | list) else v)

    if isinstance(m, nn.Conv1d):
        pad = 0 if m.padding == "valid" else one(m.padding)
        return one(m.kernel_size), one(m.stride), pad, one(m.dilation)
    if isinstance(m, nn.MaxPool1d):
        return one(m.kernel_size), one(m.stride), one(m.padding), one(m.dilation)
    if isinstance(m, nn.AvgPool1d):
        return one(m.kernel_size), one(m.stride), one(m.padding), 1
    raise TypeError(type(m).__name__)


def track_lengths(module: nn.Module) -> int:
    """Hook every 1-D conv and pooling module of ``module`` that changes the time resolution,
    so gated layers after it see exact per-request lengths. Returns the product of their
    strides: lengths at every resolution are affine in the input length on each residue class
    modulo it (what the MAC fit of :mod:`models.flops` relies on)."""
    period = 1
    for m in module.modules():
        if isinstance(m, GatedConv1d) or not isinstance(m, nn.Conv1d | nn.MaxPool1d | nn.AvgPool1d):
            continue
        if isinstance(m, nn.Conv1d) and m.padding == "same":
            continue  # keeps the length (stride 1 by PyTorch's rule)
        k, s, p, d = _window(m)
        if s == 1 and 2 * p == d * (k - 1):
            continue  # same length in, same length out
        m.register_forward_hook(_length_hook)
        period *= s
    return period


# --------------------------------------------------------------------------- projections


class _Projection(nn.Module):
    """A linear map over channels that a gated layer owns. Holds the weight as ``nn.Linear`` or
    ``nn.Conv1d`` did (same parameter names), and asks its layer what to compute."""

    weight: torch.Tensor  # an nn.Parameter
    bias: torch.Tensor | None
    role: str  # "in" (first input projection), "up" (GLU's second), "out"
    channel_last: bool  # Linear: (B, ..., C); Conv1d: (B, C, T)

    def __init__(self) -> None:
        super().__init__()
        self.role = "in"
        object.__setattr__(self, "_layer", None)  # plain reference: not a submodule

    @property
    def layer(self) -> GatedFFN | None:
        return cast("GatedFFN | None", self.__dict__.get("_layer"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        fwd = current()
        if layer is None or fwd is None:
            return self.dense(x)
        return layer.project(self, x, fwd)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def in_features(self) -> int:  # per output channel, per step (C·k for a conv)
        return int(self.weight[0].numel())

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


class GatedLinear(_Projection):
    """``nn.Linear``'s parameters (``weight`` (out, in), ``bias``) as a gated layer's projection."""

    channel_last = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        lin = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight = lin.weight
        self.bias = lin.bias

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> GatedLinear:
        new = cls.__new__(cls)
        _Projection.__init__(new)
        new.weight = lin.weight  # the same Parameter: no copy, same state-dict name
        new.bias = lin.bias
        return new

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, role={self.role}"


class GatedConv1d(_Projection):
    """``nn.Conv1d``'s parameters (groups 1) as a projection: the conv k into the gated hidden
    channels, or the 1×1 conv out of them. Inputs are (B, C, T) as for ``nn.Conv1d``."""

    channel_last = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        conv = nn.Conv1d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            bias=bias,
            device=device,
        )
        self._take(conv)

    def _take(self, conv: nn.Conv1d) -> None:
        if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ArchitectureError(
                "a gated Conv1d needs groups=1, integer padding and zero padding mode"
            )
        self.weight = conv.weight
        self.bias = conv.bias
        self.kernel_size = int(conv.kernel_size[0])
        self.stride = int(conv.stride[0])
        self.padding = int(conv.padding[0])
        self.dilation = int(conv.dilation[0])

    @classmethod
    def from_conv(cls, conv: nn.Conv1d) -> GatedConv1d:
        new = cls.__new__(cls)
        _Projection.__init__(new)
        new._take(conv)
        return new

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        w = self.weight.shape
        return f"{w[1]} -> {w[0]}, kernel {self.kernel_size}, role={self.role}"


class UnfoldConv1d(nn.Conv1d):
    """An ``nn.Conv1d`` (groups 1) that a compiled plan runs as one matmul over the unfolded
    input windows. With a handful of input channels ATen's and oneDNN's direct convolutions are
    many times slower than that, and oneDNN caches a kernel per input shape. Outside a plan it
    is the plain ``nn.Conv1d``; any network may use it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, T) -> (B, C_out, T'), as ``nn.Conv1d``."""
        return self.steps(x.transpose(1, 2)).transpose(1, 2)

    def steps(self, x: torch.Tensor) -> torch.Tensor:
        """The same conv over x (B, T, C_in) -> (B, T', C_out), without transposes in a plan."""
        fwd = current()
        if fwd is not None and fwd.plan is not None and self.groups == 1:
            return fwd.plan.conv(self, x)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


# --------------------------------------------------------------------------- gated layers


class GatedLayer:
    """Base of the gated layer types: a named structure with ``n`` gated units."""

    name: str
    n: int

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def macs(
        self, length: torch.Tensor, channels: torch.Tensor, pred_length: torch.Tensor | None
    ) -> torch.Tensor:
        """MACs per request (B,) float64 of ``channels`` units over ``length`` steps, plus the
        predictor's over ``pred_length`` steps when it ran."""
        raise NotImplementedError


def activation_kind(act: Callable[..., Any] | None) -> str | None:
    """``"gelu"`` (exact), ``"relu"`` or None (any other elementwise function, run as given)."""
    if isinstance(act, nn.GELU) and act.approximate == "none" or act is F.gelu:
        return "gelu"
    if isinstance(act, nn.ReLU) or act is F.relu or act is torch.relu:
        return "relu"
    return None


class GatedFFN(GatedLayer):
    """An FFN pair with its hidden channels gated: ``fc2(act(fc1(x)) [· up(x)])``.

    ``inputs`` are the input projections (one, or two for the GLU form: gate then up), ``output``
    the output projection, ``act`` the elementwise activation between them (applied to the
    first input projection), ``gate`` the channels' :class:`DynamicStructuredGate`. The layer
    registers nothing: its projections and gate live in the network's module tree (so its
    state dict keeps the names the network gave them); it only references them.

    ``layout``: ``"batch_first"`` (B, T, C) / (B, C) / (B, C, T) for convs, or ``"time_first"``
    (T, B, C) as ``nn.TransformerEncoderLayer(batch_first=False)`` feeds its FFN.
    """

    def __init__(
        self,
        name: str,
        inputs: Sequence[_Projection],
        output: _Projection,
        gate: DynamicStructuredGate,
        act: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dropout: nn.Module | None = None,
        layout: str = "batch_first",
    ) -> None:
        if not 1 <= len(inputs) <= 2:
            raise ArchitectureError(f"{name}: an FFN has one input projection, or two (GLU)")
        n = inputs[0].out_features
        for p in inputs:
            if p.out_features != n:
                raise ArchitectureError(f"{name}: input projections differ in width")
        if output.in_features != n and not (
            isinstance(output, GatedConv1d) and output.weight.shape[1] == n
        ):
            raise ArchitectureError(
                f"{name}: output projection reads {output.in_features} channels, the input "
                f"projection writes {n}"
            )
        if isinstance(output, GatedConv1d) and (
            output.kernel_size,
            output.stride,
            output.padding,
            output.dilation,
        ) != (1, 1, 0, 1):
            raise ArchitectureError(
                f"{name}: the output conv of a gated pair must be 1×1, stride 1, no padding"
            )
        geometry = {
            (p.kernel_size, p.stride, p.padding, p.dilation)
            for p in inputs
            if isinstance(p, GatedConv1d)
        }
        if len(geometry) > 1:
            raise ArchitectureError(f"{name}: the GLU input convs differ in kernel or stride")
        if gate.n != n:
            raise ArchitectureError(f"{name}: gate has {gate.n} channels, the layer {n}")
        self.name = name
        self.n = n
        self.inputs = list(inputs)
        self.output = output
        self.gate = gate
        self.act = act
        self.act_kind = activation_kind(act) if act is not None else "identity"
        self.dropout = dropout
        self.layout = layout
        self.glu = len(inputs) == 2
        roles = ("in", "up")
        for p, role in zip(self.inputs, roles, strict=False):
            p.role = role
            object.__setattr__(p, "_layer", self)
        output.role = "out"
        object.__setattr__(output, "_layer", self)

    # ------------------------------------------------------------------ facts

    @property
    def conv(self) -> bool:
        return isinstance(self.inputs[0], GatedConv1d)

    def macs(
        self, length: torch.Tensor, channels: torch.Tensor, pred_length: torch.Tensor | None
    ) -> torch.Tensor:
        per_channel = sum(p.in_features for p in self.inputs) + self.output.out_features
        out = length.to(torch.float64) * channels.to(torch.float64) * float(per_channel)
        if pred_length is not None and self.gate.predictor is not None:
            out = out + self.gate.predictor.macs(pred_length)
        return out

    def select_channels(self, rows: torch.Tensor | None, n: int | None = None) -> None:
        """Keep only channels ``rows`` (or make the layer ``n`` channels wide, values to be
        loaded), in place: projections, static gate and predictor output (export)."""
        width = int(rows.numel()) if rows is not None else int(n or 0)
        for p in self.inputs:
            _select(p, "weight", 0, rows, width)
            _select(p, "bias", 0, rows, width)
        _select(self.output, "weight", 1, rows, width)
        gate = self.gate
        for pname, _ in list(gate.static_gate.named_parameters(recurse=False)):
            _select(gate.static_gate, pname, 0, rows, width)
        if gate.predictor is not None:
            _select(gate.predictor.fc2, "weight", 0, rows, width)
            _select(gate.predictor.fc2, "bias", 0, rows, width)
            gate.predictor.out_channels = width
        gate.n = width
        self.n = width

    # ------------------------------------------------------------------ layouts

    def to_steps(self, x: torch.Tensor, proj: _Projection) -> torch.Tensor:
        """A projection's input or output as (B, T, C) (a view where possible)."""
        if not proj.channel_last:
            return x.transpose(1, 2)  # (B, C, T) -> (B, T, C)
        if self.layout == "time_first":
            return x.transpose(0, 1)  # (T, B, C) -> (B, T, C)
        if x.dim() == 2:
            return x.unsqueeze(1)  # (B, C): one step
        if x.dim() > 3:
            return x.flatten(1, -2)
        return x

    def from_steps(self, y: torch.Tensor, like: torch.Tensor, proj: _Projection) -> torch.Tensor:
        """Inverse of :meth:`to_steps` for an output with ``like``'s leading layout."""
        if not proj.channel_last:
            return y.transpose(1, 2)
        if self.layout == "time_first":
            return y.transpose(0, 1)
        if like.dim() == 2:
            return y.squeeze(1)
        if like.dim() > 3:
            return y.reshape(*like.shape[:-1], y.shape[-1])
        return y

    def steps_of(self, x: torch.Tensor, proj: _Projection, fwd: Forward) -> int:
        if not proj.channel_last:
            t = x.shape[-1]
        elif self.layout == "time_first":
            t = x.shape[0]
        elif x.dim() == 2:
            return 1
        else:
            t = math.prod(x.shape[1:-1])
        b = x.shape[1] if (proj.channel_last and self.layout == "time_first") else x.shape[0]
        if b != fwd.batch:
            raise InvalidInputError(
                f"gated layer {self.name}: expected the batch ({fwd.batch}) as dimension "
                f"{1 if self.layout == 'time_first' else 0} of {list(x.shape)}"
            )
        return int(t)

    def lengths(self, t: int, fwd: Forward) -> torch.Tensor:
        if t == 1 and 1 not in fwd.lengths:
            return fwd.lengths_at(fwd.full_length, self.name).clamp(max=1)
        return fwd.lengths_at(t, self.name)

    # ------------------------------------------------------------------ running

    def project(self, proj: _Projection, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
        """One projection's call inside a forward: the plan's executor or the reference."""
        if fwd.plan is not None:
            return fwd.plan.ffn(self, proj, x, fwd)
        return self._reference(proj, x, fwd)

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, steps: bool = False
    ) -> torch.Tensor:
        """The whole layer at once: ``[residual +] fc2(act(fc1(x)) [· up(x)])``. Inside a plan
        one fused executor (matmul and activation in one kernel where torch has one, the
        residual accumulated in place: pass it only when it is not needed afterwards).
        ``steps``: x, residual and the result are (B, T, C) whatever the projections' own
        layout (a conv pair then needs no transposes around it)."""
        fwd = current()
        if fwd is not None and fwd.plan is not None:
            return fwd.plan.ffn_fused(self, x, residual, fwd, steps)
        if steps and not self.inputs[0].channel_last:
            ych = self(x.transpose(1, 2))  # (B, C, T)
            return ych.transpose(1, 2) if residual is None else residual + ych.transpose(1, 2)
        h = self.inputs[0](x)
        h = self.act(h) if self.act is not None else h
        if self.glu:
            h = h * self.inputs[1](x)
        if self.dropout is not None:
            h = self.dropout(h)
        y: torch.Tensor = self.output(h)
        return y if residual is None else residual + y

    def _reference(self, proj: _Projection, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
        """The masked reference: dense projections, the hard mask multiplied into the hidden
        channels before the output projection. Shares no code with the executors."""
        if proj.role == "in":
            steps = self.to_steps(x, proj)  # (B, T, C)
            t = self.steps_of(x, proj, fwd)
            lengths = self.lengths(t, fwd)
            mask = time_mask(lengths, steps.shape[1])
            gate, kept = self.gate(steps, mask, fwd.settings, fwd.values)
            y = proj.dense(x)
            t_hidden = self.steps_of(y, proj, fwd)
            h_len = self.lengths(t_hidden, fwd) if t_hidden != t else lengths
            fwd.handoff[self] = gate
            dynamic = fwd.settings.mode == "dynamic" and self.gate.predictor is not None
            fwd.record(self, Record(kept, kept, h_len, lengths if dynamic else None))
            return y
        if proj.role == "up":
            return proj.dense(x)
        gate = fwd.handoff.get(self)
        if gate is not None:
            h = self.to_steps(x, proj)
            if gate.shape[1] != 1 and gate.shape[1] != h.shape[1]:
                raise InvalidInputError(
                    f"gated layer {self.name}: per-step gates over {gate.shape[1]} steps, "
                    f"hidden has {h.shape[1]}"
                )
            x = self.from_steps(h * gate, x, proj)
        return proj.dense(x)


def _select(module: nn.Module, attr: str, dim: int, rows: torch.Tensor | None, n: int) -> None:
    """Replace ``module.attr`` by its ``rows`` along ``dim`` (or zeros of width ``n``)."""
    old = getattr(module, attr)
    if old is None:
        return
    if rows is not None:
        data = old.detach().index_select(dim, rows.to(old.device)).clone()
    else:
        shape = list(old.shape)
        shape[dim] = n
        data = old.detach().new_zeros(shape)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(data, requires_grad=old.requires_grad))
    else:
        module.register_buffer(attr, data)


class HeadGatedAttention(GatedLayer):
    """Multi-head self-attention with statically gated heads: ``proj(concat_h z_h · head_h)``.

    ``qkv`` is a (3·D, D) projection, ``proj`` the (D, D) output projection, ``head_gate`` the
    static gate over ``num_heads`` heads. Keys of padding steps are never attended. A closed
    head (z = 0) is removed by the plans; z is folded into the output projection.
    """

    def __init__(
        self,
        name: str,
        qkv: nn.Linear,
        proj: nn.Linear,
        head_gate: StaticGate,
        num_heads: int,
    ) -> None:
        self.name = name
        self.qkv, self.proj, self.head_gate = qkv, proj, head_gate
        self.n = self.num_heads = num_heads
        self.d_model = proj.out_features
        self.head_dim = self.d_model // num_heads
        object.__setattr__(head_gate, "_layer", self)

    def macs(
        self, length: torch.Tensor, channels: torch.Tensor, pred_length: torch.Tensor | None
    ) -> torch.Tensor:
        seq = length.to(torch.float64)
        width = channels.to(torch.float64) * self.head_dim
        return seq * self.d_model * 4.0 * width + 2.0 * seq * seq * width

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> [residual +] attention (B, T, D)."""
        fwd = current()
        if fwd is None:
            raise RuntimeError(f"{self.name}: call it inside a gated network's forward")
        if fwd.plan is not None:
            return fwd.plan.attention(self, x, residual, fwd)
        b, t, d = x.shape
        lengths = fwd.lengths_at(t, self.name)
        mask = time_mask(lengths, t)
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask[:, None, None, :],
        )  # (B, nh, T, hd)
        if fwd.settings.mode == "dense":
            heads = torch.full((b,), float(self.num_heads), device=x.device)
        else:
            z = self.head_gate()  # (nh,)
            a = a * z.view(1, -1, 1, 1)
            heads = (z > 0).sum().float().expand(b)
        fwd.record(self, Record(heads, heads, lengths, None))
        y: torch.Tensor = self.proj(a.transpose(1, 2).reshape(b, t, d))
        return y if residual is None else residual + y


def gated_layers(module: nn.Module) -> list[GatedLayer]:
    """Every gated layer of ``module``, in module order (each once)."""
    seen: dict[int, GatedLayer] = {}
    for m in module.modules():
        layer = m.__dict__.get("_layer")
        if isinstance(layer, GatedLayer) and id(layer) not in seen:
            anchor = (
                layer.inputs[0]
                if isinstance(layer, GatedFFN)
                else cast(HeadGatedAttention, layer).head_gate
            )
            if m is anchor:
                seen[id(layer)] = layer
    return list(seen.values())


# --------------------------------------------------------------------------- attach_gates


def _is_linear(m: object) -> bool:
    return isinstance(m, nn.Linear) and not isinstance(
        m, nn.modules.linear.NonDynamicallyQuantizableLinear
    )


# Elementwise activation modules an FFN pattern may have between its two linears.
_ACTIVATIONS = (
    nn.GELU,
    nn.ReLU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
    nn.Identity,
)


def _gate_for(
    n: int, in_channels: int, cfg: ModelConfig, like: torch.Tensor
) -> DynamicStructuredGate:
    gate = DynamicStructuredGate(n, in_channels, cfg, device=like.device)
    return gate.to(like.dtype)


def make_ffn(
    name: str,
    owner: nn.Module,
    attrs: Sequence[str],
    cfg: ModelConfig,
    act: Callable[[torch.Tensor], torch.Tensor] | None,
    layout: str = "batch_first",
) -> GatedFFN:
    """Gate the FFN of ``owner`` whose projections are its attributes ``attrs``
    (``[fc1, fc2]`` or ``[gate, up, down]``): each is replaced in place by a gated projection
    holding the same parameters; the gate is registered on the first as ``.gate``."""
    projs: list[_Projection] = []
    for attr in attrs:
        m = owner.get_submodule(attr)
        if isinstance(m, _Projection):
            raise ArchitectureError(f"{name}.{attr}: already gated")
        if isinstance(m, nn.Linear):
            p: _Projection = GatedLinear.from_linear(m)
        elif isinstance(m, nn.Conv1d):
            p = GatedConv1d.from_conv(m)
        else:
            raise ArchitectureError(
                f"{name}.{attr}: a gated FFN projection must be nn.Linear or nn.Conv1d, "
                f"got {type(m).__name__}"
            )
        projs.append(p)
    if any(type(p) is not type(projs[0]) for p in projs):
        raise ArchitectureError(f"{name}: projections mix Linear and Conv1d")
    first = projs[0]
    d_in = first.weight.shape[1]
    gate = _gate_for(first.out_features, d_in, cfg, first.weight)
    for attr, p in zip(attrs, projs, strict=True):
        parent, _, leaf = attr.rpartition(".")
        setattr(owner.get_submodule(parent) if parent else owner, leaf, p)
    first.gate = gate  # registered: its parameters are saved as <fc1>.gate.*
    return GatedFFN(name, projs[:-1], projs[-1], gate, act=act, layout=layout)


class _GatedSequentialFFN(nn.Module):
    """``nn.Sequential(Linear, act, [Dropout], Linear)`` gated: same children, same names."""

    def __init__(self, seq: nn.Sequential, cfg: ModelConfig, name: str) -> None:
        super().__init__()
        for key, child in seq.named_children():
            self.add_module(key, child)
        keys = list(dict(seq.named_children()))
        act_key = keys[1]
        drop = next(
            (getattr(self, k) for k in keys[2:-1] if isinstance(getattr(self, k), nn.Dropout)), None
        )
        self._ffn = make_ffn(name, self, [keys[0], keys[-1]], cfg, getattr(self, act_key))
        self._ffn.dropout = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ffn(x)


def _sequential_ffn(seq: nn.Sequential) -> bool:
    kids = list(seq.children())
    if len(kids) not in (3, 4) or not (_is_linear(kids[0]) and _is_linear(kids[-1])):
        return False
    if not isinstance(kids[1], _ACTIVATIONS) or isinstance(kids[1], nn.Identity):
        return False
    return len(kids) == 3 or isinstance(kids[2], nn.Dropout)


class _GatedEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` whose FFN is gated. Its inference fast path calls neither
    linear (one fused kernel), so this class always takes the layer's own slow path, with the
    gated FFN in ``_ff_block`` and padding as a key padding mask."""

    _gated_ffn: GatedFFN

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        fwd = current()
        if src_key_padding_mask is None and fwd is not None and fwd.padded:
            t = src.shape[1] if self.self_attn.batch_first else src.shape[0]
            src_key_padding_mask = ~time_mask(fwd.lengths_at(t, "encoder layer"), t)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.dropout2(self._gated_ffn(x)))


class _GatedEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` without its nested-tensor fast path (it would hand the layers
    nested tensors, and its layers are gated)."""

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        out = src
        for mod in self.layers:
            out = mod(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask)
        return out if self.norm is None else cast(torch.Tensor, self.norm(out))


def _gate_encoder_layer(layer: nn.TransformerEncoderLayer, cfg: ModelConfig, name: str) -> GatedFFN:
    layout = "batch_first" if layer.self_attn.batch_first else "time_first"
    act = layer.activation
    ffn = make_ffn(name, layer, ["linear1", "linear2"], cfg, act, layout=layout)
    ffn.dropout = layer.dropout
    layer.__class__ = _GatedEncoderLayer
    cast(_GatedEncoderLayer, layer)._gated_ffn = ffn
    return ffn


_ACT_FUNCTIONS = {
    F.gelu,
    F.relu,
    torch.relu,
    F.silu,
    torch.tanh,
    torch.sigmoid,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.hardswish,
    F.softplus,
}
_ACT_METHODS = {"relu", "sigmoid", "tanh"}


def _trace(module: nn.Module) -> Any:
    """The fx graph of ``module.forward`` with its children as leaves, or None if untraceable."""
    try:
        import torch.fx as fx

        class _Leaves(fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return m is not module

        return _Leaves().trace(module)
    except Exception:  # noqa: BLE001 - any untraceable forward: the caller decides
        return None


def _ffns_in_graph(module: nn.Module, graph: Any, where: str) -> list[tuple[list[str], Any]]:
    """FFNs by data flow: ``Linear → activation → [Dropout] → Linear`` and the GLU form
    ``Linear(act(Linear_a(x)) · Linear_b(x))``; -> [([attrs], act)]."""
    import operator

    children = dict(module.named_children())

    def child(node: Any) -> nn.Module | None:
        if getattr(node, "op", None) == "call_module":
            return children.get(str(node.target))
        return None

    def is_linear(node: Any) -> bool:
        return _is_linear(child(node))

    def single(node: Any) -> bool:
        # The hidden channels must flow only into the output projection: in a plan they are
        # a compact (B, T, k) tensor that nothing else could read correctly.
        return len(getattr(node, "users", ())) == 1

    def skip_dropout(node: Any) -> Any:
        while (
            getattr(node, "op", None) in ("call_module", "call_function")
            and (isinstance(child(node), nn.Dropout) or node.target is F.dropout)
            and single(node)
        ):
            node = node.args[0]
        return node

    def activation(node: Any) -> tuple[Any, Any] | None:
        """(activation, its input node) when ``node`` applies an elementwise activation."""
        m = child(node)
        if isinstance(m, _ACTIVATIONS) and not isinstance(m, nn.Identity):
            return m, node.args[0]
        if getattr(node, "op", None) == "call_function" and node.target in _ACT_FUNCTIONS:
            return node.target, node.args[0]
        if getattr(node, "op", None) == "call_method" and node.target in _ACT_METHODS:
            return getattr(torch, str(node.target)), node.args[0]
        return None

    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    found: list[tuple[list[str], Any]] = []
    for node in graph.nodes:
        if not is_linear(node) or not node.args:
            continue
        src = skip_dropout(node.args[0])
        act = activation(src) if single(src) else None
        if act is not None and is_linear(act[1]) and single(act[1]):
            first = act[1]
            attrs = [str(first.target), str(node.target)]
        elif (
            getattr(src, "op", None) == "call_function"
            and src.target in (operator.mul, torch.mul)
            and single(src)
        ):
            args = list(src.args[:2])
            sides = [activation(arg) if single(arg) else None for arg in args]
            gated = [
                i
                for i, side in enumerate(sides)
                if side is not None and is_linear(side[1]) and single(side[1])
            ]
            other = [arg for i, arg in enumerate(args) if i not in gated[:1]]
            if not gated or not other or not is_linear(other[0]) or not single(other[0]):
                continue
            act = sides[gated[0]]
            assert act is not None
            attrs = [str(act[1].target), str(other[0].target), str(node.target)]
        else:
            continue
        widths = {cast(nn.Linear, children[a]).out_features for a in attrs[:-1]}
        if widths != {cast(nn.Linear, children[attrs[-1]]).in_features}:
            continue
        twice = [a for a in attrs if calls.get(a, 0) > 1]
        if twice:
            raise ArchitectureError(
                f"{where}: {', '.join(twice)} called more than once in forward: ambiguous FFN; "
                "name the FFNs with ffns=[...]"
            )
        found.append((attrs, act[0]))
    return found


def _find_pairs(module: nn.Module) -> list[tuple[str, nn.Module, list[str], Any]]:
    """FFNs found by pattern: (path, owner, [proj attrs], act or a pattern tag)."""
    found: list[tuple[str, nn.Module, list[str], Any]] = []
    for path, m in module.named_modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            found.append((path, m, ["linear1", "linear2"], "encoder"))
            continue
        if isinstance(m, nn.Sequential) and _sequential_ffn(m):
            found.append((path, m, [], "sequential"))
            continue
        linears = [k for k, c in m.named_children() if _is_linear(c)]
        if len(linears) < 2 or isinstance(m, nn.Sequential | nn.MultiheadAttention):
            continue
        graph = _trace(m)
        where = path or "<root>"
        if graph is None:
            if any(isinstance(c, _ACTIVATIONS) for c in m.children()):
                # Linears and an activation, but a forward fx cannot follow: maybe an FFN
                # that would run dense. Never guess: ask for names.
                raise ArchitectureError(
                    f"{where} ({type(m).__name__}): torch.fx cannot trace its forward to find "
                    f"its FFNs (linears: {', '.join(linears)}); name them with ffns=[...]"
                )
            continue
        for attrs, act in _ffns_in_graph(m, graph, where):
            found.append((path, m, attrs, act))
    return found


def _resolve(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner_path, _, attr = path.rpartition(".")
    try:
        owner = module.get_submodule(owner_path) if owner_path else module
        getattr(owner, attr)
    except AttributeError:
        raise ArchitectureError(f"ffns: no module {path!r} in {type(module).__name__}") from None
    return owner, attr


def _common_owner(paths: Sequence[str]) -> str:
    """The longest module path that owns every one of ``paths``."""
    parts = [p.split(".")[:-1] for p in paths]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if any(x != level[0] for x in level):
            break
        common.append(level[0])
    return ".".join(common)


def attach_ffns(
    module: nn.Module, cfg: ModelConfig, ffns: Sequence[Sequence[str]] | None = None
) -> list[GatedFFN]:
    """Gate the FFNs of ``module`` in place (see :func:`models.attach_gates`)."""
    layers: list[GatedFFN] = []
    for m in module.modules():  # its nested-tensor fast path would bypass the gated layers
        if isinstance(m, nn.TransformerEncoder):
            m.__class__ = _GatedEncoder
    if ffns:
        for spec in ffns:
            if len(spec) not in (2, 3):
                raise ArchitectureError(
                    f"ffns: {list(spec)}: name (fc1, fc2) or (gate, up, down) module paths"
                )
            for p in spec:
                _resolve(module, p)
            # The projections' nearest common owner (BERT's intermediate.dense and output.dense
            # live in two children of their layer); attrs are paths from it.
            prefix = _common_owner(spec)
            owner = module.get_submodule(prefix) if prefix else module
            attrs = [p[len(prefix) + 1:] if prefix else p for p in spec]
            shared = sum(1 for other in ffns if _common_owner(other) == prefix) > 1
            name = spec[0] if shared or not prefix else prefix
            if isinstance(owner, nn.TransformerEncoderLayer) and attrs == ["linear1", "linear2"]:
                # Its fused fast path reads the weights directly: take its gated slow path.
                layers.append(_gate_encoder_layer(owner, cfg, name))
                continue
            act = _act_between(owner, attrs)
            layers.append(make_ffn(name, owner, attrs, cfg, act))
        return layers
    pairs = _find_pairs(module)
    per_owner: dict[str, int] = {}
    for path, *_ in pairs:
        per_owner[path] = per_owner.get(path, 0) + 1
    for path, owner, attrs, act in pairs:
        where = path or "<root>"
        if per_owner[path] > 1:  # several FFNs in one module: name each by its first linear
            where = f"{path}.{attrs[0]}" if path else attrs[0]
        if act == "encoder":
            layers.append(_gate_encoder_layer(cast(nn.TransformerEncoderLayer, owner), cfg, where))
        elif act == "sequential":
            parent, attr = _resolve(module, path) if path else (None, "")
            if parent is None:
                raise ArchitectureError(
                    "attach_gates: the module itself is a Sequential FFN; wrap it"
                )
            gated = _GatedSequentialFFN(cast(nn.Sequential, owner), cfg, where)
            setattr(parent, attr, gated)
            layers.append(gated._ffn)
        else:
            if any(isinstance(getattr(owner, a), _Projection) for a in attrs):
                raise ArchitectureError(f"{where}: {attrs} overlap another FFN; name them in ffns")
            layers.append(make_ffn(where, owner, attrs, cfg, act))
    return layers


def _act_between(owner: nn.Module, attrs: Sequence[str]) -> Any:
    if any("." in a for a in attrs):  # in different children: their forwards apply it
        return None
    graph = _trace(owner)
    if graph is not None:
        try:
            pairs = _ffns_in_graph(owner, graph, "")
        except ArchitectureError:  # named explicitly: the user resolved the ambiguity
            pairs = []
        for found, act in pairs:
            if found[0] == attrs[0]:
                return act
    return None  # the forward applies it: the layer's own call never needs to know


def unsupported_linears(module: nn.Module) -> list[str]:
    """Paths of ``nn.Linear`` children left ungated inside modules that look like FFN owners
    (two or more linears) — reported when attach_gates finds no FFN at all."""
    out = []
    for path, m in module.named_modules():
        kids = [k for k, c in m.named_children() if _is_linear(c)]
        if len(kids) >= 2:
            out.append(f"{path or '<root>'} ({', '.join(kids)})")
    return out


def signature_takes_lengths(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "lengths" in params
