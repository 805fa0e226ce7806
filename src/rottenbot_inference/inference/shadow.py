"""Shadow scoring: a sample of answered predictions also run through the challenger, off the
response path, on idle capacity only.

- `offer` (event loop, after the champion's answer is known) draws SHADOW_FRACTION of the
  predictions and puts them on a small bounded queue (the image's model input, already
  decoded); it never waits. A full queue skips the prediction (`queue_full`).
- One shadow thread takes them one at a time. It runs the challenger only while the
  champion's pipeline is empty (`idle`: no image being decoded, queued or computed); it waits
  for such a moment at most MAX_WAIT_S, then skips (`busy`). Under load shadow work is
  therefore dropped first. The challenger itself computes on a second thread, lowered to
  SHADOW_NICE, so it yields the CPU to the champion's threads (nice 19 against 0). The waiting
  thread stays at normal priority: a niced thread that asks for the GIL makes the thread
  handing it over wait until the niced one gets a core (CPython's forced switch), a stall of
  the event loop each time; the niced compute thread asks twice per scored image only.
  While the service sheds load (a request was refused at admission within SHED_QUIET_S),
  there is no idle capacity by definition: jobs are skipped at once (`shedding`), even in
  the gaps between the champion's bursts.
- Skips are counted by reason (`busy`, `shedding`, `queue_full`, `same_version` (both models
  serve the same version: nothing to compare), `not_loaded` (the challenger is not loaded yet
  or was refused), `error`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rottenbot_inference.inference.agreement import ComparisonRecord
from rottenbot_inference.inference.bundle import ModelBundle
from rottenbot_inference.inference.images import ImagePreprocessor
from rottenbot_inference.inference.service import Classification, InferenceService, rank
from rottenbot_inference.resources import lower_thread_priority
from rottenbot_inference.telemetry import shadow_metrics

log = logging.getLogger(__name__)

QUEUE_SIZE = 16  # shadow jobs waiting for idle capacity (each holds one decoded image)
MAX_WAIT_S = 1.0  # a job that found no idle moment this long after its answer is skipped
SHED_QUIET_S = 1.0  # no shadow work this long after a request was refused at admission
_RECHECK_S = 0.005  # the pipeline is empty but a job is still queued: look again this soon


@dataclasses.dataclass(slots=True)
class ShadowJob:
    pixels: np.ndarray  # the champion's model input (height, width, 3)
    data: bytes | None  # the upload, kept only when the challenger's input size differs
    champion_class: int
    champion_class_name: str
    champion_confidence: float
    champion_version: str
    prediction_uid: uuid.UUID | None
    answered_at: float  # time.monotonic()


_STOP = object()


class ShadowScorer:
    """The sampling, the bounded queue and the shadow thread; see the module docstring."""

    def __init__(
        self,
        service: InferenceService,
        serving: Callable[[], tuple[ModelBundle, ImagePreprocessor] | None],
        sink: Callable[[ComparisonRecord], None],
        fraction: float,
        nice: int = 19,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.service = service
        self.serving = serving  # the challenger and its preprocessor (None: not loaded)
        self.sink = sink
        self.fraction = fraction
        self.nice = nice
        self.draw = draw
        self._queue: queue.Queue[ShadowJob | object] = queue.Queue(maxsize=QUEUE_SIZE)
        self._count_lock = threading.Lock()
        self.sampled = 0  # drawn for shadow scoring (event loop)
        self.scored = 0  # run through the challenger (shadow thread)
        self.skipped: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._serve, name="shadow", daemon=True)
        self._compute = ThreadPoolExecutor(
            1, "shadow-compute", initializer=lower_thread_priority, initargs=(nice,)
        )

    def start(self) -> None:
        shadow_metrics.start()
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the thread; jobs still queued are dropped (nobody waits for them)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._compute.shutdown(wait=False)

    # -- the event loop -------------------------------------------------------------------

    def offer(
        self, result: Classification, data: bytes, prediction_uid: uuid.UUID | None = None
    ) -> None:
        """Maybe shadow this answered prediction (O(1); never waits)."""
        if self.fraction <= 0 or self.draw() >= self.fraction:
            return
        self.sampled += 1
        serving = self.serving()
        if serving is None:
            self._skip("not_loaded")
            return
        challenger = serving[0]
        if challenger.version == result.model_version:
            self._skip("same_version")
            return
        pixels = result.image.pixels
        best = result.best
        job = ShadowJob(
            pixels=pixels,
            data=None if challenger.input_shape == pixels.shape else data,
            champion_class=best.index,
            champion_class_name=best.name,
            champion_confidence=best.confidence,
            champion_version=result.model_version,
            prediction_uid=prediction_uid,
            answered_at=time.monotonic(),
        )
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._skip("queue_full")

    def idle(self) -> bool:
        """The champion's pipeline is empty: no admitted image being decoded, queued or
        computed."""
        return self.service.batcher.queued == 0 and self.service.pace.active == 0

    # -- the shadow thread ----------------------------------------------------------------

    def _skip(self, reason: str) -> None:
        with self._count_lock:
            self.skipped[reason] += 1
        shadow_metrics.record_skip(reason)

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            assert isinstance(job, ShadowJob)
            verdict = self._wait_for_idle(job)
            if verdict is not None:
                self._skip(verdict)
                continue
            try:
                self._score(job)
            except Exception:
                log.warning("the challenger failed on a shadowed image", exc_info=True)
                self._skip("error")

    def shedding(self) -> bool:
        """A request was refused at admission less than SHED_QUIET_S ago."""
        return self.service.pace.shed_recently(SHED_QUIET_S)

    def _wait_for_idle(self, job: ShadowJob) -> str | None:
        """Block until `idle` (None: score it now) or until a reason to skip it: `shedding`
        (at once) or `busy` (no idle moment until MAX_WAIT_S after the answer)."""
        give_up = job.answered_at + MAX_WAIT_S
        while True:
            if self.shedding():
                return "shedding"
            if self.idle():
                return None
            left = give_up - time.monotonic()
            if left <= 0:
                return "busy"
            empty = self.service.pace.empty
            if empty.is_set():  # nothing in the pipeline, yet a cancelled job is still queued
                time.sleep(min(_RECHECK_S, left))
            else:
                empty.wait(left)

    def _score(self, job: ShadowJob) -> None:
        serving = self.serving()
        if serving is None:
            self._skip("not_loaded")
            return
        bundle, preprocessor = serving
        if bundle.version == job.champion_version:
            self._skip("same_version")
            return
        if job.data is not None or bundle.input_shape != job.pixels.shape:
            if job.data is None:  # the challenger was swapped for one of another input size
                self._skip("error")
                return
            pixels = preprocessor.prepare(job.data).pixels
        else:
            pixels = job.pixels
        probabilities, challenger_ms = self._compute.submit(_timed, bundle, pixels).result()
        best = rank(probabilities, bundle.class_names, 1)[0]
        record = ComparisonRecord(
            uid=uuid.uuid4(),
            created_at=dt.datetime.now(dt.UTC),
            champion_version=job.champion_version,
            challenger_version=bundle.version,
            champion_class=job.champion_class,
            champion_class_name=job.champion_class_name,
            champion_confidence=job.champion_confidence,
            challenger_class=best.index,
            challenger_class_name=best.name,
            challenger_confidence=best.confidence,
            challenger_ms=challenger_ms,
            prediction_uid=job.prediction_uid,
        )
        with self._count_lock:
            self.scored += 1
        self.sink(record)
        shadow_metrics.record_comparison(
            job.champion_version, bundle.version, record.agreed, challenger_ms
        )


def _timed(bundle: ModelBundle, pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """(The niced compute thread) the challenger's probabilities and its run time in ms."""
    started = time.perf_counter()
    probabilities = bundle.predict(pixels[np.newaxis])[0]
    return probabilities, (time.perf_counter() - started) * 1000
