"""Explanations as background work that never gets in the way of predictions.

- Own threads (EXPLAIN_MAX_CONCURRENT of them), each lowered to EXPLAIN_NICE: when the cores are
  contended, the inference and decode threads win. The masked pictures run through the serving
  model's runtime directly (same ONNX Runtime session, `ModelBundle.predict`), never through
  the predict queue, so an explanation adds no queue wait in front of a prediction.
- Between two model runs (EXPLAIN_BATCH_SIZE pictures each) the thread stands aside while any
  prediction waits in the batcher queue; the time spent so counts against the explanation's
  deadline (EXPLAIN_TIMEOUT_S from arrival), never the prediction's.
- `refusal()` is asked before a request's body is read (api/explain_admission.py): over the
  concurrency cap (`explain_busy`) or while EXPLAIN_SHED_AT predict images are in the pipeline
  (`explain_shed`), explanations get 503 + Retry-After while predictions are still admitted.

With INFERENCE_THREADS > 1 the model's own thread pool runs at normal priority; the defaults
(one single-threaded inference worker per CPU) keep all of an explanation's work in its thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from rottenbot_inference.inference.batcher import DeadlineExceeded
from rottenbot_inference.inference.bundle import ModelBundle
from rottenbot_inference.inference.explain import Heatmap, occlusion_heatmap
from rottenbot_inference.inference.images import ImagePreprocessor, PreparedImage
from rottenbot_inference.inference.service import InferenceService
from rottenbot_inference.resources import lower_thread_priority
from rottenbot_inference.settings import Settings
from rottenbot_inference.telemetry import explain_metrics

log = logging.getLogger(__name__)

_YIELD_S = 0.002  # how long the thread sleeps between two looks at the predict queue


NO_CONTRAST = "none"  # `versus` value: explain the class on its own


class UnknownClass(ValueError):
    """A class to explain (or to contrast with) is not one of the serving model's classes."""

    def __init__(self, parameter: str, name: str) -> None:
        super().__init__(f"{parameter}={name!r}")
        self.parameter = parameter
        self.name = name


@dataclass(frozen=True)
class Target:
    """What to explain: a class (None: the top one) against another (or its counterpart)."""

    class_index: int | None
    versus_index: int | None
    versus_counterpart: bool


class ExplanationCancelled(Exception):
    """The client went away; the explanation stopped at its next model run."""


@dataclass(frozen=True)
class Explanation:
    heatmap: Heatmap
    image: PreparedImage  # the model input, and the upload's size (for the overlay)
    model_name: str
    model_version: str
    class_names: tuple[str, ...]
    elapsed_ms: float  # in the explanation thread: decode, model runs and yields
    yielded_ms: float  # of which: standing aside for predictions


class Explainer:
    """Admission counters (event loop) + the explanation threads; see the module docstring."""

    def __init__(self, settings: Settings, service: InferenceService) -> None:
        self.settings = settings
        self.service = service
        self.max_concurrent = settings.explain_max_concurrent
        self.shed_at = settings.effective_explain_shed_at
        self.active = 0  # admitted explanation requests (event loop only)
        self._pool = ThreadPoolExecutor(
            max_workers=self.max_concurrent,
            thread_name_prefix="explain",
            initializer=lower_thread_priority,
            initargs=(settings.explain_nice,),
        )

    # -- admission (event loop) ----------------------------------------------------------

    def refusal(self) -> str | None:
        """Why one more explanation may not start now (None: it may)."""
        if self.active >= self.max_concurrent:
            return "explain_busy"
        if self.service.pace.active >= self.shed_at:
            return "explain_shed"
        return None

    def admit(self) -> None:
        self.active += 1
        explain_metrics.admitted(1)

    def release(self) -> None:
        self.active -= 1
        explain_metrics.admitted(-1)

    # -- the work --------------------------------------------------------------------------

    @staticmethod
    def class_index(bundle: ModelBundle, class_name: str | None, name: str) -> int | None:
        """The index of `class_name` in the model's classes (None for None)."""
        if class_name is None:
            return None
        try:
            return bundle.class_names.index(class_name)
        except ValueError:
            raise UnknownClass(name, class_name) from None

    async def explain(
        self, data: bytes, class_name: str | None, versus: str | None, deadline: float
    ) -> Explanation:
        """Decode `data` and explain `class_name` (default: the top class) for it, against
        `versus` (default: the class's counterpart, see `explain.counterpart`; NO_CONTRAST:
        against nothing).

        Raises ImageError (bad upload), UnknownClass, DeadlineExceeded; cancelling the caller
        stops the thread at its next model run.
        """
        serving = self.service.serving
        if serving is None:
            raise RuntimeError("no model is loaded yet")
        bundle, preprocessor = serving
        target = Target(
            self.class_index(bundle, class_name, "class_name"),
            None if versus == NO_CONTRAST else self.class_index(bundle, versus, "versus"),
            versus is None,
        )
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            explanation = await loop.run_in_executor(
                self._pool, self._run, bundle, preprocessor, data, target, deadline, stop
            )
        except asyncio.CancelledError:
            stop.set()
            explain_metrics.record_outcome("cancelled")
            raise
        except DeadlineExceeded:
            explain_metrics.record_outcome("deadline")
            raise
        except Exception:
            explain_metrics.record_outcome("error")
            raise
        explain_metrics.record_outcome("ok")
        explain_metrics.record_duration(explanation.elapsed_ms, explanation.yielded_ms)
        return explanation

    def _run(
        self,
        bundle: ModelBundle,
        preprocessor: ImagePreprocessor,
        data: bytes,
        target: Target,
        deadline: float,
        stop: threading.Event,
    ) -> Explanation:
        started = time.perf_counter()
        yielded = 0.0
        batcher = self.service.batcher

        def predict(batch: np.ndarray) -> np.ndarray:
            nonlocal yielded
            while True:
                if stop.is_set():
                    raise ExplanationCancelled("the client went away")
                if time.monotonic() > deadline:
                    raise DeadlineExceeded("the explanation's deadline passed")
                if batcher.queued == 0:
                    break
                pause = time.perf_counter()
                time.sleep(_YIELD_S)
                yielded += time.perf_counter() - pause
            return bundle.predict(batch)

        if time.monotonic() > deadline:
            raise DeadlineExceeded("the explanation's deadline passed before it started")
        image = preprocessor.prepare(data)
        grid = self.settings.explain_grid
        heatmap = occlusion_heatmap(
            image.pixels, predict, bundle.class_names, grid, grid,
            self.settings.explain_batch_size, target.class_index, target.versus_index,
            target.versus_counterpart,
        )
        return Explanation(
            heatmap=heatmap,
            image=image,
            model_name=bundle.name,
            model_version=bundle.version,
            class_names=bundle.class_names,
            elapsed_ms=(time.perf_counter() - started) * 1000,
            yielded_ms=yielded * 1000,
        )

    def stop(self) -> None:
        """Stop taking work; running explanations finish (their callers are gone)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
