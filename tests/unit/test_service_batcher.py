"""DynamicBatcher: batch size and delay, homogeneity, queue bound, timeouts, disconnects, drain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.batcher import DynamicBatcher
from service.engine import GATE_MODES, GateConfig, ItemResult, ModelInput
from service.errors import (
    ClientDisconnected,
    InvalidInput,
    QueueFull,
    RequestTimeout,
    ServerNotReady,
    codes,
)
from service.metrics import Metrics

DYNAMIC = GateConfig("dynamic", 0.5, key=("dynamic", (8,), 0.5))
DENSE = GateConfig("dense", key=("dense",))
STATIC = GateConfig("static", key=("static", (16,), None))


class FakeEngine:
    """Records every batch; returns each request's first value as its 'logits'."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[tuple[GateConfig, list[float]]] = []
        self.delay_s = delay_s

    def __call__(
        self, gates: Sequence[GateConfig], items: Sequence[ModelInput]
    ) -> list[ItemResult]:
        assert len(gates) == len(items) and len({g.batch_key for g in gates}) == 1, gates
        gate = gates[0]
        time.sleep(self.delay_s)
        arrays = [item.arrays[0] for item in items]
        self.batches.append((gate, [float(a.ravel()[0]) for a in arrays]))
        return [ItemResult(a[:, 0, :1], 1.0, 1.0, (1.0,)) for a in arrays]


def _x(value: float) -> ModelInput:
    return ModelInput.of(np.full((1, 4, 1), value, dtype=np.float32))


def _batcher(
    engine: FakeEngine, pool: ThreadPoolExecutor, same_length: bool = False, **kw: float
) -> DynamicBatcher:
    metrics = Metrics(CollectorRegistry(), {"m": ("blocks.0",)}, GATE_MODES, "test")
    options = {"max_batch_size": 4, "max_queue_delay_s": 0.05, "max_queue_size": 16, **kw}
    return DynamicBatcher(
        model="m", compute=engine, executor=pool, metrics=metrics,
        max_batch_size=int(options["max_batch_size"]),
        max_queue_delay_s=float(options["max_queue_delay_s"]),
        max_queue_size=int(options["max_queue_size"]),
        max_batch_rows=int(options["max_batch_rows"]) if "max_batch_rows" in options else None,
        same_length=same_length,
        fill_fraction=float(options.get("fill_fraction", 0.0)),
    )


def _run(coro_fn: object) -> None:
    with ThreadPoolExecutor(1) as pool:
        asyncio.run(coro_fn(pool))  # type: ignore[operator]


def test_full_batch_dispatches_without_waiting_and_keeps_order() -> None:
    engine = FakeEngine()

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_queue_delay_s=10.0)
        b.start()
        start = time.monotonic()
        tickets = [b.submit(DYNAMIC, _x(i), 5.0) for i in range(8)]
        results = await asyncio.gather(*(t.future for t in tickets))
        assert time.monotonic() - start < 2.0  # never waited out the 10 s delay
        assert [float(r.logits[0, 0]) for r in results] == list(range(8))
        await b.stop(1.0)

    _run(scenario)
    assert [len(values) for _, values in engine.batches] == [4, 4]


def test_batches_stop_at_max_batch_rows() -> None:
    """Rows, not requests, bound a forward: a request that would pass the limit starts the next
    batch, and a request as large as the limit runs alone."""
    engine = FakeEngine()
    sizes = [2, 3, 4, 1, 1, 1, 4]

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_batch_size=8, max_batch_rows=4, max_queue_delay_s=0.0)
        tickets = [
            b.submit(DYNAMIC, ModelInput.of(np.full((n, 4, 1), i, dtype=np.float32)), 5.0)
            for i, n in enumerate(sizes)
        ]
        b.start()  # everything is queued before the first batch forms
        results = await asyncio.gather(*(t.future for t in tickets))
        assert [r.logits.shape[0] for r in results] == sizes
        await b.stop(1.0)

    _run(scenario)
    assert [values for _, values in engine.batches] == [[0.0], [1.0], [2.0], [3.0, 4.0, 5.0], [6.0]]


def test_a_batch_full_of_rows_does_not_wait_the_delay() -> None:
    engine = FakeEngine()

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_batch_size=8, max_batch_rows=4, max_queue_delay_s=10.0)
        b.start()
        start = time.monotonic()
        first = b.submit(DYNAMIC, ModelInput.of(np.zeros((2, 4, 1), np.float32)), 5.0)
        await asyncio.sleep(0.05)  # the batcher now waits for mates of the first request
        second = b.submit(DYNAMIC, ModelInput.of(np.zeros((2, 4, 1), np.float32)), 5.0)
        await asyncio.gather(first.future, second.future)
        assert time.monotonic() - start < 2.0  # 4 rows queued: the batch is full
        await b.stop(1.0)

    _run(scenario)
    assert [len(values) for _, values in engine.batches] == [2]


def test_partial_batch_waits_at_most_the_delay() -> None:
    engine = FakeEngine()

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_queue_delay_s=0.03)
        b.start()
        start = time.monotonic()
        tickets = [b.submit(DYNAMIC, _x(i), 5.0) for i in range(3)]
        await asyncio.gather(*(t.future for t in tickets))
        assert 0.02 <= time.monotonic() - start < 1.0
        await b.stop(1.0)

    _run(scenario)
    assert engine.batches == [(DYNAMIC, [0.0, 1.0, 2.0])]


def test_lone_request_at_light_load_skips_the_delay() -> None:
    engine = FakeEngine()

    async def scenario(pool: ThreadPoolExecutor) -> None:
        metrics = Metrics(CollectorRegistry(), {"m": ()}, GATE_MODES, "test")
        inflight = [1]
        b = DynamicBatcher(model="m", compute=engine, executor=pool, metrics=metrics,
                           max_batch_size=4, max_queue_delay_s=0.3, max_queue_size=8,
                           inflight=lambda: inflight[0])
        b.start()
        start = time.monotonic()
        await b.submit(DYNAMIC, _x(0), 5.0).future
        assert time.monotonic() - start < 0.2  # nobody else in flight: no wait
        inflight[0] = 3  # a third request is still being read: worth waiting for
        start = time.monotonic()
        pair = [b.submit(DYNAMIC, _x(i), 5.0) for i in (1, 2)]
        await asyncio.gather(*(t.future for t in pair))
        assert time.monotonic() - start >= 0.25
        await b.stop(1.0)

    _run(scenario)
    assert [v for _, v in engine.batches] == [[0.0], [1.0, 2.0]]


def test_a_deep_queue_batches_the_oldest_with_the_lengths_nearest_it() -> None:
    """More queued than a batch takes: the oldest request's mates are those nearest its length,
    no longer ones first (a batch is padded to its longest row); then the oldest left leads."""
    engine = FakeEngine()
    lengths = [100, 10, 90, 20, 95, 30]

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_batch_size=3, max_queue_delay_s=0.0)
        tickets = [b.submit(DYNAMIC, ModelInput.of(np.full((1, n, 1), n, np.float32)), 5.0)
                   for n in lengths]
        b.start()  # everything is queued before the first batch forms
        results = await asyncio.gather(*(t.future for t in tickets))
        assert [float(r.logits[0, 0]) for r in results] == lengths  # each its own answer
        await b.stop(1.0)

    _run(scenario)
    assert [values for _, values in engine.batches] == [[100.0, 95.0, 90.0], [10.0, 20.0, 30.0]]


def test_under_load_a_short_batch_waits_part_of_the_last_compute_for_mates() -> None:
    """Closed-loop clients of a slow model: the requests a batch's answers bring back join the
    next batch instead of leaving it half full; when none come, the wait is bounded by
    ``fill_fraction`` of the previous batch's compute time."""
    engine = FakeEngine(delay_s=0.4)

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_batch_size=4, max_queue_delay_s=0.0, fill_fraction=0.5)
        b.start()
        first = [b.submit(DYNAMIC, _x(i), 30.0) for i in range(4)]
        await asyncio.sleep(0.1)  # the first batch computes; two more requests queue
        queued = [b.submit(DYNAMIC, _x(i), 30.0) for i in range(4, 6)]
        await asyncio.gather(*(t.future for t in first))
        await asyncio.sleep(0.02)  # two answered clients send again
        back = [b.submit(DYNAMIC, _x(i), 30.0) for i in range(6, 8)]
        await asyncio.gather(*(t.future for t in queued + back))
        # Nobody else comes: the last two run after at most 0.5 x 0.4 s, not the deadline.
        last = [b.submit(DYNAMIC, _x(i), 30.0) for i in range(8, 10)]
        start = time.monotonic()
        await asyncio.gather(*(t.future for t in last))
        assert time.monotonic() - start < 0.4 + 0.2 + 1.0
        await b.stop(1.0)

    _run(scenario)
    assert [len(values) for _, values in engine.batches] == [4, 4, 2]


def test_batches_never_mix_gate_configurations() -> None:
    engine = FakeEngine()

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_queue_delay_s=0.01)
        b.start()
        gates = [DYNAMIC, DENSE, DYNAMIC, STATIC, DENSE, DYNAMIC]
        tickets = [b.submit(g, _x(i), 5.0) for i, g in enumerate(gates)]
        await asyncio.gather(*(t.future for t in tickets))
        await b.stop(1.0)

    _run(scenario)
    assert sorted((g.mode, v) for g, v in engine.batches) == [
        ("dense", [1.0, 4.0]), ("dynamic", [0.0, 2.0, 5.0]), ("static", [3.0])
    ]


def test_padding_dependent_models_batch_one_length_only() -> None:
    engine = FakeEngine()
    lengths = [4, 7, 4, 7, 4]

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, same_length=True, max_queue_delay_s=0.01)
        b.start()
        arrays = [np.full((1, n, 1), float(i), np.float32) for i, n in enumerate(lengths)]
        tickets = [b.submit(DYNAMIC, ModelInput.of(a), 5.0) for a in arrays]
        await asyncio.gather(*(t.future for t in tickets))
        await b.stop(1.0)

    _run(scenario)
    assert sorted(values for _, values in engine.batches) == [[0.0, 2.0, 4.0], [1.0, 3.0]]


def test_queue_bound_raises_queue_full() -> None:
    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(FakeEngine(), pool, max_queue_size=2)  # not started: nothing drains
        b.submit(DYNAMIC, _x(0), 5.0)
        b.submit(DYNAMIC, _x(1), 5.0)
        with pytest.raises(QueueFull, match="full"):
            b.submit(DYNAMIC, _x(2), 5.0)
        assert b.depth == 2

    _run(scenario)


def test_timeout_in_queue_fails_before_compute() -> None:
    engine = FakeEngine()

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_queue_delay_s=0.2)
        b.start()
        late = b.submit(DYNAMIC, _x(1), 0.01)
        ok = b.submit(DYNAMIC, _x(2), 5.0)
        with pytest.raises(RequestTimeout, match="timed out"):
            await late.future
        assert (await ok.future).logits[0, 0] == 2.0
        await b.stop(1.0)

    _run(scenario)
    assert engine.batches == [(DYNAMIC, [2.0])]


def test_abandoned_request_is_dropped_before_compute() -> None:
    engine = FakeEngine()

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_queue_delay_s=0.05)
        b.start()
        gone = b.submit(DYNAMIC, _x(1), 5.0)
        kept = b.submit(DYNAMIC, _x(2), 5.0)
        gone.abandon()
        assert b.depth == 1
        with pytest.raises(ClientDisconnected):
            await gone.future
        await kept.future
        await b.stop(1.0)

    _run(scenario)
    assert engine.batches == [(DYNAMIC, [2.0])]


def test_a_cancelled_waiter_leaves_the_queue_count_once() -> None:
    """A caller whose task is cancelled (a gRPC client that cancels) cancels the ticket's
    future with it; abandoning the ticket must still free its place in the queue, once."""
    engine = FakeEngine()

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_queue_size=2)  # not started: nothing drains
        ticket = b.submit(DYNAMIC, _x(1), 0.05)
        waiter = asyncio.ensure_future(ticket.future)
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        assert ticket.future.cancelled()
        ticket.abandon()
        assert b.depth == 0
        await asyncio.sleep(0.1)  # its queue timeout fires too: no second decrement
        assert b.depth == 0
        b.submit(DYNAMIC, _x(2), 5.0)
        b.submit(DYNAMIC, _x(3), 5.0)
        with pytest.raises(QueueFull):
            b.submit(DYNAMIC, _x(4), 5.0)

    _run(scenario)


def test_stop_finishes_queued_requests_without_waiting_the_delay() -> None:
    engine = FakeEngine(delay_s=0.01)

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_queue_delay_s=30.0)
        b.start()
        tickets = [b.submit(DYNAMIC, _x(i), 60.0) for i in range(6)]
        await asyncio.sleep(0)
        start = time.monotonic()
        await b.stop(5.0)
        assert time.monotonic() - start < 5.0
        assert all(t.future.done() and not t.future.exception() for t in tickets)
        assert b.idle

    _run(scenario)
    assert sum(len(v) for _, v in engine.batches) == 6


def test_drain_timeout_fails_the_computing_and_queued_requests() -> None:
    """When the drain runs out of time, every request still waiting fails with 503: the one
    whose batch is computing as well as the queued ones; none is left hanging."""
    engine = FakeEngine(delay_s=1.0)

    async def scenario(pool: ThreadPoolExecutor) -> None:
        b = _batcher(engine, pool, max_batch_size=1, max_queue_delay_s=0.0)
        b.start()
        tickets = [b.submit(DYNAMIC, _x(i), 60.0) for i in range(3)]
        await asyncio.sleep(0.1)  # the first batch is computing
        await b.stop(0.2)
        await asyncio.sleep(0)
        errors = [t.future.exception() if t.future.done() else None for t in tickets]
        assert all(isinstance(e, ServerNotReady) for e in errors), errors

    _run(scenario)


def test_compute_failure_fails_the_batch_with_500() -> None:
    def broken(gates: Sequence[GateConfig], items: Sequence[ModelInput]) -> list[ItemResult]:
        raise RuntimeError("boom")

    async def scenario(pool: ThreadPoolExecutor) -> None:
        metrics = Metrics(CollectorRegistry(), {"m": ()}, GATE_MODES, "test")
        b = DynamicBatcher(model="m", compute=broken, executor=pool, metrics=metrics,
                           max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=4)
        b.start()
        ticket = b.submit(DYNAMIC, _x(0), 5.0)
        with pytest.raises(Exception, match="internal error") as info:
            await ticket.future
        assert codes(info.value) == (500, "INTERNAL")
        await b.stop(1.0)

    _run(scenario)


def test_one_request_failing_in_compute_fails_alone() -> None:
    """A compute that answers one request with its InvalidInput (a configuration the model no
    longer serves after a hot reload) fails that request with a 400, the others get results."""
    engine = FakeEngine()

    def partly(
        gates: Sequence[GateConfig], items: Sequence[ModelInput]
    ) -> list[ItemResult | InvalidInput]:
        results: list[ItemResult | InvalidInput] = list(engine(gates, items))
        results[1] = InvalidInput("parameter 'keep_ratio': got 0.5; not served")
        return results

    async def scenario(pool: ThreadPoolExecutor) -> None:
        metrics = Metrics(CollectorRegistry(), {"m": ()}, GATE_MODES, "test")
        b = DynamicBatcher(model="m", compute=partly, executor=pool, metrics=metrics,
                           max_batch_size=3, max_queue_delay_s=0.2, max_queue_size=4)
        b.start()
        tickets = [b.submit(DYNAMIC, _x(v), 5.0) for v in (0.0, 1.0, 2.0)]
        first = await tickets[0].future
        with pytest.raises(InvalidInput) as info:
            await tickets[1].future
        assert codes(info.value)[0] == 400
        third = await tickets[2].future
        assert float(first.logits.ravel()[0]) == 0.0 and float(third.logits.ravel()[0]) == 2.0
        assert len(engine.batches) == 1  # one batch
        await b.stop(1.0)

    _run(scenario)


def test_invalid_construction() -> None:
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="max_batch_size"):
        _batcher(FakeEngine(), pool, max_batch_size=0)
