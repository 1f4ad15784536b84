"""Compiled execution plans: a closed channel costs nothing (docs/plans.md).

:func:`compile_plan` turns a loaded :class:`GatedNetwork` and one :class:`GateSettings` into a
:class:`SparsePlan`, a drop-in for the network's forward (same inputs, same
:class:`NetworkOutput`) that runs the network's own forward with an executor in place of each
gated layer (:mod:`models.sparse.executors`); everything else runs as the network wrote it.
The plan neither copies nor changes the network: the layers find the plan running them through
the forward context (:mod:`models.layers`).

Everything runs on the device of the model's weights, under ``torch.inference_mode``; the
executors run ATen's kernels with oneDNN off (it caches a kernel per input shape), the rest of
the network (a front end's convolutions) whatever torch picks. The hot loop has no host-device
synchronisation except with a threshold policy, whose per-request kept counts decide the kernel
shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from models.errors import InvalidInputError
from models.gate_config import GateSettings
from models.gates import bucketed_k
from models.layers import (
    Forward,
    GatedFFN,
    HeadGatedAttention,
    UnfoldConv1d,
    _Projection,
    forward_context,
)
from models.networks import GatedNetwork, NetworkOutput, first_tensor
from models.sparse.calibrate import calibrate as _calibrate
from models.sparse.executors import AttentionExecutor, FFNExecutor, Strategy, conv_unfolded
from models.sparse.kernels import without_onednn
from models.sparse.macs import PlanMacs
from models.sparse.workspace import Workspace

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 8, 32)

# (packed shape, open channels, activation, length, batch, k) -> chosen strategy, timings (ms)
CalibrationCache = dict[tuple[object, ...], tuple[Strategy, dict[str, float]]]


class SparsePlan:
    """A gated network compiled for one :class:`GateSettings`; call it like the network.

    ``plan(x (B, T, C_in), lengths (B,)[, settings]) -> NetworkOutput`` with the reference's
    contract. ``settings`` are those of this forward: any whose ``plan_key`` equals the compiled
    ones' (another blend weight or dynamic threshold, a keep ratio bucketing to the same counts);
    by default the compiled ones.
    ``layers`` are the FFN executors (strategies, kept counts); ``report`` lists the chosen
    strategies and the calibration timings (ms) per layer, batch size and k.

    A plan reuses its buffers and switches oneDNN off process-wide while its executors run: run
    plans from one thread at a time (a server's compute thread). Where nothing is removed or folded
    (dense mode, attention with every head open at z = 1) the plan reads the model's own weight
    tensors: compile a new plan after changing them, as after loading new weights.
    """

    def __init__(
        self, model: GatedNetwork, settings: GateSettings, workspace: Workspace | None = None
    ) -> None:
        self.model = model
        self.settings = settings
        self.key = model.plan_key(settings)
        self._runs: dict[GateSettings, bool] = {settings: True}  # settings -> runs this plan
        self.device = next(model.parameters()).device
        self.ffns: dict[GatedFFN, FFNExecutor] = {}
        self.attentions: dict[HeadGatedAttention, AttentionExecutor] = {}
        self.report: dict[str, dict[str, object]] = {}
        self._ws = workspace if workspace is not None else Workspace()
        self.macs = PlanMacs(model.mac_model)

    @property
    def _names(self) -> list[str]:
        return [layer.name for layer in [*self.ffns, *self.attentions]]

    @property
    def _n_layers(self) -> int:
        return len(self.ffns) + len(self.attentions)

    @property
    def layers(self) -> list[FFNExecutor]:
        return list(self.ffns.values())

    # ------------------------------------------------------------------ running

    def __call__(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        settings: GateSettings | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
        rows: Sequence[GateSettings] | None = None,
    ) -> NetworkOutput:
        settings = self.settings if settings is None else self._check(settings)
        for row in dict.fromkeys(rows or ()):  # each distinct row's settings run this plan
            self._check(row)
        model = self.model
        model.check_input(x, lengths)
        try:
            fwd = model.open_forward(x, lengths, settings, plan=self, rows=rows)
        except ValueError as err:  # rows that are not this plan's
            raise ValueError(f"plan compiled for {self.settings}: {err}") from None
        if fwd.padded and not model.padding_invariant:
            raise InvalidInputError(
                "this model's results depend on padding: batch only requests of one length"
            )
        with torch.inference_mode(), forward_context(fwd):
            logits = first_tensor(model.compute(x, lengths, **(extras or {})),
                                  type(model).__name__)
            full = fwd.lengths[fwd.full_length]
            macs, dense = self.macs.count(full, fwd.records, self.settings.mode == "dynamic")
            kept = {layer.name: rec.kept for layer, rec in fwd.records.items()}
            if len(kept) < self._n_layers:  # a layer this forward did not run kept nothing
                for name in self._names:
                    kept.setdefault(name, full.new_zeros(fwd.batch, dtype=torch.float32))
        return NetworkOutput(logits, kept, macs, dense)

    def _check(self, settings: GateSettings) -> GateSettings:
        runs = self._runs.get(settings)
        if runs is None:
            runs = self.model.plan_key(settings) == self.key
            if len(self._runs) < 256:
                self._runs[settings] = runs
        if not runs:
            raise ValueError(f"plan compiled for {self.settings}, called with {settings}")
        return settings

    # Called by the gated layers while this plan runs them.

    def _ffn(self, layer: GatedFFN) -> FFNExecutor:
        ex = self.ffns.get(layer)
        if ex is None:
            raise RuntimeError(f"gated layer {layer.name} is not in this plan: compile it again")
        return ex

    def ffn(
        self, layer: GatedFFN, proj: _Projection, x: torch.Tensor, fwd: Forward
    ) -> torch.Tensor:
        with without_onednn():
            return self._ffn(layer).project(proj, x, fwd, self._ws)

    def ffn_fused(
        self,
        layer: GatedFFN,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        fwd: Forward,
        steps: bool = False,
    ) -> torch.Tensor:
        with without_onednn():
            return self._ffn(layer).fused(x, residual, fwd, self._ws, steps)

    def attention(
        self,
        layer: HeadGatedAttention,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        fwd: Forward,
    ) -> torch.Tensor:
        ex = self.attentions.get(layer)
        if ex is None:
            raise RuntimeError(f"gated layer {layer.name} is not in this plan: compile it again")
        with without_onednn():
            return ex(x, residual, fwd, self._ws)

    def conv(self, conv: UnfoldConv1d, x: torch.Tensor) -> torch.Tensor:
        with without_onednn():
            return conv_unfolded(conv, x, self._ws)


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
    timings: CalibrationCache | None = None,
) -> SparsePlan:
    """Compile ``model`` (eval mode, weights on their device) for ``settings``.

    Works for any :class:`GatedNetwork`: each gated layer gets its executor. Static keep sets
    are applied here once. For dynamic mode with a per-request global predictor, each FFN's
    strategy is timed per batch size in ``batch_sizes`` and per k (the configured bucketed k,
    or with a threshold policy the bucketed k at each fraction of ``threshold_ks``) at
    ``calib_length`` steps (default min(max_length, 128)); at run time a batch uses the
    nearest calibrated batch size. ``calibrate=False`` uses the dense fallback for every
    (batch, k), which is always correct; ``strategy`` forces one strategy everywhere (tests and
    benchmarks of a single strategy). Plans that never run concurrently may share a
    ``workspace``. ``timings`` carries calibration results between compilations: they depend
    on a layer's shapes, the batch size and k, not on weights or gate values, so a plan whose
    (layer, batch, k) were timed before — another gate configuration, a reloaded checkpoint of
    the same architecture — reuses them and times nothing. The network's MAC model is fitted
    here if it was not yet.
    """
    model.eval()
    plan = SparsePlan(model, settings, workspace)
    length = calib_length or min(model.config.model.max_length, 128)
    cache: CalibrationCache = {} if timings is None else timings
    with torch.inference_mode():
        for layer in model.gated():
            if isinstance(layer, HeadGatedAttention):
                plan.attentions[layer] = AttentionExecutor(layer, settings)
                continue
            assert isinstance(layer, GatedFFN)
            ex = FFNExecutor(layer, settings)
            ex.forced = strategy
            plan.ffns[layer] = ex
            if ex.predictor is None or ex.per_step or not calibrate:
                continue
            if ex.k is not None:
                ks = [ex.k]
            else:
                ks = sorted({bucketed_k(r, ex.n_open, settings.bucket) for r in threshold_ks})
            for batch in batch_sizes:
                for k in ks:
                    if k >= ex.n_open or k == 0:
                        continue
                    assert ex.sides is not None
                    key = (tuple(tuple(w.shape) for w in ex.sides), ex.n_open, ex.act, length,
                           batch, k)
                    if key not in cache:
                        cache[key] = _calibrate(ex, batch, k, length, reps)
                    best, times = cache[key]
                    ex.strategies[(batch, k)] = best
                    ex.timings[(batch, k)] = (times["dense"], times[str(best)])
                    plan.report.setdefault(layer.name, {})[f"b{batch}/k{k}"] = {
                        "chosen": str(best),
                        **times,
                    }
    return plan
