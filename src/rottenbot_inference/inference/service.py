"""The classification use case: bytes in, ranked classes out.

Glues the image pipeline (a thread pool), the batcher (one inference thread) and the current
model bundle (swappable as one reference). The event loop only awaits.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from rottenbot_inference.inference.batcher import Batcher, BatchResult, DeadlineExceeded
from rottenbot_inference.inference.bundle import ModelBundle
from rottenbot_inference.inference.images import ImagePreprocessor, PreparedImage
from rottenbot_inference.inference.pace import Pace
from rottenbot_inference.settings import Settings
from rottenbot_inference.telemetry import metrics as telemetry_metrics
from rottenbot_inference.telemetry import traced


@dataclass(frozen=True, slots=True)
class ClassScore:
    index: int
    name: str
    confidence: float


@dataclass(frozen=True)
class Classification:
    """The answer for one image, with what produced it and how long each step took."""

    ranked: tuple[ClassScore, ...]  # best first; as many as asked for (at least one)
    model_name: str
    model_version: str
    image: PreparedImage
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> ClassScore:
        return self.ranked[0]


def rank(probabilities: np.ndarray, class_names: tuple[str, ...], k: int) -> tuple[ClassScore, ...]:
    """The k most probable classes, best first (ties broken by lower index)."""
    k = max(1, min(k, len(class_names)))
    order = np.argsort(-probabilities, kind="stable")[:k]
    return tuple(
        ClassScore(int(index), class_names[int(index)], float(probabilities[index]))
        for index in order
    )


class InferenceService:
    """Owns the current bundle, the preprocessing pool and the batcher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # One reference, swapped whole: a request never pairs a model with another's preprocessor.
        self._serving: tuple[ModelBundle, ImagePreprocessor] | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=settings.effective_preprocess_threads, thread_name_prefix="preprocess"
        )
        self.batcher = Batcher(
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000,
            capacity=settings.queue_capacity,
            workers=settings.effective_inference_workers,
        )
        self.pace = Pace()  # time between answers while busy (admission's wait estimate)

    @property
    def bundle(self) -> ModelBundle | None:
        serving = self._serving
        return None if serving is None else serving[0]

    @property
    def serving(self) -> tuple[ModelBundle, ImagePreprocessor] | None:
        """The current model and its preprocessor, as one pair (None before the first load)."""
        return self._serving

    def install(self, bundle: ModelBundle) -> None:
        """Make `bundle` the model for new requests (queued ones finish on theirs).

        Callable from any thread: a single reference assignment is the swap.
        """
        self._serving = (bundle, preprocessor_for(bundle, self.settings))
        telemetry_metrics.record_model_swap(bundle.version)

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def classify(
        self, data: bytes, top_k: int = 1, deadline: float | None = None
    ) -> Classification:
        """Preprocess in the pool, infer through the batcher; raises ImageError for bad input.

        `deadline` (a `time.monotonic()` instant, normally the request's arrival +
        REQUEST_TIMEOUT_S) bounds the whole job: an image still waiting for a decode thread or
        for the model past it is dropped with DeadlineExceeded, never computed. Default: the
        timeout from now.
        """
        serving = self._serving
        if serving is None:
            raise RuntimeError("no model is loaded yet")
        bundle, preprocessor = serving
        if deadline is None:
            deadline = time.monotonic() + self.settings.request_timeout_s
        self.pace.started()
        answered = False
        try:
            classification = await self._classify(bundle, preprocessor, data, top_k, deadline)
            answered = True
            return classification
        finally:
            self.pace.finished(answered)

    async def _classify(
        self, bundle: ModelBundle, preprocessor: ImagePreprocessor, data: bytes, top_k: int,
        deadline: float,
    ) -> Classification:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        with traced("preprocess_image") as span:
            try:
                image = await loop.run_in_executor(
                    self._pool, _prepare, preprocessor, data, deadline
                )
            except DeadlineExceeded:
                self.batcher.count_late()  # never decoded, never computed
                raise
            if span.is_recording():
                span.set_attributes(
                    {
                        "image.format": image.format.value,
                        "image.width": image.width,
                        "image.height": image.height,
                        "image.bytes": len(data),
                    }
                )
        decoded = time.perf_counter()
        with traced("get_prediction", {"model.version": bundle.version}) as span:
            result: BatchResult = await self.batcher.predict(
                image.pixels, bundle, deadline=deadline
            )
            if span.is_recording():
                span.set_attributes(
                    {
                        "queue_ms": result.queue_ms,
                        "compute_ms": result.compute_ms,
                        "batch.size": result.batch_size,
                    }
                )
                if result.batch_span is not None:
                    span.add_link(result.batch_span)
        ranked = rank(result.probabilities, bundle.class_names, top_k)
        telemetry_metrics.record_prediction(ranked[0].name, bundle.version, ranked[0].confidence)
        return Classification(
            ranked=ranked,
            model_name=bundle.name,
            model_version=bundle.version,
            image=image,
            timings_ms={
                "preprocess": (decoded - started) * 1000,
                "queue": result.queue_ms,
                "compute": result.compute_ms,
                "batch_size": result.batch_size,
            },
        )


def preprocessor_for(bundle: ModelBundle, settings: Settings) -> ImagePreprocessor:
    """The image pipeline a bundle needs: its input size, the upload limits of the settings."""
    return ImagePreprocessor(
        bundle.image_size,
        max_pixels=settings.max_image_pixels,
        dct_scaling=settings.jpeg_dct_scaling,
    )


def _prepare(preprocessor: ImagePreprocessor, data: bytes, deadline: float) -> PreparedImage:
    """Decode + resize (in the pool), timing the work itself rather than the wait for a thread.

    A request whose deadline passed while it waited for a thread is not decoded at all.
    """
    if time.monotonic() > deadline:
        raise DeadlineExceeded("the request's deadline passed before its image was decoded")
    started = time.perf_counter()
    image = preprocessor.prepare(data)
    telemetry_metrics.record_decode((time.perf_counter() - started) * 1000, image.format.value)
    return image
