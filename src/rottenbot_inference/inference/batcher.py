"""Micro-batching: inference threads share one bounded queue; requests wait in it.

`Batcher.predict` is called from the event loop; the image is already preprocessed. Each
inference thread (`workers`, by default one per CPU, each running the model single-threaded:
on a few cores that beats one multi-threaded run, see docs/benchmarks.md) takes whatever is
queued (up to `max_batch_size`), waits at most `max_delay_s` for more, drops jobs whose client
has gone or whose deadline passed, runs one batch and hands each result back to the event loop.
A full queue is refused at once (`QueueFull` -> 503), never waited on.

A request's deadline is absolute (set when the request arrived, see api/admission.py), so the
time spent reading and decoding the upload counts against it. Dropped jobs are counted by
reason (`dropped`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from opentelemetry.trace import Link, SpanContext

from rottenbot_inference.inference.bundle import ModelBundle
from rottenbot_inference.telemetry import current_span_context, tracer
from rottenbot_inference.telemetry import metrics as telemetry_metrics

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many requests are waiting for the model."""


class DeadlineExceeded(TimeoutError):
    """The request waited for the model longer than its deadline."""


class BatcherClosed(RuntimeError):
    """The service is shutting down."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    probabilities: np.ndarray  # (classes,)
    bundle: ModelBundle
    queue_ms: float
    compute_ms: float
    batch_size: int
    batch_span: SpanContext | None = None  # the `batch` span that ran it (when traced)


@dataclass(slots=True)
class _Job:
    pixels: np.ndarray
    bundle: ModelBundle
    future: asyncio.Future[BatchResult]
    loop: asyncio.AbstractEventLoop
    enqueued: float
    deadline: float
    span_context: SpanContext | None = None  # the requester's span; the batch span links it
    expired: bool = False  # set by the waiting caller when its deadline cancelled the wait


_STOP = object()


def _resolve(future: asyncio.Future[BatchResult], outcome: BatchResult | BaseException) -> None:
    if future.done():  # cancelled by a client that went away or timed out
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class Batcher:
    """Bounded queue + `workers` inference threads; see the module docstring."""

    def __init__(
        self, max_batch_size: int, max_delay_s: float, capacity: int, workers: int = 1
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.capacity = capacity
        self._queue: queue.Queue[_Job | object] = queue.Queue(maxsize=capacity)
        self._threads = [
            threading.Thread(target=self._serve, args=(index,), name=f"inference-{index}",
                             daemon=True)
            for index in range(workers)
        ]
        self._closed = False
        self._in_flight = [0] * workers  # per thread: jobs taken off the queue, not yet answered
        # Counters written by the inference threads (under `_count_lock`) or, for `_late`, by
        # the event loop only; read anywhere.
        self._count_lock = threading.Lock()
        self.computed = 0  # images run through the model
        self._skipped = {"cancelled": 0, "deadline": 0}  # jobs taken off the queue, not run
        self._late = 0  # (event loop) requests whose deadline passed before they were queued

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def in_flight(self) -> int:
        """Jobs taken off the queue and not yet answered (all inference threads)."""
        return sum(self._in_flight)

    @property
    def dropped(self) -> dict[str, int]:
        """Requests never computed, by reason: `cancelled` (client gone) or `deadline`."""
        return {
            "cancelled": self._skipped["cancelled"],
            "deadline": self._skipped["deadline"] + self._late,
        }

    def count_late(self) -> None:
        """(Event loop) a request dropped before it reached the queue: its deadline passed."""
        self._late += 1

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    async def predict(
        self,
        pixels: np.ndarray,
        bundle: ModelBundle,
        timeout_s: float | None = None,
        *,
        deadline: float | None = None,
    ) -> BatchResult:
        """Queue one preprocessed image and wait for its probabilities.

        `deadline` is a `time.monotonic()` instant (the request's arrival + its timeout); without
        it the deadline is `timeout_s` from now. Cancelling the caller drops the queued job.
        """
        if self._closed:
            raise BatcherClosed("the service is shutting down")
        now = time.monotonic()
        if deadline is None:
            if timeout_s is None:
                raise ValueError("predict needs timeout_s or deadline")
            deadline = now + timeout_s
        remaining = deadline - now
        if remaining <= 0:
            self.count_late()
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        loop = asyncio.get_running_loop()
        job = _Job(
            pixels, bundle, loop.create_future(), loop, now, deadline, current_span_context()
        )
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.capacity} requests are already waiting") from None
        try:
            async with asyncio.timeout(remaining):
                return await job.future
        except TimeoutError:
            job.expired = True
            raise DeadlineExceeded(f"no result within {remaining:.3g} s") from None

    async def stop(self) -> None:
        """Refuse new work, finish everything queued, then end the threads."""
        self._closed = True
        alive = [thread for thread in self._threads if thread.is_alive()]
        if not alive:
            return
        for _ in alive:  # queued after every job; each thread ends at the first it takes
            await asyncio.to_thread(self._queue.put, _STOP)
        for thread in alive:
            await asyncio.to_thread(thread.join)

    # -- the inference threads -----------------------------------------------------------

    def _serve(self, index: int) -> None:
        carry: _Job | None = None
        while True:
            first = carry or self._queue.get()
            if first is _STOP:
                return
            assert isinstance(first, _Job)
            batch, carry, stop = self._collect(first)
            self._run(index, [job for job in batch if self._still_wanted(job)])
            if stop:  # (a stop and a model swap never come from the same `_collect`)
                return

    def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
        """`first` plus what arrives within the delay, same model only, up to the batch size.

        Returns the batch, a job of another model that must start the next batch (a model
        swap), and whether a stop sentinel was taken."""
        batch = [first]
        until = time.monotonic() + self.max_delay_s
        while len(batch) < self.max_batch_size:
            remaining = until - time.monotonic()
            try:
                job = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if job is _STOP:
                return batch, None, True
            assert isinstance(job, _Job)
            if job.bundle is not first.bundle:  # a model swap: the next batch starts with it
                return batch, job, False
            batch.append(job)
        return batch, None, False

    def _still_wanted(self, job: _Job) -> bool:
        """False (and counted) for a job whose caller went away or whose deadline passed."""
        if job.future.done():  # cancelled: the client disconnected or the wait timed out
            expired = job.expired or time.monotonic() > job.deadline
            with self._count_lock:
                self._skipped["deadline" if expired else "cancelled"] += 1
            return False
        if time.monotonic() > job.deadline:
            with self._count_lock:
                self._skipped["deadline"] += 1
            job.loop.call_soon_threadsafe(
                _resolve, job.future, DeadlineExceeded("deadline passed while queued")
            )
            return False
        return True

    def _run(self, index: int, batch: list[_Job]) -> None:
        if not batch:
            return
        self._in_flight[index] = len(batch)
        started = time.monotonic()
        started_ns = time.time_ns()
        try:
            pixels = np.stack([job.pixels for job in batch])
            probabilities = batch[0].bundle.predict(pixels)
        except Exception as exc:
            log.exception("inference failed for a batch of %d", len(batch))
            for job in batch:
                job.loop.call_soon_threadsafe(_resolve, job.future, exc)
            return
        finally:
            self._in_flight[index] = 0
        finished = time.monotonic()
        compute_ms = (finished - started) * 1000
        with self._count_lock:
            self.computed += len(batch)
        queue_ms = [(started - job.enqueued) * 1000 for job in batch]
        span = self._batch_span(batch, queue_ms, started_ns)
        span_context = None if span is None else span.get_span_context()
        for row, job, waited in zip(probabilities, batch, queue_ms, strict=True):
            result = BatchResult(
                probabilities=row,
                bundle=job.bundle,
                queue_ms=waited,
                compute_ms=compute_ms,
                batch_size=len(batch),
                batch_span=span_context,
            )
            job.loop.call_soon_threadsafe(_resolve, job.future, result)
        # Telemetry after the answers are on their way.
        if span is not None:
            span.end(end_time=started_ns + int((finished - started) * 1e9))
        telemetry_metrics.record_batch(compute_ms, len(batch), queue_ms)

    @staticmethod
    def _batch_span(batch: list[_Job], queue_ms: list[float], started_ns: int) -> Any:
        """A `batch` span for the model execution, linked to each traced request's span."""
        links = [
            Link(job.span_context, {"queue_ms": waited})
            for job, waited in zip(batch, queue_ms, strict=True)
            if job.span_context is not None
        ]
        if not links:
            return None
        bundle = batch[0].bundle
        return tracer.start_span(
            "batch",
            links=links,
            start_time=started_ns,
            attributes={
                "batch.size": len(batch),
                "batch.queue_ms.max": max(queue_ms),
                "model.name": bundle.name,
                "model.version": bundle.version,
            },
        )
