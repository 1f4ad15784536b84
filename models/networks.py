"""Gated networks: the served model contract, the built-in networks and user networks.

A :class:`GatedNetwork` takes the server's input ``x`` (B, T, C) FP32 with per-request
``lengths`` (B,) and a :class:`GateSettings`, and returns a :class:`NetworkOutput`: logits, the
units each gated layer kept and the MACs it executed per request (docs/model-contract.md).
Its gated layers (:mod:`models.layers`) are what the sparse plans compile; the rest of the
network runs as written.

- Built-ins, found by name: ``conv`` (residual 1-D CNN; each block LN → conv k (C→H) → GELU →
  gate(H) → conv 1 (H→C)) and ``transformer`` (pre-LN encoder, FFN gated statically and per
  request, heads gated statically). They are ordinary users of the gated layers.
- A user's network, found by import path ``package.module:factory``: the factory returns a
  ``GatedNetwork`` or a plain ``nn.Module``, which :func:`attach_gates` gates in place.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.contract import ModelContract
from models.errors import ArchitectureError, ConfigError, InvalidInputError
from models.flops import MacModel
from models.gate_config import GateSettings
from models.gates import DynamicStructuredGate, StaticGate, bucketed_k, make_static_gate
from models.layers import (
    Forward,
    GatedConv1d,
    GatedFFN,
    GatedLayer,
    GatedLinear,
    HeadGatedAttention,
    UnfoldConv1d,
    attach_ffns,
    current,
    forward_context,
    gated_layers,
    signature_takes_lengths,
    track_lengths,
    unsupported_linears,
)
from models.predictor import time_mask

TORCH_DTYPES = {"FP32": torch.float32, "INT64": torch.int64, "INT32": torch.int32}


@dataclass
class NetworkOutput:
    """Result of one forward pass; every tensor has the batch as its first dimension."""

    logits: torch.Tensor  # (B, classes)
    kept: dict[str, torch.Tensor]  # layer name -> (B,) channels (or heads) kept
    macs: torch.Tensor  # (B,) float64, executed
    dense_macs: torch.Tensor  # (B,) float64, the unpruned network on the same lengths

    @property
    def flops_ratio(self) -> torch.Tensor:
        return self.macs / self.dense_macs.clamp_min(1.0)


def first_tensor(out: Any, where: str) -> torch.Tensor:
    """The logits of a module's output: a tensor, the first tensor of a tuple or list, a
    mapping's ``logits`` (or first value), or a ``ModelOutput``'s first field."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = [out["logits"]] if "logits" in out else list(out.values())
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ArchitectureError(
        f"{where}: forward returned {type(out).__name__}; the contract is a tensor, a tuple "
        "whose first element is one, or a ModelOutput"
    )


class GatedNetwork(nn.Module):
    """A network with gated layers, served and compiled as one.

    Subclasses implement :meth:`compute` (``x`` (B, T, C), ``lengths`` (B,) -> logits or a
    tuple / ModelOutput whose first tensor is the logits). ``takes_lengths`` says whether the
    network reads lengths (it then keeps padding out of its results); ``padding_invariant``
    whether a request's result is independent of the padding it is batched with. A network
    that is not is batched by the server only with requests of the same shape.
    """

    config: ModelConfig
    takes_lengths: bool = True
    padding_invariant: bool = True
    # MACs are a quadratic in the length on each residue class modulo this (the product of the
    # strides that change the time resolution; 1: one quadratic).
    length_period: int = 1

    # ------------------------------------------------------------------ structure

    def gated(self) -> list[GatedLayer]:
        """Every gated layer, in module order."""
        return gated_layers(self)

    def dynamic_gates(self) -> Iterator[tuple[str, DynamicStructuredGate]]:
        for layer in self.gated():
            if isinstance(layer, GatedFFN):
                yield layer.name, layer.gate

    def static_gates(self) -> Iterator[StaticGate]:
        """Every static gate (channels and heads): the structures the L0 objective counts."""
        for module in self.modules():
            if isinstance(module, StaticGate):
                yield module

    def gated_widths(self) -> dict[str, int]:
        """Key of each dynamically gated layer in ``NetworkOutput.kept`` -> its channel count."""
        return {layer.name: layer.n for layer in self.gated() if isinstance(layer, GatedFFN)}

    def predictor_parameters(self) -> Iterator[nn.Parameter]:
        for _, gate in self.dynamic_gates():
            if gate.predictor is not None:
                yield from gate.predictor.parameters()

    def _static_values(self) -> list[tuple[GatedFFN, torch.Tensor]]:
        """Each gated FFN's static gate values on the host, computed once while the network is
        in eval mode (they are constants then; ``train()`` forgets them)."""
        cached = self.__dict__.get("_statics")
        if cached is None:
            with torch.no_grad():
                cached = [
                    (layer, layer.gate.static_values().detach().cpu())
                    for layer in self.gated()
                    if isinstance(layer, GatedFFN)
                ]
            if not self.training:
                self.__dict__["_statics"] = cached
        return cast(list[tuple[GatedFFN, torch.Tensor]], cached)

    def train(self, mode: bool = True) -> GatedNetwork:
        self.__dict__.pop("_statics", None)
        return super().train(mode)

    def apply_widths(self, widths: dict[str, int]) -> None:
        """Resize named gated FFNs of a freshly built network to recorded widths (a pruned
        export's ``pruned_widths``), before its weights load."""
        layers = {layer.name: layer for layer in self.gated() if isinstance(layer, GatedFFN)}
        unknown = sorted(set(widths) - set(layers))
        if unknown:
            raise ArchitectureError(f"pruned_widths names layers the network lacks: {unknown}")
        for name, n in widths.items():
            layers[name].select_channels(None, int(n))
        self.__dict__.pop("_mac_model", None)
        self.__dict__.pop("_statics", None)

    def plan_key(self, settings: GateSettings) -> tuple[object, ...]:
        """What a forward under ``settings`` executes, so that settings which run the same plan
        share one: the mode and each gated layer's kept count (static, or dynamic top-k after
        bucketing), or ``"threshold"`` where a predictor's per-request counts decide. The blend
        weight and a dynamic threshold are values a plan takes at run time, not structure."""
        s = settings.canonical()
        if s.mode == "dense":
            return ("dense",)
        counts: list[object] = []
        for layer, static in self._static_values():
            n_open = int((static > 0).sum())
            dynamic = s.mode == "dynamic" and layer.gate.predictor is not None
            if s.keep_ratio is not None:
                counts.append(bucketed_k(s.keep_ratio, n_open, s.bucket))
            elif s.threshold is not None and not dynamic:
                counts.append(int(((static >= s.threshold) & (static > 0)).sum()))
            else:
                counts.append(n_open if s.threshold is None else "threshold")
        return (s.mode, tuple(counts), s.bucket)

    @property
    def min_length(self) -> int:
        """The shortest input this network runs: 1, or with strided convolutions (a front end
        that downsamples) the shortest length found by trying (cached)."""
        cached = self.__dict__.get("_min_length")
        if cached is None:
            from models.flops import shortest_input

            cached = 1 if int(getattr(self, "length_period", 1)) <= 1 else shortest_input(self)
            self.__dict__["_min_length"] = cached
        return int(cached)

    @property
    def mac_model(self) -> MacModel:
        """Counts of everything but the gated layers, fitted once by torch's FLOP counter."""
        model = self.__dict__.get("_mac_model")
        if model is None:
            model = MacModel.fit(self)
            self.__dict__["_mac_model"] = model
        return cast(MacModel, model)

    def contract(self) -> ModelContract:
        """The named tensors this network takes and returns (docs/model-contract.md): the
        default FP32 ``input`` [batch, T, C] -> ``logits`` [batch, classes], or what the module
        declares as ``gated_contract``."""
        declared = getattr(self, "gated_contract", None)
        if isinstance(declared, ModelContract):
            return declared
        m = self.config.model
        return ModelContract.default(m.in_channels, m.num_classes)

    @property
    def fixed_length(self) -> int | None:
        """The steps of every request when the input has a fixed shape (no length dimension,
        an image): ``max_length``, the resolution its gated layers run at (a ViT's tokens).
        None when each request has its own length."""
        return self.config.model.max_length if self.contract().fixed_shape else None

    def example_input(self, length: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeros (the pad value) shaped like the contract's first data input, and lengths. A
        fixed-shape input has one shape: ``length`` must then be :attr:`fixed_length`."""
        dev = next(self.parameters()).device
        spec = self.contract().data_inputs[0]
        fixed = self.fixed_length
        if fixed is None:
            shape = (batch, length, *spec.shape[2:])
        elif length != fixed:
            raise ValueError(
                f"{spec.name} has a fixed shape: every request is {fixed} steps, not {length}"
            )
        else:
            shape = (batch, *spec.shape[1:])
        x = torch.full(shape, spec.pad_value, dtype=TORCH_DTYPES[spec.datatype], device=dev)
        return x, torch.full((batch,), length, device=dev)

    # ------------------------------------------------------------------ running

    def check_input(self, x: torch.Tensor, lengths: torch.Tensor) -> None:
        cfg = self.config.model
        spec = self.contract().data_inputs[0]
        if spec.length_dim is None:
            self._check_fixed(x, lengths)
            return
        want = [d if d != -1 else None for d in spec.shape]
        if x.dim() != len(want) or any(w is not None and x.shape[i] != w
                                       for i, w in enumerate(want) if i > 1):
            raise InvalidInputError(
                f"{spec.name} must have shape {spec.shape_text}, got {list(x.shape)}"
            )
        if x.shape[1] > cfg.max_length:
            raise InvalidInputError(
                f"sequence length {x.shape[1]} exceeds the model's max_length {cfg.max_length}"
            )
        if lengths.shape != (x.shape[0],):
            raise InvalidInputError(f"lengths must have shape [{x.shape[0]}]")
        if x.shape[0] and (int(lengths.min()) < 1 or int(lengths.max()) > x.shape[1]):
            raise InvalidInputError(f"lengths must be in [1, {x.shape[1]}] (the padded T)")

    def _check_fixed(self, x: torch.Tensor, lengths: torch.Tensor) -> None:
        """A fixed-shape input: exactly the declared shape, every row the full length."""
        spec = self.contract().data_inputs[0]
        steps = self.config.model.max_length
        if tuple(x.shape[1:]) != spec.shape[1:]:
            raise InvalidInputError(
                f"{spec.name} must have shape {spec.shape_text}, got {list(x.shape)}"
            )
        if lengths.shape != (x.shape[0],):
            raise InvalidInputError(f"lengths must have shape [{x.shape[0]}]")
        if x.shape[0] and bool((lengths != steps).any()):
            raise InvalidInputError(
                f"lengths must all be {steps}: {spec.name} has a fixed shape, every row is the "
                "model's full length (max_length)"
            )

    def compute(self, x: torch.Tensor, lengths: torch.Tensor, **extras: torch.Tensor) -> Any:
        """``extras``: the contract's other data inputs (token types), by name."""
        raise NotImplementedError

    def open_forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        settings: GateSettings,
        plan: Any = None,
        rows: Sequence[GateSettings] | None = None,
    ) -> Forward:
        # A fixed-shape input has no length dimension: its rows are max_length steps long.
        fixed = self.fixed_length
        t = x.shape[1] if fixed is None else fixed
        # Host lengths say for free whether a request is padded; device lengths would sync.
        host = lengths if lengths.device.type == "cpu" else lengths.cpu()
        padded = bool((host != t).any()) if host.numel() else False
        return Forward(
            settings=settings,
            batch=x.shape[0],
            full_length=t,
            lengths={t: lengths.to(x.device)},
            padded=padded,
            plan=plan,
            rows=rows,
        )

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        settings: GateSettings,
        extras: Mapping[str, torch.Tensor] | None = None,
        rows: Sequence[GateSettings] | None = None,
    ) -> NetworkOutput:
        """The reference forward: x (B, T, C_in), lengths (B,) -> logits, kept and MACs;
        ``extras``: the contract's other data inputs, by name, shaped (B, T, ...) like x. A
        fixed-shape input is x (B, *shape) with every length :attr:`fixed_length`. ``rows``:
        one settings per row where the rows' blend weights or dynamic thresholds differ
        (:class:`models.gates.RunValues`)."""
        self.check_input(x, lengths)
        fwd = self.open_forward(x, lengths, settings, rows=rows)
        if fwd.padded and not self.padding_invariant:
            raise InvalidInputError(
                "this model's results depend on padding: batch only requests of one length"
            )
        with forward_context(fwd):
            logits = first_tensor(self.compute(x, lengths, **(extras or {})),
                                  type(self).__name__)
        return self.finish(logits, fwd)

    def finish(self, logits: torch.Tensor, fwd: Forward) -> NetworkOutput:
        lengths = fwd.lengths[fwd.full_length]
        kept = {layer.name: rec.kept for layer, rec in fwd.records.items()}
        for layer in self.gated():  # a layer this forward did not run kept nothing
            kept.setdefault(layer.name, lengths.new_zeros(fwd.batch, dtype=torch.float32))
        with_pred = fwd.settings.mode == "dynamic"
        macs, dense = self.mac_model.count(lengths, fwd.records, with_pred)
        return NetworkOutput(logits, kept, macs, dense)


# --------------------------------------------------------------------------- built-ins


def _padding(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, T) bool, mf (B, T, 1) float) of the network input; the forward's own when it
    computed them already (every gated layer at this resolution shares them)."""
    fwd = current()
    if fwd is not None and fwd.full_length == x.shape[1] and x.dtype == torch.float32:
        mask, mf = fwd.mask_at(x.shape[1], "input")[:2]
        return mask, mf
    mask = time_mask(lengths.to(x.device), x.shape[1])
    return mask, mask.unsqueeze(-1).to(x.dtype)


def _masked_mean(x: torch.Tensor, mf: torch.Tensor) -> torch.Tensor:
    """x (B, T, C), mf (B, T, 1) float mask -> (B, C) mean over valid steps."""
    return (x * mf).sum(1) / mf.sum(1).clamp_min(1.0)


def _zero_padding(h: torch.Tensor, mf: torch.Tensor) -> torch.Tensor:
    # In place where autograd does not need the input (inference, plans): one kernel and no
    # allocation per block.
    return h.mul_(mf) if torch.is_inference_mode_enabled() else h * mf


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each time step."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        del mask
        return super().forward(x)


class _SequenceNorm(nn.Module):
    """Normalise each request over its valid steps and all channels, then a per-channel affine.

    Like BatchNorm it keeps the relative amplitude of time steps (LayerNorm per step does not),
    like LayerNorm it has no running statistics: the same in training and inference, whatever
    the mode or the batch mates.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        count = m.sum((1, 2), keepdim=True).clamp_min(1.0) * x.shape[-1]
        mean = (x * m).sum((1, 2), keepdim=True) / count  # (B, 1, 1)
        var = (((x - mean) * m) ** 2).sum((1, 2), keepdim=True) / count
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class _BatchNorm(nn.BatchNorm1d):
    """BatchNorm over (B, T, C) inputs."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        del mask
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


_NORMS: dict[str, type[nn.Module]] = {
    "batch": _BatchNorm,
    "layer": _ChannelLayerNorm,
    "sequence": _SequenceNorm,
}


class GatedConvBlock(nn.Module):
    """LN → conv k (C→H) → GELU → gate(H) → conv 1 (H→C), residual; padding stays zero."""

    def __init__(self, cfg: ModelConfig, name: str) -> None:
        super().__init__()
        m = cfg.model
        self.channels, self.hidden, self.kernel_size = m.channels, m.hidden, m.kernel_size
        self.norm = _NORMS[m.norm](m.channels)
        self.conv1 = GatedConv1d(m.channels, m.hidden, m.kernel_size, padding=m.kernel_size // 2)
        self.conv2 = GatedConv1d(m.hidden, m.channels, 1)
        self.gate = DynamicStructuredGate(m.hidden, m.channels, cfg)
        self.ffn = GatedFFN(name, [self.conv1], self.conv2, self.gate, act=F.gelu)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mf: torch.Tensor) -> torch.Tensor:
        """x (B, T, C), mask (B, T) -> (B, T, C)."""
        f = self.norm(x, mask) * mf  # (B, T, C); padding is zero, as the conv's own padding
        return _zero_padding(self.ffn(f, residual=x, steps=True), mf)  # (B, T, C)


class GatedConvNet(GatedNetwork):
    """Residual 1-D CNN with gated hidden channels (the default architecture)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        m = cfg.model
        self.stem = UnfoldConv1d(
            m.in_channels, m.channels, m.kernel_size, padding=m.kernel_size // 2
        )
        self.blocks = nn.ModuleList(GatedConvBlock(cfg, f"blocks.{i}") for i in range(m.num_blocks))
        self.head = nn.Linear(m.channels, m.num_classes)

    def compute(
        self, x: torch.Tensor, lengths: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        """x (B, T, C_in), lengths (B,) -> logits (B, classes)."""
        mask, mf = _padding(x, lengths)  # (B, T), (B, T, 1)
        h = _zero_padding(self.stem.steps(x * mf), mf)  # (B, T, C)
        for block in self.blocks:
            h = block(h, mask, mf)
        return cast(torch.Tensor, self.head(_masked_mean(h, mf)))


class GatedEncoderLayer(nn.Module):
    """Pre-LN transformer layer: statically gated heads, statically+dynamically gated FFN."""

    def __init__(self, cfg: ModelConfig, name: str) -> None:
        super().__init__()
        m = cfg.model
        self.d_model, self.ffn_dim, self.num_heads = m.d_model, m.ffn, m.num_heads
        self.head_dim = m.d_model // m.num_heads
        self.norm1 = nn.LayerNorm(m.d_model)
        self.qkv = nn.Linear(m.d_model, 3 * m.d_model)
        self.proj = nn.Linear(m.d_model, m.d_model)
        self.head_gate = make_static_gate(m.num_heads, cfg)
        self.norm2 = nn.LayerNorm(m.d_model)
        self.fc1 = GatedLinear(m.d_model, m.ffn)  # weight (H, D): kept rows are contiguous
        self.fc2 = GatedLinear(m.ffn, m.d_model)
        self.ffn_gate = DynamicStructuredGate(m.ffn, m.d_model, cfg)
        self.attn = HeadGatedAttention(
            f"{name}.heads", self.qkv, self.proj, self.head_gate, m.num_heads
        )
        self.ffn = GatedFFN(f"{name}.ffn", [self.fc1], self.fc2, self.ffn_gate, act=F.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        x = self.attn(self.norm1(x), residual=x)
        return self.ffn(self.norm2(x), residual=x)


class GatedTransformer(GatedNetwork):
    """Transformer encoder classifier with gated FFN channels and attention heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        m = cfg.model
        # A convolutional stem gives the tokens local context; a per-step linear embedding of
        # MNIST-1D's scalar samples leaves attention to rebuild every local feature (~0.7 acc).
        self.embed = UnfoldConv1d(
            m.in_channels, m.d_model, m.kernel_size, padding=m.kernel_size // 2
        )
        self.pos = nn.Parameter(torch.randn(m.max_length, m.d_model) * 0.02)
        self.layers = nn.ModuleList(
            GatedEncoderLayer(cfg, f"layers.{i}") for i in range(m.num_layers)
        )
        self.norm = nn.LayerNorm(m.d_model)
        self.head = nn.Linear(m.d_model, m.num_classes)

    def compute(
        self, x: torch.Tensor, lengths: torch.Tensor, **extras: torch.Tensor
    ) -> torch.Tensor:
        mask, mf = _padding(x, lengths)
        h = self.embed.steps(x * mf) + self.pos[: x.shape[1]]  # (B, T, D)
        for layer in self.layers:
            h = layer(h)
        return cast(torch.Tensor, self.head(_masked_mean(self.norm(h), mf)))


# --------------------------------------------------------------------------- any module


class AttachedNetwork(GatedNetwork):
    """A plain ``nn.Module`` with its FFNs gated in place (see :func:`attach_gates`).

    The module is called as ``module(x, lengths)`` when its forward has a ``lengths``
    parameter, else ``module(x)``; a module may set ``padding_invariant`` to say whether its
    results ignore padding (default: it does exactly when it takes lengths).
    """

    def __init__(
        self,
        module: nn.Module,
        config: ModelConfig,
        ffns: Sequence[Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.takes_lengths = signature_takes_lengths(module)
        self.padding_invariant = bool(getattr(module, "padding_invariant", self.takes_lengths))
        layers = attach_ffns(module, config, ffns)
        if not layers:
            candidates = unsupported_linears(module)
            hint = f"; modules with several linears: {'; '.join(candidates)}" if candidates else ""
            raise ArchitectureError(
                f"attach_gates: found no FFN in {type(module).__name__} (patterns: "
                "nn.TransformerEncoderLayer, nn.Sequential(Linear, act, [Dropout], Linear), a "
                "forward calling fc1 → activation module → fc2); name them with "
                f"ffns=[('path.fc1', 'path.fc2'), ...]{hint}"
            )
        self.module = module
        self.length_period = track_lengths(module)
        declared = getattr(module, "gated_contract", None)
        if declared is not None:
            if not isinstance(declared, ModelContract):
                raise ArchitectureError(
                    f"{type(module).__name__}.gated_contract must be a models.ModelContract, "
                    f"got {type(declared).__name__}"
                )
            self.gated_contract = declared

    def compute(self, x: torch.Tensor, lengths: torch.Tensor, **extras: torch.Tensor) -> Any:
        if self.takes_lengths:
            return self.module(x, lengths, **extras)
        return self.module(x, **extras)


def attach_gates(
    module: nn.Module,
    config: ModelConfig | dict[str, Any] | None = None,
    ffns: Sequence[Sequence[str]] | None = None,
) -> GatedNetwork:
    """Gate every FFN of a plain ``nn.Module`` in place, keeping its weights.

    ``config`` is a :class:`ModelConfig` (or its mapping; the gate keys of the parameter
    guide at the top level, and ``model.in_channels`` / ``num_classes`` / ``max_length`` for
    the served contract). FFNs are found by pattern (``nn.TransformerEncoderLayer``, whose
    fused inference fast path is replaced by its own gated slow path;
    ``nn.Sequential(Linear, act, [Dropout], Linear)``; a module whose forward calls
    ``Linear → activation module → Linear``, found with torch.fx) or named as module paths
    ``ffns=[("blocks.0.fc1", "blocks.0.fc2"), ("mlp.gate", "mlp.up", "mlp.down")]``. Finding
    none, or a name that is not a Linear/Conv1d, is an ArchitectureError naming the path.
    """
    if config is None:
        config = ModelConfig()
    elif isinstance(config, dict):
        from models.config import parse_config

        config = parse_config(config, "attach_gates config")
    if isinstance(module, GatedNetwork):
        raise ArchitectureError("attach_gates: the module is already a GatedNetwork")
    return AttachedNetwork(module, config, ffns or config.model.ffns or None)


# --------------------------------------------------------------------------- building

NetworkFactory = Callable[[ModelConfig], GatedNetwork]

ARCHITECTURES: dict[str, NetworkFactory] = {
    "conv": GatedConvNet,
    "transformer": GatedTransformer,
}


def _call_factory(factory: Callable[..., Any], cfg: ModelConfig) -> Any:
    args = cfg.model.args
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        params = []
    # The original contract: factory(config). Otherwise factory(**model.args).
    takes_config = len(params) >= 1 and params[0].name in ("config", "cfg") and not args
    return factory(cfg) if takes_config else factory(**args)


def build_network(cfg: ModelConfig) -> GatedNetwork:
    """Build the network named by ``cfg.model.name``: a built-in name or ``module:factory``.

    A factory may return a ``GatedNetwork`` or a plain ``nn.Module`` (gated here with
    ``cfg``); an import failure, an exception in the factory or another return type is an
    :class:`ArchitectureError` naming the factory and the cause.
    """
    name = cfg.model.name
    if name in ARCHITECTURES:
        return ARCHITECTURES[name](cfg)
    if ":" not in name:
        raise ArchitectureError(
            f"model.name: unknown architecture {name!r}; use one of "
            f"{sorted(ARCHITECTURES)} or an import path 'package.module:factory'"
        )
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except Exception as err:  # noqa: BLE001 - any import-time failure of user code
        raise ArchitectureError(
            f"model.name: cannot import {name!r}: {type(err).__name__}: {err}"
        ) from None
    try:
        net = _call_factory(factory, cfg)
    except (ArchitectureError, ConfigError):
        raise
    except Exception as err:  # noqa: BLE001 - the factory is user code
        raise ArchitectureError(
            f"model.name: {name!r} raised {type(err).__name__}: {err}"
        ) from None
    if isinstance(net, GatedNetwork):
        return net
    if isinstance(net, nn.Module):
        return attach_gates(net, cfg)
    raise ArchitectureError(
        f"model.name: {name!r} returned {type(net).__name__}, not a torch.nn.Module or a "
        "models.GatedNetwork"
    )
