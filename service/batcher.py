"""Dynamic batching of inference requests, one batcher per served model.

Requests queue per batch key: the plan their gate configuration runs (configurations that
execute the same plan share it, each request with its own blend weight and threshold) and, for
a model whose results depend on padding, their sequence length. A batch holds requests of one
key only, so a runtime gate switch takes effect between batches and never inside one. A batch
holds at most ``max_batch_size`` requests and ``max_batch_rows`` rows (a request is never
split), and is
dispatched as soon as the oldest queued request has a full batch of compatible mates or has
waited ``max_queue_delay`` (``time.monotonic()``), whichever comes first; at light load it does not
wait when no other request for the model is in flight (``inflight``). Batches run one at a time on
the engine's compute thread, so while one computes the next one fills up: under load the delay
is rarely waited out, and at low load it bounds the latency added. Under load a batch short of
full also waits a fraction (``fill_fraction``) of the previous batch's compute time, counted from
its end, for the requests its answers bring back: closed-loop clients of a slow model otherwise
split into two alternating half batches. When more is queued than a batch takes and lengths may
mix, the oldest request's batch mates are those nearest its length (less padding).

Per request: a deadline (the V2 ``timeout`` parameter or the default) fails it with
``RequestTimeout`` (504) if it is still queued when the deadline passes; ``Ticket.abandon``
(the client disconnected) drops it before compute. Neither ever reaches the model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from typing import Any

from service.engine import GateConfig, ItemResult, ModelInput
from service.errors import (
    ClientDisconnected,
    InvalidInput,
    QueueFull,
    RequestTimeout,
    ServerNotReady,
    ServiceError,
)
from service.metrics import Metrics
from service.tracing import BatchTiming, Tracing

logger = logging.getLogger(__name__)

# A batch: each request's gate configuration (one batch key) and its input -> each request's
# result, or the error of that request alone.
Compute = Callable[
    [Sequence[GateConfig], Sequence[ModelInput]], Sequence["ItemResult | InvalidInput"]
]


class Ticket:
    """A queued request: await ``future`` for its result, call ``abandon`` if nobody will."""

    __slots__ = (
        "_batcher", "batch", "dropped", "enqueued", "enqueued_ns", "future", "gate",
        "item", "request_id", "span", "taken", "timer",
    )

    def __init__(
        self,
        batcher: DynamicBatcher,
        gate: GateConfig,
        item: ModelInput,
        future: asyncio.Future[ItemResult],
        request_id: str | None,
        span: Any = None,
    ) -> None:
        self._batcher = batcher
        self.gate = gate
        self.item = item
        self.future = future
        self.request_id = request_id
        self.enqueued = time.monotonic()
        self.taken = False  # part of a batch already: too late to drop
        self.dropped = False  # expired or abandoned: no longer counted in the queue
        self.timer: asyncio.TimerHandle | None = None
        # Tracing: the request's span (linked from its batch's), admission and batch times.
        self.span = span
        self.enqueued_ns = time.time_ns()
        self.batch: BatchTiming | None = None

    def abandon(self) -> None:
        """The client went away: drop the request if it has not reached the model yet."""
        self._batcher._drop(self, ClientDisconnected("client disconnected before compute"))


class DynamicBatcher:
    """Bounded queue plus one dispatch loop for one model; see the module docstring."""

    def __init__(
        self,
        *,
        model: str,
        compute: Compute,
        executor: Executor,
        metrics: Metrics,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        max_batch_rows: int | None = None,
        inflight: Callable[[], int] | None = None,
        same_length: bool = False,
        tracing: Tracing | None = None,
        fill_fraction: float = 0.0,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError(
                "max_batch_size and max_queue_size must be >= 1 and max_queue_delay_s >= 0"
            )
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        if not 0.0 <= fill_fraction <= 1.0:
            raise ValueError("fill_fraction must be within [0, 1]")
        self.model = model
        self._compute = compute
        self._executor = executor
        self._max_batch = max_batch_size
        self._max_rows = max_batch_rows  # None: no row limit
        self._max_delay = max_queue_delay_s
        self._max_queue = max_queue_size
        self._inflight = inflight
        self._last_size = 0  # requests in the previous batch: a cheap load signal
        # Under load, a batch short of full waits up to this fraction of the previous batch's
        # compute time (counted from when the compute thread became free) for mates.
        self._fill_fraction = fill_fraction
        self._last_compute_s = 0.0
        self._free_at = 0.0
        # Models whose results depend on padding batch only requests of one length.
        self._same_length = same_length
        self._tracing = tracing if tracing is not None and tracing.enabled else None
        self._queues: dict[Hashable, deque[Ticket]] = {}
        self._depth = 0  # live queued tickets (dropped ones may still sit in a deque)
        self._busy = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._want: Hashable | None = None  # waiting for this key to fill; None: any arrival
        self._queue_seconds = metrics.queue_seconds.labels(model)
        self._batch_size = metrics.batch_size.labels(model)
        self._compute_seconds = {
            mode: metrics.compute_seconds.labels(model, mode) for mode in metrics.gate_modes
        }

    # ------------------------------------------------------------------ public

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return self._depth

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch computing."""
        return self._depth == 0 and not self._busy

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"batcher-{self.model}"
            )

    def submit(
        self,
        gate: GateConfig,
        item: ModelInput,
        timeout_s: float,
        request_id: str | None = None,
        span: Any = None,
    ) -> Ticket:
        """Queue one request; raises QueueFull (503) when ``max_queue_size`` are waiting.

        ``span``: the request's trace span, linked from its batch's span when tracing is on.
        """
        if self._closing:
            raise ServerNotReady("server is shutting down")
        if self._depth >= self._max_queue:
            raise QueueFull(
                f"queue of model {self.model!r} is full ({self._max_queue} requests); retry later"
            )
        loop = asyncio.get_running_loop()
        ticket = Ticket(self, gate, item, loop.create_future(), request_id, span)
        ticket.timer = loop.call_later(timeout_s, self._expire, ticket, timeout_s)
        key = self.key(gate, item)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(ticket)
        self._depth += 1
        waiter = self._waiter
        if (
            waiter is not None
            and not waiter.done()
            and (self._want is None or (self._want == key and self._full(queue)))
        ):
            waiter.set_result(None)
        return ticket

    async def stop(self, timeout_s: float) -> None:
        """Finish every queued request (no more delay waits), then end the loop.

        Requests still queued after ``timeout_s`` fail with ServerNotReady (503).
        """
        self._closing = True
        self._wake()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            logger.error(
                "model %s: %d requests still queued after %.1f s of drain; failing them",
                self.model, self._depth, timeout_s,
            )
            task.cancel()
            for queue in self._queues.values():
                for ticket in queue:
                    self._drop(ticket, ServerNotReady("server shut down before compute"))
            self._queues.clear()

    def key(self, gate: GateConfig, item: ModelInput) -> Hashable:
        """Requests of one key may share a batch: same plan, and same length where needed."""
        key = gate.batch_key
        return (*key, item.length) if self._same_length else key

    # ------------------------------------------------------------------ internals

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _drop(self, ticket: Ticket, error: ServiceError) -> None:
        # The future may be cancelled already (its awaiting task was): it still leaves the
        # queue's count exactly once.
        if ticket.taken or ticket.dropped:
            return
        ticket.dropped = True
        if ticket.timer is not None:
            ticket.timer.cancel()
        self._depth -= 1
        if not ticket.future.done():
            ticket.future.set_exception(error)
            # Nobody may await the future (the client is gone): mark the exception as retrieved.
            ticket.future.exception()

    def _expire(self, ticket: Ticket, timeout_s: float) -> None:
        self._drop(
            ticket,
            RequestTimeout(
                f"request timed out after {timeout_s:g} s in the queue of model {self.model!r}"
            ),
        )

    def _full(self, queue: deque[Ticket]) -> bool:
        """A whole batch is queued: ``max_batch_size`` live requests or ``max_batch_rows`` rows
        (expired or abandoned tickets may still sit in the queue; they do not count)."""
        live = rows = 0
        for ticket in queue:
            if ticket.future.done():
                continue
            live += 1
            rows += ticket.item.rows
            if live >= self._max_batch or (self._max_rows is not None and rows >= self._max_rows):
                return True
        return False

    def _oldest(self) -> Hashable | None:
        """Batch key whose first live request has waited longest; drops dead heads."""
        best: Hashable | None = None
        best_time = 0.0
        for gate in list(self._queues):
            queue = self._queues[gate]
            while queue and (queue[0].future.done()):
                queue.popleft()
            if not queue:
                del self._queues[gate]
                continue
            if best is None or queue[0].enqueued < best_time:
                best, best_time = gate, queue[0].enqueued
        return best

    async def _sleep(self, want: Hashable | None, timeout_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter, self._want = waiter, want
        timer = None
        if timeout_s is not None:
            timer = loop.call_later(timeout_s, _resolve, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _collect(self) -> tuple[GateConfig | None, list[Ticket]] | None:
        """Wait for the next batch; None once closing and empty."""
        while True:
            key = self._oldest()
            if key is None:
                if self._closing:
                    return None
                await self._sleep(None, None)
                continue
            queue = self._queues[key]
            if self._full(queue) or self._closing:
                break
            now = time.monotonic()
            remaining = queue[0].enqueued + self._max_delay - now
            if remaining <= 0 and self._last_size > 1:
                # Under load the oldest request has waited out the delay while the previous
                # batch computed; the clients that batch just answered are sending their next
                # requests now. A fuller batch computes each row for less, so waiting a small
                # part of the previous batch's compute time for them buys throughput.
                remaining = self._free_at + self._fill_fraction * self._last_compute_s - now
            if remaining <= 0:
                break
            # Light load (the last batch was a single request) and every request the server
            # holds for this model is already queued: no mate is on its way, waiting would only
            # add latency. Under load the delay is kept: it lets batches grow.
            if (
                self._last_size <= 1
                and self._inflight is not None
                and self._inflight() <= self._depth
            ):
                break
            await self._sleep(key, remaining)
        batch = self._take(queue)
        for ticket in batch:
            ticket.taken = True
            if ticket.timer is not None:
                ticket.timer.cancel()
        self._depth -= len(batch)
        self._last_size = len(batch)
        if not queue:
            del self._queues[key]
        # Every request of the batch runs the plan of the first one's configuration (the same
        # plan: that is what the key says); each response still names its own configuration.
        return (batch[0].gate if batch else None), batch

    def _take(self, queue: deque[Ticket]) -> list[Ticket]:
        """Pop the next batch of ``queue``'s live requests, within both limits.

        In arrival order when only requests of one length share a batch. Otherwise the oldest
        request first, then those nearest its length, shorter ones first (a batch is padded to
        its longest row, so they add no padding), chosen among the oldest two batches' worth:
        when more is queued than one batch takes, a short request does not pay for a long one,
        and no request is overtaken by more than that window. A request that would pass
        ``max_batch_rows`` waits for the next batch, and so does everything after it in that
        order.
        """
        live = [t for t in queue if not t.future.done()]
        order = live
        if not self._same_length and len(live) > 1:
            # Mates come from the oldest two batches' worth only: a long request is overtaken
            # by at most that many shorter ones, so sorting never starves it.
            head, window = live[0], 2 * self._max_batch
            near = sorted(live[1:window], key=lambda t: _padding_cost(head, t))
            order = [head, *near, *live[window:]]
        batch: list[Ticket] = []
        rows = 0
        for ticket in order:
            if len(batch) >= self._max_batch:
                break
            n = ticket.item.rows
            if batch and self._max_rows is not None and rows + n > self._max_rows:
                break  # the next batch starts with it
            rows += n
            batch.append(ticket)
        chosen = {id(t) for t in batch}
        queue.clear()
        queue.extend(t for t in live if id(t) not in chosen)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            collected = await self._collect()
            if collected is None:
                return
            gate, batch = collected
            if not batch or gate is None:
                continue
            self._busy = True
            try:
                await self._execute(loop, gate, batch)
            finally:
                self._busy = False

    async def _execute(
        self, loop: asyncio.AbstractEventLoop, gate: GateConfig, batch: list[Ticket]
    ) -> None:
        start = time.monotonic()
        items = [t.item for t in batch]
        timing = BatchTiming(time.time_ns(), size=len(batch), rows=sum(i.rows for i in items))
        for ticket in batch:
            self._queue_seconds.observe(start - ticket.enqueued)
            ticket.batch = timing
        try:
            gates = [t.gate for t in batch]
            results = await loop.run_in_executor(self._executor, self._compute, gates, items)
        except InvalidInput as err:
            for ticket in batch:
                _fail(ticket, err)
            return
        except asyncio.CancelledError:
            # The drain timed out and the loop is being cancelled: the batch still computes on
            # the compute thread, but nobody will deliver it; its requests fail, none hangs.
            for ticket in batch:
                _fail(ticket, ServerNotReady("server shut down before the batch finished"))
            raise
        except Exception:
            ids = ", ".join(str(t.request_id) for t in batch)
            logger.exception(
                "model %s: batch of %d failed (request ids: %s)", self.model, len(batch), ids
            )
            for ticket in batch:
                _fail(ticket, ServiceError("internal error while computing the batch"))
            return
        timing.end_ns = time.time_ns()
        self._free_at = time.monotonic()
        self._last_compute_s = self._free_at - start
        self._compute_seconds[gate.mode].observe(self._last_compute_s)
        if self._tracing is not None:
            self._tracing.record_batch(self.model, gate.mode, timing, [t.span for t in batch])
        self._batch_size.observe(len(batch))
        for ticket, result in zip(batch, results, strict=True):
            if isinstance(result, InvalidInput):
                _fail(ticket, result)
            elif not ticket.future.done():
                ticket.future.set_result(result)


def _padding_cost(head: Ticket, ticket: Ticket) -> tuple[bool, int, float]:
    """Sort key of ``ticket`` as a batch mate of ``head``: no longer than it first, then by
    how far its length is from head's, then by age."""
    gap = ticket.item.length - head.item.length
    return (gap > 0, abs(gap), ticket.enqueued)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _fail(ticket: Ticket, error: Exception) -> None:
    if not ticket.future.done():
        ticket.future.set_exception(error)
