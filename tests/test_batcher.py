"""The micro-batcher: batching, bounded queue, deadlines, cancellation, model swaps."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from rottenbot_inference.inference.batcher import (
    Batcher,
    BatcherClosed,
    DeadlineExceeded,
    QueueFull,
)
from rottenbot_inference.inference.bundle import ModelBundle


class RecordingRuntime:
    """Echoes each image's first pixel as class scores; can be held closed with a gate."""

    name = "fake"
    input_shape = (2, 2, 3)

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait()
        self.batch_sizes.append(len(batch))
        out = np.zeros((len(batch), 3), np.float32)
        out[:, 0] = batch[:, 0, 0, 0]
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def make_bundle(runtime: RecordingRuntime, version: str = "v1") -> ModelBundle:
    return ModelBundle("fake", version, "test", runtime, ("a", "b", "c"))


def image(value: float) -> np.ndarray:
    return np.full((2, 2, 3), value, np.float32)


async def run_with(batcher: Batcher, coro):
    batcher.start()
    try:
        return await coro
    finally:
        await batcher.stop()


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    runtime = RecordingRuntime()
    bundle = make_bundle(runtime)
    batcher = Batcher(max_batch_size=4, max_delay_s=0.05, capacity=16)

    async def scenario():
        runtime.gate.clear()
        first = asyncio.ensure_future(batcher.predict(image(100), bundle, timeout_s=30))
        await asyncio.to_thread(runtime.entered.wait)  # the first batch is running
        rest = [asyncio.ensure_future(batcher.predict(image(v), bundle, 30)) for v in range(8)]
        await asyncio.sleep(0)
        runtime.gate.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(run_with(batcher, scenario()))
    assert [r.probabilities[0] for r in results] == [100, *range(8)]
    assert runtime.batch_sizes[0] == 1
    assert max(runtime.batch_sizes) <= 4
    assert sum(runtime.batch_sizes) == 9
    assert len(runtime.batch_sizes) < 9  # queued requests shared batches
    assert all(r.bundle is bundle for r in results)


def test_full_queue_is_refused_immediately() -> None:
    runtime = RecordingRuntime()
    bundle = make_bundle(runtime)
    batcher = Batcher(max_batch_size=1, max_delay_s=0, capacity=2)

    async def scenario():
        runtime.gate.clear()
        running = asyncio.ensure_future(batcher.predict(image(1), bundle, 30))
        await asyncio.to_thread(runtime.entered.wait)
        queued = [asyncio.ensure_future(batcher.predict(image(2), bundle, 30)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.predict(image(3), bundle, 30)
        runtime.gate.set()
        await asyncio.gather(running, *queued)

    asyncio.run(run_with(batcher, scenario()))


def test_deadline_and_cancellation_skip_the_work() -> None:
    runtime = RecordingRuntime()
    bundle = make_bundle(runtime)
    batcher = Batcher(max_batch_size=1, max_delay_s=0, capacity=8)

    async def scenario():
        runtime.gate.clear()
        running = asyncio.ensure_future(batcher.predict(image(1), bundle, 30))
        await asyncio.to_thread(runtime.entered.wait)
        with pytest.raises(DeadlineExceeded):
            await batcher.predict(image(2), bundle, timeout_s=0.05)
        cancelled = asyncio.ensure_future(batcher.predict(image(3), bundle, 30))
        await asyncio.sleep(0)
        cancelled.cancel()
        runtime.gate.set()
        await running
        after = await batcher.predict(image(4), bundle, 30)
        return after

    after = asyncio.run(run_with(batcher, scenario()))
    assert after.probabilities[0] == 4
    assert runtime.batch_sizes == [1, 1]  # the timed-out and cancelled jobs never ran


def test_a_swapped_model_starts_its_own_batch() -> None:
    old_runtime, new_runtime = RecordingRuntime(), RecordingRuntime()
    old, new = make_bundle(old_runtime, "v1"), make_bundle(new_runtime, "v2")
    batcher = Batcher(max_batch_size=8, max_delay_s=0.05, capacity=16)

    async def scenario():
        old_runtime.gate.clear()
        first = asyncio.ensure_future(batcher.predict(image(0), old, 30))
        await asyncio.to_thread(old_runtime.entered.wait)
        jobs = [asyncio.ensure_future(batcher.predict(image(1), old, 30)) for _ in range(2)]
        jobs += [asyncio.ensure_future(batcher.predict(image(2), new, 30)) for _ in range(2)]
        await asyncio.sleep(0)
        old_runtime.gate.set()
        return await asyncio.gather(first, *jobs)

    results = asyncio.run(run_with(batcher, scenario()))
    assert [r.bundle.version for r in results] == ["v1", "v1", "v1", "v2", "v2"]
    assert sum(old_runtime.batch_sizes) == 3 and sum(new_runtime.batch_sizes) == 2


def test_stop_finishes_queued_work_then_refuses() -> None:
    runtime = RecordingRuntime()
    bundle = make_bundle(runtime)
    batcher = Batcher(max_batch_size=2, max_delay_s=0, capacity=8)

    async def scenario():
        batcher.start()
        runtime.gate.clear()
        jobs = [asyncio.ensure_future(batcher.predict(image(v), bundle, 30)) for v in range(5)]
        await asyncio.to_thread(runtime.entered.wait)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0)
        runtime.gate.set()
        results = await asyncio.gather(*jobs)
        await stopping
        with pytest.raises(BatcherClosed):
            await batcher.predict(image(9), bundle, 30)
        return results

    results = asyncio.run(scenario())
    assert [r.probabilities[0] for r in results] == list(range(5))


def test_runtime_errors_reach_every_caller_of_the_batch() -> None:
    runtime = RecordingRuntime()
    bundle = make_bundle(runtime)
    batcher = Batcher(max_batch_size=4, max_delay_s=0, capacity=8)

    def broken(_batch):
        raise RuntimeError("broken model")

    runtime.run = broken  # type: ignore[method-assign]

    async def scenario():
        outcomes = await asyncio.gather(
            *(batcher.predict(image(v), bundle, 30) for v in range(3)), return_exceptions=True
        )
        return outcomes

    outcomes = asyncio.run(run_with(batcher, scenario()))
    assert all(isinstance(o, RuntimeError) for o in outcomes)


class ConcurrencyRecorder(RecordingRuntime):
    """Records how many batches run at the same moment (each holds until the gate opens)."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.calls = 0
        self.all_entered = threading.Barrier(expected, timeout=60)

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls += 1
            first_ones = self.calls <= self.all_entered.parties
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            if first_ones:
                self.all_entered.wait()  # the first batches wait until all are inside run()
            return super().run(batch)
        finally:
            with self.lock:
                self.running -= 1


def test_several_workers_run_batches_concurrently_and_stop_finishes_everything() -> None:
    runtime = ConcurrencyRecorder(expected=2)
    bundle = make_bundle(runtime)
    batcher = Batcher(max_batch_size=2, max_delay_s=0, capacity=32, workers=2)
    assert batcher.workers == 2

    async def scenario():
        batcher.start()
        jobs = [asyncio.ensure_future(batcher.predict(image(v), bundle, 60)) for v in range(9)]
        results = await asyncio.gather(*jobs)
        await batcher.stop()
        with pytest.raises(BatcherClosed):
            await batcher.predict(image(99), bundle, 30)
        return results

    results = asyncio.run(scenario())
    assert [r.probabilities[0] for r in results] == list(range(9))  # each caller gets its own
    assert runtime.most_at_once == 2  # two batches were inside the model at the same time
    assert sum(runtime.batch_sizes) == 9 and batcher.computed == 9
    assert batcher.in_flight == 0
