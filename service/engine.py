"""The inference engine: the only module of the service that touches torch and ``models``.

It loads every checkpoint of a model repository, warms each model up, and runs one batch of
requests at a time: pad to the longest sequence (images of a fixed shape are only stacked),
pass true lengths, forward under ``torch.inference_mode`` on the model's device, and split the
result back per request.

The interface is deliberately narrow (numpy in, numpy and floats out, frozen gate
configurations whose ``key`` says which compiled plan runs them): every batch runs through the
sparse execution plan of its key. ``infer`` is blocking and not thread-safe: the
caller runs it on the one compute thread of :attr:`Engine.executor`, which also makes every batch
run under exactly one gate configuration.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import torch

import models
import models.sparse  # noqa: F401 - first: it bounds oneDNN's kernel cache before any forward
from service.errors import InvalidInput
from service.settings import ModelServing, SettingsError, load_model_serving

logger = logging.getLogger(__name__)

GATE_MODES: tuple[str, ...] = tuple(models.GATE_MODES)
MODEL_VERSION = "1"
PLATFORM = "pytorch_gated"

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
NUMPY_DTYPES = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32}


@dataclass(frozen=True, slots=True)
class ModelInput:
    """One request's tensors, validated against its model's contract: the network's data
    inputs in contract order, each (rows, T, ...), and each row's length (None: every row is
    T long; from an attention mask otherwise). A fixed-shape input (an image) is (rows,
    *shape) and has no length: its rows are the model's full length."""

    arrays: tuple[npt.NDArray[np.generic], ...]
    lengths: IntArray | None = None

    @property
    def rows(self) -> int:
        return int(self.arrays[0].shape[0])

    @property
    def length(self) -> int:
        return int(self.arrays[0].shape[1])

    @staticmethod
    def of(x: npt.NDArray[np.generic]) -> ModelInput:
        """A request of one input: ``x`` (rows, T, ...), every row T long."""
        return ModelInput((x,))


class EngineError(Exception):
    """A model repository or checkpoint cannot be served; the message names the path."""


class ModelNotInRepository(EngineError):
    """The repository has no folder of that name."""


@dataclass(frozen=True, slots=True)
class GateConfig:
    """One resolved gate configuration: the knobs as the request (or the admin) set them, made
    canonical (dense ignores every knob; static ignores ``dynamic_weight``; ``keep_ratio`` wins
    over ``threshold``), and ``key``, what executes (``models.GatedNetwork.plan_key``):
    configurations with equal keys run the same plan."""

    mode: str
    keep_ratio: float | None = None
    threshold: float | None = None
    dynamic_weight: float | None = None
    key: tuple[object, ...] = field(default=(), compare=False)
    # The load of the model the key was computed for: a hot reload may change what executes.
    generation: int = field(default=0, compare=False)

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Requests of one batch key may share a batch: they run one plan, each with its own
        values of the knobs a plan takes at run time (a dynamic threshold, the blend weight)."""
        return (self.generation, self.key)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the HTTP layer needs to know about a served model (no torch types)."""

    name: str
    version: str
    platform: str
    in_channels: int
    num_classes: int
    max_length: int
    layers: tuple[str, ...]  # gated layers, in NetworkOutput.kept order
    config_gate: GateConfig  # the checkpoint's own dynamic keep policy
    device: str
    contract: models.ModelContract  # the named tensors it takes and returns
    # Whether requests of different lengths may share a batch (the network keeps padding out
    # of its results); otherwise only requests of one length are batched together.
    mixed_lengths: bool = True
    # The shortest input the network runs (a strided front end needs its receptive field):
    # shorter requests are refused before batching, never failing their batch mates.
    min_length: int = 1
    # The model's own batching bounds (its serving.yaml; unset ones are the server's).
    serving: ModelServing = field(default_factory=ModelServing)


@dataclass(frozen=True, slots=True)
class ItemResult:
    """Result of one request of a batch; ratios are means over the request's rows."""

    logits: FloatArray  # (rows, classes)
    active_channel_ratio: float
    flops_ratio: float
    layer_active_ratios: tuple[float, ...]  # aligned with ModelInfo.layers


# Keep ratios whose plans the warm-up compiles for every model (with each checkpoint's own and
# the server's default): a request may name only these (Settings.keep_ratios).
DEFAULT_KEEP_RATIOS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
# Resolved gate configurations remembered per model (settings -> plan key): a cheap cache.
MAX_KEYS = 4096
_GENERATIONS = itertools.count(1)
AUTO = "auto"
# torch_threads "auto": a model gets every core when one request of its full length takes at
# least this long on one thread, and all cores run it in at most this fraction of that time.
AUTO_THREADS_MIN_FORWARD_S = 0.02
AUTO_THREADS_MIN_GAIN = 0.8


@dataclass(slots=True)
class _Loaded:
    info: ModelInfo
    network: models.GatedNetwork
    device: torch.device
    widths: torch.Tensor  # (L,) float64, gated channels of each layer in `layers` order
    bucket: int
    plans: OrderedDict[tuple[object, ...], models.SparsePlan] = field(default_factory=OrderedDict)
    generation: int = field(default_factory=lambda: next(_GENERATIONS))
    keys: OrderedDict[models.GateSettings, tuple[object, ...]] = field(
        default_factory=OrderedDict
    )
    calib_batches: tuple[int, ...] = (1, 8, 32)
    # Intra-op threads of this model's forwards; 0 until the warm-up chooses (torch_threads
    # "auto"), which the compute thread sets before each batch when it differs.
    threads: int = 0
    # After warm-up the plans are fixed: a configuration without one is refused, never
    # compiled at a client's request (compiling and calibrating costs tens of milliseconds
    # of the one compute thread).
    sealed: bool = False
    keep_ratios: tuple[float, ...] = ()  # the keep ratios served, sorted


class Engine:
    """Every model of one repository, on one device, behind a single compute thread."""

    def __init__(
        self,
        loaded: Mapping[str, _Loaded],
        repository: Path | None = None,
        device: torch.device | None = None,
        torch_threads: int | str = 1,
    ) -> None:
        self._models = dict(loaded)
        # A fixed count for every model (0: torch's default now), or None: chosen per model.
        self._fixed_threads = (
            None if torch_threads == AUTO else int(torch_threads) or torch.get_num_threads()
        )
        for entry in self._models.values():
            entry.threads = self._fixed_threads or 0
        self._repository = repository
        self._device = device if device is not None else torch.device("cpu")
        # Plans run one at a time on the compute thread, so they share one set of buffers:
        # memory is that of the largest batch, however many plans are compiled.
        self._workspace = models.Workspace()
        # Strategy timings by layer shape, batch and k, shared by every plan and every load:
        # a reloaded checkpoint of the same architecture times nothing while the server serves.
        self._timings: models.CalibrationCache = {}
        self._keep_ratios: tuple[float, ...] = DEFAULT_KEEP_RATIOS
        self._required_ratios: tuple[float, ...] = ()
        self.models: Mapping[str, ModelInfo] = {}  # the models loaded now
        self._publish()
        # One thread: the forward is already parallel inside torch, and serialising batches is
        # what makes a runtime gate switch atomic per batch.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gated-compute")
        self._warm_rows: int | None = None  # set by warm_up; reloaded models are warmed alike

    # ------------------------------------------------------------------ loading

    @staticmethod
    def scan(repository: Path) -> list[str]:
        """Names of the models in ``repository`` (sub-folders with a config.yaml), sorted.

        Cheap enough to run before the server starts, so that an empty or misspelled repository
        fails with a clear message instead of a half-started server.
        """
        if not repository.is_dir():
            raise EngineError(f"model repository {repository}: not a directory")
        names = sorted(
            p.name
            for p in repository.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "config.yaml").is_file()
        )
        if not names:
            raise EngineError(
                f"model repository {repository}: no model folders (<name>/config.yaml "
                "+ model.safetensors); train one with `make train-shipped`"
            )
        return names

    def repository_models(self) -> list[str]:
        """Names of the model folders in the repository now (loaded or not); [] without one."""
        if self._repository is None:
            return []
        try:
            return self.scan(self._repository)
        except EngineError:  # emptied or removed since startup
            return []

    @staticmethod
    def check_device(device: str) -> None:
        """Raise EngineError when ``device`` does not exist here (before the server starts)."""
        _resolve_device(device)

    @classmethod
    def load(
        cls, repository: Path, device: str = "auto", torch_threads: int | str = "auto"
    ) -> Engine:
        """Load every model of ``repository`` on ``device``; raises EngineError.

        ``torch_threads``: the intra-op threads of every forward (0: torch's default), or
        ``"auto"``: chosen per model by its warm-up (:meth:`warm_up`).
        """
        dev = _resolve_device(device)
        loaded: dict[str, _Loaded] = {}
        for name in cls.scan(repository):
            start = time.monotonic()
            loaded[name] = _read(repository, name, dev)
            logger.info("loaded model %s on %s in %.2f s", name, dev, time.monotonic() - start)
        return cls(loaded, repository, dev, torch_threads)

    def load_model(self, name: str) -> ModelInfo:
        """Read ``name``'s checkpoint from the repository again and swap it in; raises EngineError.

        Blocking; call it off the event loop but not on :attr:`executor`. The checkpoint is read
        on the calling thread, then the entry is replaced by one job on the compute thread: a
        batch already computing finishes on the old weights and every later one sees the new.
        The old entry, its network and its compiled plans become garbage with that swap.
        """
        if self._repository is None or name not in self.scan(self._repository):
            raise ModelNotInRepository(f"model {name!r}: no such model in the repository")
        start = time.monotonic()
        fresh = _read(self._repository, name, self._device)
        fresh.threads = self._fixed_threads or 0
        self.executor.submit(self._warm_and_install, fresh).result()
        logger.info("reloaded model %s in %.2f s", name, time.monotonic() - start)
        return fresh.info

    def unload_model(self, name: str) -> None:
        """Drop ``name`` (after the batch computing now). Its weights and compiled plans are
        released; the buffers all plans share stay, sized for the largest batch."""
        self.executor.submit(self._remove, name).result()
        logger.info("unloaded model %s", name)

    def _warm_and_install(self, loaded: _Loaded) -> None:
        # Runs on the compute thread, between batches: the new model is warmed up like the
        # first ones (batches wait meanwhile), then one dict store swaps it in, no lock needed.
        if self._warm_rows is not None:
            self._warm(loaded, self._warm_rows)
        self._models[loaded.info.name] = loaded
        self._publish()

    def _remove(self, name: str) -> None:
        self._models.pop(name, None)
        self._publish()

    def _publish(self) -> None:
        # A new mapping, never a mutated one: readers on the event loop see the old or the new.
        self.models = {n: m.info for n, m in self._models.items()}

    def warm_up(
        self,
        max_batch_rows: int,
        keep_ratios: Sequence[float] = DEFAULT_KEEP_RATIOS,
        required: Sequence[float] = (),
    ) -> None:
        """Compile every served plan of each model, then run each model once per gate mode at
        batch 1 and ``max_batch_rows``, and once at the largest batch the server accepts
        (``max_batch_rows`` × ``max_length``).

        Served plans: dense; static and dynamic at each of ``keep_ratios`` and the checkpoint's
        own keep ratio, and with the checkpoint's own policy; dynamic with a threshold (any
        threshold and blend weight run the same plan). After this, a configuration without a
        compiled plan is refused (:meth:`resolve_gate`), so no request can make the compute
        thread compile. The first forwards allocate and pick kernels; without this the first
        users pay for it and readiness would be a lie. The largest batch sizes the shared
        buffers once, so that memory does not creep up later as longer batches arrive. Models
        loaded later through :meth:`load_model` are warmed up the same way before they serve.
        """
        self._warm_rows = max(1, max_batch_rows)
        self._keep_ratios = tuple(sorted(set(keep_ratios)))
        self._required_ratios = tuple(required)  # served by every model (the default one)
        for loaded in self._models.values():
            self._warm(loaded, self._warm_rows)

    def _warm(self, loaded: _Loaded, rows_max: int) -> None:
        """Warm ``loaded`` up; raises EngineError naming the model when its network cannot run
        (a user's forward that fails on the contract's input). ``rows_max``: the server's
        largest batch, unless the model's serving.yaml sets its own."""
        rows_max = loaded.info.serving.max_batch_rows or rows_max
        try:
            self._warm_modes(loaded, rows_max)
        except EngineError:
            raise
        except Exception as err:  # noqa: BLE001 - user code: any failure names the model
            raise EngineError(
                f"model {loaded.info.name!r}: warm-up failed: {type(err).__name__}: {err}"
            ) from None

    def _warm_modes(self, loaded: _Loaded, rows_max: int) -> None:
        info = loaded.info
        loaded.calib_batches = tuple(sorted({1, min(8, rows_max), rows_max}))
        start = time.monotonic()
        largest = _largest_batch(info, rows_max)
        if self._fixed_threads is None:
            self._choose_threads(loaded, [_padding_item(info, 1, info.max_length)])
        # Plans are calibrated on the threads they will run on.
        torch.set_num_threads(loaded.threads)
        own = info.config_gate.keep_ratio
        ratios = info.serving.keep_ratios or self._keep_ratios  # its serving.yaml's, if any
        loaded.keep_ratios = tuple(
            sorted({*ratios, *self._required_ratios, *([own] if own else [])})
        )
        served = [self._resolve(loaded, "dynamic", threshold=0.5), self._resolve(loaded, "dense")]
        for mode in ("static", "dynamic"):
            for knobs in ({}, *({"keep_ratio": r} for r in loaded.keep_ratios)):
                served.append(self._resolve(loaded, mode, **knobs))
        for gate in served:
            self._plan(loaded, gate)
        loaded.sealed = True
        logger.info(
            "compiled %d plans for model %s in %.2f s (keep ratios %s)",
            len(loaded.plans),
            info.name,
            time.monotonic() - start,
            ", ".join(f"{r:g}" for r in loaded.keep_ratios),
        )
        length = _calib_length(info)
        for mode in GATE_MODES:
            gate = self._resolve(loaded, mode)
            for rows in sorted({1, rows_max}):
                self._infer(loaded, [gate], [_padding_item(info, rows, length)])
        # Every served plan once at the largest batch: the shared buffers reach their final
        # size now, whatever keep ratio comes first later.
        for gate in {gate.key: gate for gate in served}.values():
            self._infer(loaded, [gate] * len(largest), largest)
        logger.info("warmed up model %s in %.2f s", info.name, time.monotonic() - start)

    def _choose_threads(self, loaded: _Loaded, batch: Sequence[ModelInput]) -> None:
        """Under ``torch_threads: auto``: every core of this process for a model whose single
        request is compute the cores share well, one thread otherwise.

        The dense plan (it needs no calibration) times ``batch`` (one request of the model's
        full length) on one thread and on all. A small model's request (a few milliseconds
        at most) gains little from a second thread, whose spinning takes the core the event
        loop needs to read and answer requests, and its batches are mostly small; a base-size
        one (hundreds of milliseconds) runs nearly twice as fast on two.
        """
        cores = _usable_cores()
        loaded.threads = 1
        if cores <= 1:
            return
        dense = self._resolve(loaded, "dense")
        one = self._time_batch(loaded, dense, batch)
        if one < AUTO_THREADS_MIN_FORWARD_S:
            logger.info("model %s: 1 thread (a full-length request takes %.1f ms)",
                        loaded.info.name, one * 1e3)
            return
        loaded.threads = cores
        many = self._time_batch(loaded, dense, batch)
        if many > AUTO_THREADS_MIN_GAIN * one:
            loaded.threads = 1
        logger.info("model %s: %d thread%s (a full-length request: %.1f ms on 1 thread, "
                    "%.1f ms on %d)",
                    loaded.info.name, loaded.threads, "s" if loaded.threads > 1 else "",
                    one * 1e3, many * 1e3, cores)

    def _time_batch(
        self, loaded: _Loaded, gate: GateConfig, batch: Sequence[ModelInput]
    ) -> float:
        """Seconds of one forward of ``batch`` on ``loaded.threads`` threads (after one untimed
        forward on as many, which settles the thread pool)."""
        self._infer(loaded, [gate] * len(batch), batch)
        start = time.perf_counter()
        self._infer(loaded, [gate] * len(batch), batch)
        return time.perf_counter() - start

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=False)

    # ------------------------------------------------------------------ gate configurations

    def resolve_gate(
        self,
        model: str,
        mode: str,
        keep_ratio: object = None,
        threshold: object = None,
        dynamic_weight: object = None,
    ) -> GateConfig:
        """Validate a gate configuration for ``model`` and fill the model's defaults.

        Dynamic mode without a keep policy uses the checkpoint's; raises InvalidInput naming the
        offending knob and its allowed values.
        """
        return self._resolve(self._models[model], mode, keep_ratio, threshold, dynamic_weight)

    @staticmethod
    def _resolve(
        loaded: _Loaded,
        mode: str,
        keep_ratio: object = None,
        threshold: object = None,
        dynamic_weight: object = None,
    ) -> GateConfig:
        # models.GateSettings is the one validated type: its errors name the knob, the value
        # and the allowed range (strict numbers: "0.5" or true is refused).
        try:
            settings = models.settings_for(
                loaded.network.config,
                cast(models.GateMode, mode),
                cast("float | None", keep_ratio),
                cast("float | None", threshold),
                cast("float | None", dynamic_weight),
            ).canonical()
        except models.ConfigError as err:
            raise InvalidInput(_gate_message(str(err))) from None
        key = loaded.keys.get(settings)
        if key is None:
            if loaded.sealed:
                _check_served(loaded, settings)
            key = loaded.network.plan_key(settings)
            if loaded.sealed and key not in loaded.plans:
                raise InvalidInput(
                    f"parameter 'threshold': got {settings.threshold:g}; in static mode a "
                    "threshold selects a fixed channel set, and this one has no compiled plan "
                    f"here; use keep_ratio ({_listed(loaded.keep_ratios)}) or the dynamic mode"
                )
            loaded.keys[settings] = key
            if len(loaded.keys) > MAX_KEYS:
                loaded.keys.popitem(last=False)
        return GateConfig(
            settings.mode,
            settings.keep_ratio,
            settings.threshold,
            settings.dynamic_weight,
            key,
            loaded.generation,
        )

    def _plan(self, loaded: _Loaded, gate: GateConfig) -> models.SparsePlan:
        """The compiled sparse plan of ``gate`` (on the compute thread).

        Plans are what makes a closed channel cost nothing (docs/plans.md): static channels are
        removed once, dynamic ones gathered per request. Compiling includes a short strategy
        calibration, shared by plans of the same layer shapes. A warmed-up model serves only
        the plans its warm-up compiled; before that (direct use of the engine, tests) a plan
        is compiled on first use.
        """
        plan = loaded.plans.get(gate.key)
        if plan is not None:
            return plan
        if loaded.sealed:  # resolve_gate refuses such configurations: a bug if reached
            raise RuntimeError(f"model {loaded.info.name!r}: no compiled plan for {gate}")
        start = time.monotonic()
        plan = models.compile_plan(
            loaded.network,
            _settings_of(gate, loaded.bucket),
            batch_sizes=loaded.calib_batches,
            calib_length=_calib_length(loaded.info),
            workspace=self._workspace,
            timings=self._timings,
        )
        loaded.plans[gate.key] = plan
        logger.debug(
            "compiled %s plan for model %s in %.3f s",
            gate,
            loaded.info.name,
            time.monotonic() - start,
        )
        return plan

    # ------------------------------------------------------------------ compute

    def infer(
        self,
        model: str,
        gates: GateConfig | Sequence[GateConfig],
        inputs: Sequence[ModelInput | FloatArray],
    ) -> list[ItemResult | InvalidInput]:
        """Run one batch: one :class:`ModelInput` per request (or, for a model of one input,
        its (rows_i, T_i, C) array), and one gate configuration for all of them or one per
        request (of one :attr:`GateConfig.batch_key`: one plan, each request with its own
        blend weight and threshold). Each request's result, or, for a configuration resolved
        before a hot reload that the new model does not serve, its error.

        Each input is padded to the longest T with its contract's pad value and the true
        lengths passed, so a request's result does not depend on its batch mates. Blocking;
        call it on :attr:`executor`.
        """
        items = [i if isinstance(i, ModelInput) else ModelInput.of(i) for i in inputs]
        per_item = [gates] * len(items) if isinstance(gates, GateConfig) else list(gates)
        if len(per_item) != len(items):
            raise ValueError(f"{len(per_item)} gate configurations for {len(items)} requests")
        return self._infer(self._models[model], per_item, items)

    def _infer(
        self, loaded: _Loaded, gates: Sequence[GateConfig], inputs: Sequence[ModelInput]
    ) -> list[ItemResult | InvalidInput]:
        if any(g.generation != loaded.generation for g in gates):
            # Resolved before a hot reload: again, request by request. One plan before may be
            # several now (a batch each), and a configuration the new model does not serve
            # fails its own request only.
            outcomes: dict[int, ItemResult | InvalidInput] = {}
            groups: dict[tuple[object, ...], list[tuple[int, GateConfig]]] = {}
            for i, g in enumerate(gates):
                if g.generation != loaded.generation:
                    try:
                        g = self._resolve(
                            loaded, g.mode, g.keep_ratio, g.threshold, g.dynamic_weight
                        )
                    except InvalidInput as err:
                        outcomes[i] = err
                        continue
                groups.setdefault(g.batch_key, []).append((i, g))
            for members in groups.values():
                got = self._infer(
                    loaded, [g for _, g in members], [inputs[i] for i, _ in members]
                )
                outcomes.update(zip([i for i, _ in members], got, strict=True))
            return [outcomes[i] for i in range(len(inputs))]
        gate = gates[0]
        if any(g.batch_key != gate.batch_key for g in gates):
            raise ValueError("one batch runs one plan: its requests' gate configurations differ")
        settings = _settings_of(gate, loaded.bucket)
        row_settings = None
        if any(g != gate for g in gates):
            # Only its run-time values are a request's own: configurations of one plan may
            # still differ in a keep ratio that buckets to the same counts, or, statically, in
            # a threshold that keeps the same channels.
            row_settings = [
                settings.with_values_of(_settings_of(g, loaded.bucket))
                for g, item in zip(gates, inputs, strict=True)
                for _ in range(item.rows)
            ]
        plan = self._plan(loaded, gate)
        if loaded.threads and torch.get_num_threads() != loaded.threads:
            torch.set_num_threads(loaded.threads)
        rows = [item.rows for item in inputs]
        info = loaded.info
        full = info.max_length if info.contract.fixed_shape else None
        arrays, lengths = _stack(info.contract.data_inputs, inputs, full)
        names = [spec.name for spec in loaded.info.contract.data_inputs[1:]]
        dev = loaded.device
        with torch.inference_mode():
            xt = torch.from_numpy(arrays[0]).to(dev, non_blocking=True)  # (B, T, ...)
            lt = torch.from_numpy(lengths).to(dev, non_blocking=True)  # (B,)
            extras = {n: torch.from_numpy(a).to(dev, non_blocking=True)
                      for n, a in zip(names, arrays[1:], strict=True)}
            try:
                out = plan(xt, lt, settings, extras, row_settings)
            except models.InvalidInputError as err:
                raise InvalidInput(str(err)) from None
            kept = torch.stack(
                [out.kept[layer].to(torch.float64) for layer in loaded.info.layers], 1
            )  # (B, L)
            layer_ratio = (kept / loaded.widths).cpu().numpy()  # (B, L)
            flops = out.flops_ratio.cpu().numpy()  # (B,)
            # A copy: plans reuse their buffers, and results outlive this batch.
            logits = out.logits.float().cpu().numpy().copy()  # (B, classes)
        results: list[ItemResult | InvalidInput] = []
        row = 0
        for n in rows:
            layers = layer_ratio[row : row + n].mean(0)
            results.append(
                ItemResult(
                    logits=logits[row : row + n],
                    active_channel_ratio=float(layers.mean()),
                    flops_ratio=float(flops[row : row + n].mean()),
                    layer_active_ratios=tuple(float(v) for v in layers),
                )
            )
            row += n
        return results


def _stack(
    specs: Sequence[models.TensorSpec], inputs: Sequence[ModelInput], full: int | None = None
) -> tuple[list[npt.NDArray[np.generic]], IntArray]:
    """The batch's data inputs, each padded to the longest T with its pad value, and each
    row's length. ``full``: the model's full length when its input has a fixed shape: nothing
    is padded, the rows are stacked, and every row is ``full`` steps long."""
    longest = max(item.length for item in inputs) if full is None else full
    if len(inputs) == 1 and inputs[0].lengths is None and all(
        a.flags.c_contiguous for a in inputs[0].arrays
    ):
        item = inputs[0]
        return list(item.arrays), np.full(item.rows, longest, dtype=np.int64)
    total = sum(item.rows for item in inputs)
    if full is not None:
        stacked = [np.concatenate([item.arrays[j] for item in inputs]) for j in range(len(specs))]
        return stacked, np.full(total, full, dtype=np.int64)
    arrays = []
    for j, spec in enumerate(specs):
        out = padding(spec, total, longest)
        row = 0
        for item in inputs:
            a = item.arrays[j]
            out[row : row + a.shape[0], : a.shape[1]] = a
            row += a.shape[0]
        arrays.append(out)
    lengths = np.empty(total, dtype=np.int64)
    row = 0
    for item in inputs:
        lengths[row : row + item.rows] = item.length if item.lengths is None else item.lengths
        row += item.rows
    return arrays, lengths


def padding(spec: models.TensorSpec, rows: int, length: int) -> npt.NDArray[np.generic]:
    """``rows`` × ``length`` steps of input ``spec``'s pad value, in its datatype (a
    fixed-shape input: ``rows`` of its shape, whatever ``length``)."""
    shape = (rows, *spec.shape[1:]) if spec.length_dim is None else (
        rows, length, *spec.shape[2:])
    return np.full(shape, spec.pad_value, dtype=NUMPY_DTYPES[spec.datatype])


def _calib_length(info: ModelInfo) -> int:
    """The steps plans are calibrated and first warmed up at: a short request (64 steps at
    most, but never shorter than the network runs: an audio front end's receptive field), or
    the one length of a fixed-shape input (a ViT's tokens)."""
    if info.contract.fixed_shape:
        return info.max_length
    return max(info.min_length, min(info.max_length, 64))


def _largest_batch(info: ModelInfo, rows: int) -> list[ModelInput]:
    """The largest batch the server accepts: ``rows`` × ``max_length``, padded (two lengths)
    when it can be."""
    if (rows > 1 and info.max_length > 1 and info.mixed_lengths
            and not info.contract.fixed_shape):
        return [_padding_item(info, rows - 1, info.max_length),
                _padding_item(info, 1, info.max_length - 1)]
    return [_padding_item(info, rows, info.max_length)]


def _padding_item(info: ModelInfo, rows: int, length: int) -> ModelInput:
    """A request of pad values: what the warm-up runs."""
    return ModelInput(tuple(padding(spec, rows, length) for spec in info.contract.data_inputs))


def _usable_cores() -> int:
    """CPUs this process may run on (its affinity mask: a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _resolve_device(device: str) -> torch.device:
    try:
        return models.resolve_device(device)
    except models.DeviceError as err:
        raise EngineError(f"device (GATED_DEVICE): {err}") from None


def _read(repository: Path, name: str, device: torch.device) -> _Loaded:
    """Load ``repository/name`` onto ``device``; raises EngineError naming the model."""
    try:
        serving = load_model_serving(repository / name)
    except SettingsError as err:
        raise EngineError(f"model {name!r}: {err}") from None
    try:
        network = models.load_checkpoint(repository / name, device)
    except models.ModelError as err:
        raise EngineError(f"model {name!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a user's network code: name the model and cause
        raise EngineError(f"model {name!r}: {type(err).__name__}: {err}") from None
    return _wrap(name, network, device, serving)


def _wrap(
    name: str, network: models.GatedNetwork, device: torch.device,
    serving: ModelServing | None = None,
) -> _Loaded:
    cfg = network.config
    contract = network.contract()
    refused = contract.unservable()
    if refused is not None:
        raise EngineError(f"model {name!r}: {refused}")
    widths = network.gated_widths()
    layers = tuple(widths)
    dp = cfg.dynamic_pruning_config
    keep = dp.keep_ratio
    info = ModelInfo(
        name=name,
        version=MODEL_VERSION,
        platform=PLATFORM,
        in_channels=cfg.model.in_channels,
        num_classes=cfg.model.num_classes,
        max_length=cfg.model.max_length,
        layers=layers,
        config_gate=GateConfig("dynamic", keep, None if keep is not None else dp.threshold),
        device=str(device),
        contract=contract,
        mixed_lengths=network.padding_invariant,
        min_length=network.min_length,
        serving=serving or ModelServing(),
    )
    width_t = torch.tensor([float(widths[k]) for k in layers], dtype=torch.float64, device=device)
    return _Loaded(info, network, device, width_t, dp.bucket)


def _gate_message(text: str) -> str:
    """``gate: keep_ratio: got 2; ...`` -> ``parameter 'keep_ratio': got 2; ...`` (the V2 names)."""
    lines = []
    for line in text.splitlines():
        _, _, rest = line.partition("gate: ")
        name, _, detail = rest.partition(": ")
        name = "gate_mode" if name == "mode" else name
        lines.append(f"parameter {name!r}: {detail}" if detail else line)
    return "; ".join(lines)


def _check_served(loaded: _Loaded, settings: models.GateSettings) -> None:
    """InvalidInput unless ``settings``' keep ratio is one the warm-up compiled."""
    keep = settings.keep_ratio
    if keep is None or any(abs(keep - r) <= 1e-9 for r in loaded.keep_ratios):
        return
    where = (
        f"keep_ratios of {loaded.info.name}/serving.yaml" if loaded.info.serving.keep_ratios
        else "setting keep_ratios, GATED_KEEP_RATIOS"
    )
    raise InvalidInput(
        f"parameter 'keep_ratio': got {keep:g}; this server serves keep_ratio in "
        f"{{{_listed(loaded.keep_ratios)}}} ({where})"
    )


def _listed(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _settings_of(gate: GateConfig, bucket: int) -> models.GateSettings:
    return models.GateSettings(
        gate.mode,
        keep_ratio=gate.keep_ratio,
        threshold=gate.threshold,
        dynamic_weight=gate.dynamic_weight,
        bucket=bucket,
    )
