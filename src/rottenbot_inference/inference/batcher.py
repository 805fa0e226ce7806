"""Micro-batching: one inference thread owns the runtime; requests wait in a bounded queue.

`Batcher.predict` is called from the event loop; the image is already preprocessed. The thread
takes whatever is queued (up to `max_batch_size`), waits at most `max_delay_s` for more, drops
jobs whose client has gone or whose deadline passed, runs one batch and hands each result back
to the event loop. A full queue is refused at once (`QueueFull` -> 503), never waited on.

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
        # Counters each written by one thread only (the inference thread, or the event loop for
        # `_late`) and read anywhere: plain ints, no lock.
        self.computed = 0  # images run through the model
        self._skipped = {"cancelled": 0, "deadline": 0}  # jobs taken off the queue, not run
        self._late = 0  # (event loop) requests whose deadline passed before they were queued

    @property
    def queued(self) -> int:
        return self._queue.qsize()

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
        self._thread.start()

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
        """False (and counted) for a job whose caller went away or whose deadline passed."""
        if job.future.done():  # cancelled: the client disconnected or the wait timed out
            expired = job.expired or time.monotonic() > job.deadline
            self._skipped["deadline" if expired else "cancelled"] += 1
            return False
        if time.monotonic() > job.deadline:
            self._skipped["deadline"] += 1
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
