"""Micro-batching: one inference thread owns the runtime; requests wait in a bounded queue.

`Batcher.predict` is called from the event loop; the image is already preprocessed. The thread
takes whatever is queued (up to `max_batch_size`), waits at most `max_delay_s` for more, drops
jobs whose client has gone or whose deadline passed, runs one batch and hands each result back
to the event loop. A full queue is refused at once (`QueueFull` -> 503), never waited on.
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


_STOP = object()


def _resolve(future: asyncio.Future[BatchResult], outcome: BatchResult | BaseException) -> None:
    if future.done():  # cancelled by a client that went away or timed out
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class Batcher:
    """Bounded queue + one inference thread; see the module docstring."""

    def __init__(self, max_batch_size: int, max_delay_s: float, capacity: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.capacity = capacity
        self._queue: queue.Queue[_Job | object] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._serve, name="inference", daemon=True)
        self._closed = False
        self._carry: _Job | None = None
        self.in_flight = 0  # jobs taken off the queue and not yet answered

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread.start()

    async def predict(
        self, pixels: np.ndarray, bundle: ModelBundle, timeout_s: float
    ) -> BatchResult:
        """Queue one preprocessed image and wait for its probabilities."""
        if self._closed:
            raise BatcherClosed("the service is shutting down")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = _Job(
            pixels, bundle, loop.create_future(), loop, now, now + timeout_s,
            current_span_context(),
        )
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.capacity} requests are already waiting") from None
        try:
            async with asyncio.timeout(timeout_s):
                return await job.future
        except TimeoutError:
            raise DeadlineExceeded(f"no result within {timeout_s:g} s") from None

    async def stop(self) -> None:
        """Refuse new work, finish everything queued, then end the thread."""
        self._closed = True
        if not self._thread.is_alive():
            return
        await asyncio.to_thread(self._queue.put, _STOP)
        await asyncio.to_thread(self._thread.join)

    # -- the inference thread ------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            first = self._carry or self._queue.get()
            self._carry = None
            if first is _STOP:
                return
            assert isinstance(first, _Job)
            batch, stop = self._collect(first)
            self._run([job for job in batch if self._still_wanted(job)])
            if stop:
                return

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """`first` plus what arrives within the delay, same model only, up to the batch size."""
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
                return batch, True
            assert isinstance(job, _Job)
            if job.bundle is not first.bundle:  # a model swap: the next batch starts with it
                self._carry = job
                break
            batch.append(job)
        return batch, False

    def _still_wanted(self, job: _Job) -> bool:
        if job.future.cancelled():
            return False
        if time.monotonic() > job.deadline:
            job.loop.call_soon_threadsafe(
                _resolve, job.future, DeadlineExceeded("deadline passed while queued")
            )
            return False
        return True

    def _run(self, batch: list[_Job]) -> None:
        if not batch:
            return
        self.in_flight = len(batch)
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
            self.in_flight = 0
        finished = time.monotonic()
        compute_ms = (finished - started) * 1000
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
