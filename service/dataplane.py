"""The data plane: what a request means, whichever protocol carried it.

REST (``service.rest``) and gRPC (``service.grpc``) are thin front ends: each turns its wire
format into the objects of ``service.protocol`` (a ``DecodedRequest``: named inputs of any V2
datatype, requested outputs, parameters), calls one method here, and turns the answer or the
typed error (``service.errors``, mapped to each protocol's codes in one table) back into its
wire format. Everything else lives here once: readiness, metadata, the model repository, admin
authorisation, request limits, validation against the model's contract, gate parameters, the
batcher and its deadline, cancellation before compute, outcome metrics and tracing.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from models.contract import TensorSpec
from models.gate_config import GATE_PARAMETERS
from service.batcher import Ticket
from service.engine import GateConfig, ItemResult, ModelInfo, ModelInput, padding
from service.errors import (
    CODES,
    AdminDisabled,
    ClientDisconnected,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    ServiceError,
    Unauthorized,
    mapping,
)
from service.protocol.errors import shown
from service.protocol.types import (
    DecodedRequest,
    ModelMetadata,
    ParameterValue,
    RepositoryModel,
    ServerMetadata,
    Tensor,
    TensorMetadata,
)
from service.state import ModelRuntime, ServiceState
from service.tracing import Tracing

logger = logging.getLogger(__name__)

SERVER_NAME = "gated-serve"
EXTENSIONS = ["binary_tensor_data", "model_repository", "parameters"]
# A bound on the inputs of one request, far above what a model declares, so that a hostile
# request cannot make the decoder walk thousands of tensors.
MAX_INPUTS = 16
# Longest queue timeout a request may ask for with the ``timeout`` parameter.
MAX_TIMEOUT_S = 3600.0
# A model's request needs no more bytes than this per tensor element (a float in JSON, as
# tritonclient writes it, takes at most ~25 with its comma; binary takes 8 at most) plus the
# overhead below for names, shapes and parameters: bodies past that are refused before they
# are read, so the largest body the parser ever sees is sized by the model, not by 16 MiB.
BYTES_PER_ELEMENT = 32
OVERHEAD_BYTES = 64 * 1024
# Values a JSON document may hold besides the tensor elements (shapes, names, parameters).
OVERHEAD_VALUES = 4096


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request to a model may carry; front ends check these while decoding, before
    any tensor is allocated (and the JSON bounds before the document is parsed)."""

    max_inputs: int
    max_outputs: int
    max_tensor_elements: int
    max_request_bytes: int  # min(max_request_bytes setting, what the largest request needs)
    max_json_values: int
    max_request_rows: int = 64  # the batch dimension of one request (the model's own bound)


@dataclass(slots=True)
class InferResponse:
    """A computed answer, before any wire format."""

    model_name: str
    model_version: str
    id: str | None
    outputs: list[Tensor]  # the ones the request asked for (all when it named none)
    parameters: dict[str, ParameterValue]
    binary_outputs: set[str]  # outputs the request wants as raw bytes (REST's binary extension)


# A front end's decoder: the wire request -> DecodedRequest, within the limits it is given.
Decode = Callable[[Limits], Awaitable[DecodedRequest]]


class DataPlane:
    """Every operation of the V2 protocol, over one ``ServiceState``."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._limits: dict[str, tuple[ModelInfo, Limits]] = {}

    @property
    def tracing(self) -> Tracing:
        """The state's tracer, the one the batchers use too."""
        return self.state.tracing

    # ------------------------------------------------------------------ health and metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Every model loaded and warmed up, at least one served, and not draining."""
        return self.state.ready

    def check_ready(self) -> None:
        """Raise ServerNotReady (503 / UNAVAILABLE) while loading or draining."""
        self.state.check_ready()

    def check_serving(self) -> None:
        """Readiness as probes see it: ``check_ready``, and at least one model served."""
        self.state.check_serving()

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether ``name`` serves now; raises ModelNotFound for a model that does not exist."""
        self.state.model(name, version or None)
        return self.state.ready

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=self.state.version, extensions=EXTENSIONS)

    def model_info(self, name: str, version: str | None = None) -> ModelInfo:
        return self.state.model(name, version or None).info

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        info = self.model_info(name, version)

        def described(specs: Iterable[TensorSpec]) -> list[TensorMetadata]:
            return [TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
                    for t in specs]

        return ModelMetadata(
            name=info.name,
            versions=[info.version],
            platform=info.platform,
            inputs=described(info.contract.inputs),
            outputs=described(info.contract.outputs),
        )

    def repository_index(self, ready_only: bool = False) -> list[RepositoryModel]:
        """Every model of the repository with its state, sorted by name: READY, or UNAVAILABLE
        with the reason (unloaded, not loaded yet, server draining); ``ready_only`` keeps the
        ones that serve now."""
        state = self.state
        up = state.loaded and not state.draining
        entries = {
            name: RepositoryModel(
                name=name, version=runtime.info.version,
                state="READY" if up else "UNAVAILABLE",
                reason=_served_reason(up, state.load_failures.get(name)),
            )
            for name, runtime in state.models.items()
        }
        engine = state.engine
        present = engine.repository_models() if engine is not None else []
        for name, why in state.unavailable.items():
            if name in present:  # a folder removed since is no longer listed
                entries.setdefault(
                    name, RepositoryModel(name=name, state="UNAVAILABLE", reason=why)
                )
        if engine is not None:
            for name in present:
                entries.setdefault(
                    name,
                    RepositoryModel(
                        name=name, state="UNAVAILABLE",
                        reason="in the repository, not loaded (load it through the repository "
                        "API)",
                    ),
                )
        index = [entries[name] for name in sorted(entries)]
        return [e for e in index if e.state == "READY"] if ready_only else index

    # ------------------------------------------------------------------ admin

    def authorize(self, credentials: str | None) -> None:
        """Check an admin call's bearer token (the value of an ``authorization`` header or
        gRPC metadata entry); raises AdminDisabled, Unauthorized or Forbidden."""
        try:
            self._check_token(credentials)
        except (Unauthorized, Forbidden) as err:
            row = mapping(err)
            self._account(None, row.outcome, row.reason, "")
            raise

    def _check_token(self, credentials: str | None) -> None:
        token = self.state.settings.admin_token
        if token is None:
            raise AdminDisabled("admin API is disabled: set GATED_ADMIN_TOKEN to enable it")
        if credentials is None:
            raise Unauthorized("missing Authorization: Bearer <token> header")
        scheme, _, presented = credentials.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("Authorization header must be 'Bearer <token>'")
        # Constant time: response timing must not reveal how much of a guess was right.
        if not hmac.compare_digest(
            presented.strip().encode(), token.get_secret_value().encode()
        ):
            raise Forbidden("invalid admin token")

    def gate(self, name: str) -> GateConfig:
        """The configuration ``name``'s requests without gate parameters run under."""
        return self.state.model(name).gate

    async def load(self, name: str, parameters: Collection[str] = ()) -> ModelInfo:
        """Load ``name`` from the repository again (or for the first time) and serve it.

        ``parameters``: the names of the protocol's load parameters the request carried
        (Triton's config or file overrides); none is supported, so any is refused.
        """
        if parameters:
            raise InvalidInput(
                f"repository load parameters ({', '.join(shown(p) for p in list(parameters)[:4])})"
                " are not supported: the model loads from its folder in the repository"
            )
        state = self.state
        state.check_ready()
        async with state.repository_lock:
            runtime = await state.reload(name)
        logger.info("model %s: loaded from the repository", name)
        return runtime.info

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` (then 404); queued requests are still answered first."""
        state = self.state
        state.check_ready()
        async with state.repository_lock:
            await state.unload(name)
        logger.info("model %s: unloaded", name)

    def set_gate(
        self,
        name: str,
        mode: str,
        keep_ratio: float | None,
        threshold: float | None,
        dynamic_weight: float | None,
    ) -> tuple[GateConfig, GateConfig]:
        """Switch ``name``'s runtime gate configuration; returns (new, previous)."""
        state = self.state
        runtime = state.model(name)
        state.check_ready()
        engine = state.engine
        assert engine is not None  # check_ready passed
        gate = engine.resolve_gate(name, mode, keep_ratio, threshold, dynamic_weight)
        previous, runtime.gate = runtime.gate, gate
        if state.metrics is not None:
            state.metrics.gate_switches.labels(name, gate.mode).inc()
            state.metrics.set_gate(name, gate.mode, gate.keep_ratio)
        logger.info("model %s: gate switched from %s to %s", name, _show(previous), _show(gate))
        return gate, previous

    # ------------------------------------------------------------------ inference

    def limits(self, runtime: ModelRuntime) -> Limits:
        """What one request to ``runtime``'s model may carry (cached per loaded model)."""
        info = runtime.info
        cached = self._limits.get(info.name)
        if cached is not None and cached[0] is info:
            return cached[1]
        settings = self.state.settings
        rows = info.serving.resolved(settings).max_request_rows
        steps = rows * info.max_length
        per_input = [rows * math.prod(spec.shape[1:]) if spec.length_dim is None
                     else steps * math.prod(spec.shape[2:]) for spec in info.contract.inputs]
        elements = sum(per_input)  # every input at its largest
        limits = Limits(
            max_inputs=MAX_INPUTS,
            max_outputs=MAX_INPUTS,
            max_tensor_elements=max(per_input),
            max_request_bytes=min(
                settings.max_request_bytes, elements * BYTES_PER_ELEMENT + OVERHEAD_BYTES
            ),
            max_json_values=elements + OVERHEAD_VALUES,
            max_request_rows=rows,
        )
        self._limits[info.name] = (info, limits)
        return limits

    async def infer(
        self,
        model: str,
        version: str | None,
        decode: Decode,
        *,
        protocol: str,
        trace_carrier: Mapping[str, str] | None = None,
        deadline_s: float | None = None,
        disconnected: Callable[[], Awaitable[None]] | None = None,
    ) -> InferResponse:
        """Run one inference request.

        ``decode`` reads the request within the model's limits. ``deadline_s``: seconds the
        transport still allows from now (a gRPC deadline), on top of the ``timeout``
        parameter. ``disconnected`` resolves when the client goes away (REST); a cancelled call
        (gRPC) is dropped alike: before compute, it never reaches the model. With batching off
        (the naive baseline) a request goes to the compute thread at once and runs whatever
        happens to its client.
        """
        state = self.state
        start = time.monotonic()
        runtime: ModelRuntime | None = None
        request_id: str | None = None
        tracing = self.tracing
        span = None
        ticket_gate: GateConfig | None = None
        timing = None
        enqueued_ns: int | None = None
        result: ItemResult | None = None
        try:
            runtime = state.model(model, version or None)
            if tracing.enabled:  # named after the served model, never the client's string
                span = tracing.start_request(trace_carrier, runtime.info.name, protocol)
            state.check_ready()
            # In flight from here on: a request whose body is still arriving (or stalled) is
            # not accepted yet, and a drain does not wait for it.
            runtime.reading += 1
            try:
                decoded = await decode(self.limits(runtime))
            finally:
                runtime.reading -= 1
            request_id = decoded.id
            state.check_ready()  # a drain may have begun while the body arrived
            runtime.inflight += 1
            try:
                if state.models.get(runtime.info.name) is not runtime:  # unloaded meanwhile
                    raise ModelNotFound(
                        f"model {runtime.info.name!r} was unloaded while the request was read"
                    )
                settings = state.settings
                array = _model_input(
                    decoded, runtime.info, self.limits(runtime).max_request_rows,
                    settings.allow_non_finite,
                )
                ticket_gate, timeout_s = self._request_options(runtime, decoded.parameters)
                if deadline_s is not None:  # what is left of it after reading the request
                    remaining = deadline_s - (time.monotonic() - start)
                    timeout_s = min(timeout_s, max(remaining, 0.0))
                batcher = runtime.batcher
                if batcher is None:
                    result = await self._compute_now(runtime, ticket_gate, array)
                else:
                    ticket = batcher.submit(ticket_gate, array, timeout_s, request_id, span)
                    enqueued_ns = ticket.enqueued_ns
                    try:
                        result = await _await_ticket(ticket, disconnected)
                    finally:
                        timing = ticket.batch
                response = _response(runtime.info, decoded, ticket_gate, result,
                                     settings.allow_non_finite)
            finally:
                runtime.inflight -= 1
        except BaseException as err:
            if span is not None and runtime is not None:
                tracing.finish_request(
                    span, model=runtime.info.name,
                    gate_mode=ticket_gate.mode if ticket_gate else None,
                    enqueued_ns=enqueued_ns, batch=timing, flops_ratio=None, error=err,
                )
            if isinstance(err, asyncio.CancelledError):  # the caller gave up: as a disconnect
                row = CODES[ClientDisconnected]
                self._account(runtime, row.outcome, row.reason, protocol)
                raise
            if not isinstance(err, Exception):
                raise
            self._account_failure(runtime, err, request_id, protocol)
            if isinstance(err, (ServiceError, InvalidInput)):
                raise
            logger.exception("request %s to model %s failed", request_id, model)
            raise ServiceError("internal error") from None
        if span is not None:
            tracing.finish_request(
                span, model=runtime.info.name, gate_mode=ticket_gate.mode,
                enqueued_ns=enqueued_ns,
                batch=timing, flops_ratio=result.flops_ratio, error=None,
            )
        metrics = state.metrics
        if metrics is not None:
            name = runtime.info.name
            series = metrics.outcomes(name)
            series.success[protocol].inc()
            series.request_seconds.observe(time.monotonic() - start)
            mode = ticket_gate.mode
            series.active[mode].observe(result.active_channel_ratio)
            series.flops[mode].observe(result.flops_ratio)
            for layer, ratio in zip(runtime.info.layers, result.layer_active_ratios, strict=True):
                series.layer(layer).observe(ratio)
        return response

    async def _compute_now(
        self, runtime: ModelRuntime, gate: GateConfig, array: ModelInput
    ) -> ItemResult:
        """Batching off: one forward per request on the compute thread."""
        engine = self.state.engine
        assert engine is not None  # check_ready passed
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(
            engine.executor, engine.infer, runtime.info.name, gate, [array]
        )
        result = results[0]
        if isinstance(result, InvalidInput):
            raise result
        return result

    def _request_options(
        self, runtime: ModelRuntime, params: dict[str, ParameterValue]
    ) -> tuple[GateConfig, float]:
        """Gate configuration and queue timeout of one request (V2 ``parameters``).

        No gate parameter: the model's runtime configuration. ``gate_mode`` equal to the
        runtime mode keeps the runtime knobs; another mode starts from the model's defaults for
        that mode. ``keep_ratio`` or ``threshold`` then replace the keep policy. ``timeout`` is
        in microseconds, as Triton and its clients define it.
        """
        timeout_s = self.state.settings.request_timeout_s
        raw_timeout = params.get("timeout")
        if raw_timeout is not None:
            if isinstance(raw_timeout, bool) or not isinstance(raw_timeout, (int, float)) or not (
                raw_timeout > 0
            ):
                raise InvalidInput(
                    "parameter 'timeout' must be a positive number of microseconds, "
                    f"got {raw_timeout!r}"
                )
            timeout_s = min(float(raw_timeout) / 1e6, MAX_TIMEOUT_S)
        if not any(p in params for p in GATE_PARAMETERS):
            return runtime.gate, timeout_s

        # The engine validates every knob against models.GateSettings, the one place the bounds
        # live: its errors name the parameter, the value and the allowed range.
        base = runtime.gate
        mode = params.get("gate_mode", base.mode)
        if mode != base.mode:
            base = GateConfig(str(mode))
        keep_ratio = params.get("keep_ratio")
        threshold = params.get("threshold")
        weight = params.get("dynamic_weight")
        if keep_ratio is None and threshold is None:
            keep_ratio, threshold = base.keep_ratio, base.threshold
        if weight is None:
            weight = base.dynamic_weight
        engine = self.state.engine
        assert engine is not None  # check_ready passed
        gate = engine.resolve_gate(runtime.info.name, str(mode), keep_ratio, threshold, weight)
        return gate, timeout_s

    # ------------------------------------------------------------------ accounting

    def _account(
        self, runtime: ModelRuntime | None, outcome: str, reason: str | None, protocol: str
    ) -> None:
        metrics = self.state.metrics
        if metrics is None:
            return
        if reason is not None:
            metrics.rejected.labels(reason).inc()
        if runtime is not None:
            metrics.requests.labels(runtime.info.name, outcome, protocol).inc()

    def _account_failure(
        self,
        runtime: ModelRuntime | None,
        err: Exception,
        request_id: str | None,
        protocol: str,
    ) -> None:
        row = mapping(err)
        self._account(runtime, row.outcome, row.reason, protocol)
        if row.outcome in ("timeout", "error") and isinstance(err, ServiceError):
            logger.warning("request %s: %s", request_id, err.message)


async def _await_ticket(
    ticket: Ticket, disconnected: Callable[[], Awaitable[None]] | None
) -> ItemResult:
    if disconnected is None:
        try:
            return await ticket.future
        except asyncio.CancelledError:
            ticket.abandon()  # the caller gave up (a cancelled gRPC call): skip compute
            raise
    # While queued, watch the connection: a client that gives up should not cost a forward.
    watcher = asyncio.ensure_future(disconnected())
    watcher.add_done_callback(lambda task: None if task.cancelled() else ticket.abandon())
    try:
        return await ticket.future
    except asyncio.CancelledError:
        ticket.abandon()  # the server gave up on this request (forced shutdown): skip compute
        raise
    finally:
        watcher.cancel()


_OUTPUT_EXTENSIONS = {
    "shared_memory_region": "shared memory",
    "classification": "classification (top-k labels; ask for the logits instead)",
}


def _served_reason(up: bool, failure: str | None) -> str:
    if not up:
        return "server is loading or shutting down"
    return "" if failure is None else f"serving the previous load; the last load failed: {failure}"


def _model_input(
    decoded: DecodedRequest, info: ModelInfo, max_rows: int, allow_non_finite: bool
) -> ModelInput:
    """The request's tensors, validated against the model's contract: every input named and
    typed as declared, of one [rows, T] (a fixed-shape input: exactly its shape), values in
    range; the mask read as row lengths (and columns past the longest row dropped); optional
    inputs not sent filled with their pad value. Any error here is the request's own, before
    it meets batch mates."""
    contract = info.contract
    specs = {spec.name: spec for spec in contract.inputs}
    given: dict[str, Tensor] = {}
    for tensor in decoded.inputs:
        if tensor.name not in specs:
            raise InvalidInput(
                f"unknown input {shown(tensor.name)}; model {info.name!r} takes {_declared(info)}"
            )
        given[tensor.name] = tensor  # names are unique: both codecs refuse a repeated one
    for spec in contract.inputs:
        if not spec.optional and spec.name not in given:
            raise InvalidInput(
                f"missing input {spec.name!r}; model {info.name!r} takes {_declared(info)}"
            )
    _check_outputs(decoded, info)
    arrays = {name: _input_array(t, specs[name], info, max_rows, allow_non_finite)
              for name, t in given.items()}
    first = contract.data_inputs[0]
    if contract.fixed_shape:  # the one input, of its declared shape: no lengths, no padding
        return ModelInput((arrays[first.name],))
    rows, length = arrays[first.name].shape[:2]
    for name, array in arrays.items():
        if array.shape[:2] != (rows, length):
            raise InvalidInput(
                f"input {name!r} has shape {list(given[name].array.shape)}; its [batch, T] must "
                f"be {first.name!r}'s, [{rows}, {length}]"
            )
    lengths = None
    mask = contract.mask
    if mask is not None and mask.name in arrays:
        lengths = _mask_lengths(arrays[mask.name], mask.name, info)
        longest = int(lengths.max())
        if longest < length:  # every row ends before T: drop the padding columns
            arrays = {name: a[:, :longest] for name, a in arrays.items()}
            length = longest
        if bool((lengths == length).all()):
            lengths = None
        elif not info.mixed_lengths:
            raise InvalidInput(
                f"model {info.name!r} does not mask padding: the rows of {mask.name!r} must "
                "all be ones, or send each row as its own request"
            )
    # An optional input not sent is its pad value (token type 0).
    data = tuple(arrays[spec.name] if spec.name in arrays else padding(spec, rows, length)
                 for spec in contract.data_inputs)
    return ModelInput(data, lengths)


def _declared(info: ModelInfo) -> str:
    return ", ".join(
        f"{spec.name!r}{' (optional)' if spec.optional else ''}" for spec in info.contract.inputs
    )


def _check_outputs(decoded: DecodedRequest, info: ModelInfo) -> None:
    produced = {s.name for s in info.contract.outputs}
    for out in decoded.outputs:
        if out.name not in produced:
            raise InvalidInput(
                f"unknown output {shown(out.name)}; model {info.name!r} produces "
                + ", ".join(repr(n) for n in sorted(produced))
            )
        # Extensions this server does not offer: refused, never silently ignored (a client
        # would read a shared memory region nobody wrote, or labels nobody computed).
        for key, feature in _OUTPUT_EXTENSIONS.items():
            if key in out.parameters:
                raise InvalidInput(
                    f"output {shown(out.name)} asks for {feature}, which this server does "
                    "not support"
                )


def _input_array(
    tensor: Tensor, spec: TensorSpec, info: ModelInfo, max_rows: int, allow_non_finite: bool
) -> np.ndarray:
    """One input's array, checked against its spec: datatype, shape, sizes and values."""
    name = spec.name
    array = tensor.array
    if tensor.datatype != spec.datatype:
        raise InvalidInput(f"input {name!r} must be {spec.datatype}, got {tensor.datatype}")
    if spec.length_dim is None:
        _check_fixed_shape(array, spec, max_rows)
        return _checked_values(array, spec, info, allow_non_finite)
    fixed = tuple(spec.shape[2:])
    if array.ndim == 2 and fixed == (1,):  # [batch, T] for one channel
        array = array.reshape(array.shape[0], array.shape[1], 1)
    if array.ndim != len(spec.shape) or tuple(array.shape[2:]) != fixed:
        allowed = spec.shape_text
        if fixed == (1,):
            allowed += " or [batch, T]"
        raise InvalidInput(
            f"input {name!r} must have shape {allowed}, got {list(tensor.array.shape)}"
        )
    length = array.shape[1]
    _check_rows(name, array.shape[0], length, list(tensor.array.shape), max_rows)
    if length > info.max_length:
        raise InvalidInput(
            f"input {name!r} has sequence length {length}; model {info.name!r} accepts "
            f"at most {info.max_length}"
        )
    if length < info.min_length:  # shorter than its convolutional front end's reach
        raise InvalidInput(
            f"input {name!r} has sequence length {length}; model {info.name!r} needs at "
            f"least {info.min_length}"
        )
    return _checked_values(array, spec, info, allow_non_finite)


def _check_fixed_shape(array: np.ndarray, spec: TensorSpec, max_rows: int) -> None:
    """An input without a length: [rows, *shape], every dimension after the batch exact."""
    if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != spec.shape[1:]:
        raise InvalidInput(
            f"input {spec.name!r} must be {spec.shape_text}, got {list(array.shape)}"
        )
    _check_rows(spec.name, array.shape[0], 1, list(array.shape), max_rows)


def _check_rows(name: str, rows: int, steps: int, shape: list[int], max_rows: int) -> None:
    """A request's ``rows`` of ``steps`` each (a fixed-shape input: 1): not empty, and at most
    ``max_rows`` rows."""
    if rows < 1 or steps < 1:
        raise InvalidInput(f"input {name!r} is empty: shape {shape}")
    if rows > max_rows:
        raise InvalidInput(
            f"input {name!r} has batch size {rows}; the limit per request is {max_rows}"
        )


def _checked_values(
    array: np.ndarray, spec: TensorSpec, info: ModelInfo, allow_non_finite: bool
) -> np.ndarray:
    """``array``, once its values are what ``spec`` allows: finite floats, integers in range."""
    name = spec.name
    if spec.datatype == "FP32":
        # Any NaN or Inf makes the float64 sum non-finite: one pass, no temporary mask.
        if not allow_non_finite and not math.isfinite(float(np.sum(array, dtype=np.float64))):
            raise InvalidInput(f"input {name!r} contains NaN or infinite values")
    elif spec.value_range is not None:
        low, high = spec.value_range
        least, most = int(array.min()), int(array.max())
        if least < low or most > high:
            raise InvalidInput(
                f"input {name!r} has values in [{least}, {most}]; model {info.name!r} accepts "
                f"[{low}, {high}]"
            )
    result: np.ndarray = array
    return result


def _mask_lengths(mask: np.ndarray, name: str, info: ModelInfo) -> np.ndarray:
    """Each row's length from a right-padding mask (ones, then zeros)."""
    if bool(((mask != 0) & (mask != 1)).any()):
        raise InvalidInput(f"input {name!r} must hold only 0 and 1")
    if mask.shape[1] > 1 and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise InvalidInput(
            f"input {name!r} must be ones then zeros in each row (right padding); this server "
            "pads requests itself"
        )
    lengths: np.ndarray = mask.sum(axis=1, dtype=np.int64)
    shortest = int(lengths.min())
    if shortest < max(1, info.min_length):
        raise InvalidInput(
            f"input {name!r} has a row with {shortest} valid steps; model {info.name!r} needs "
            f"at least {max(1, info.min_length)}"
        )
    return lengths


def _response(
    info: ModelInfo,
    decoded: DecodedRequest,
    gate: GateConfig,
    result: ItemResult,
    allow_non_finite: bool,
) -> InferResponse:
    parameters: dict[str, ParameterValue] = {"gate_mode": gate.mode}
    if gate.keep_ratio is not None:
        parameters["keep_ratio"] = gate.keep_ratio
    elif gate.threshold is not None:
        parameters["threshold"] = gate.threshold
    else:
        parameters["keep_ratio"] = 1.0  # no keep policy: every open channel runs
    if gate.dynamic_weight is not None:
        parameters["dynamic_weight"] = gate.dynamic_weight
    if not allow_non_finite and not np.isfinite(result.logits).all():
        # Finite but huge inputs can overflow float32 inside the network; JSON would carry the
        # result as nulls. The client has to scale its input.
        raise InvalidInput("input values too large: the model's outputs are not finite")
    parameters["active_channel_ratio"] = result.active_channel_ratio
    parameters["flops_ratio"] = result.flops_ratio
    # The served contract has one output: every request gets it (asking for an unknown one was
    # refused with the input).
    output = info.contract.outputs[0].name
    return InferResponse(
        model_name=info.name,
        model_version=info.version,
        id=decoded.id,
        outputs=[Tensor(output, result.logits)],
        parameters=parameters,
        binary_outputs=decoded.binary_output_names((output,)),
    )


def _show(gate: GateConfig) -> str:
    return (
        f"{gate.mode}(keep_ratio={gate.keep_ratio}, threshold={gate.threshold}, "
        f"dynamic_weight={gate.dynamic_weight})"
    )
