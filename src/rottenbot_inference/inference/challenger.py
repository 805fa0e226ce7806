"""The shadow challenger: a second model beside the champion (CHALLENGER_URI).

- Loading, verification, caching, alias polling, hot swap and the refusal of broken versions
  are the champion's own machinery (reloader.py): a `ChallengerManager` is a `ModelManager`
  whose "service" is a `ChallengerSlot` (one swappable reference, like the champion's) and
  whose loads and reloads are counted in the challenger's metrics. It starts after the
  champion is ready, in the background: readiness never waits for it, and a challenger that
  cannot be loaded leaves the champion serving (refused versions show in the comparison).
- Both managers lend each other their loaded bundle (`donor`): when the champion alias moves
  to the version the challenger serves (a promotion), the champion installs the challenger's
  session as is: no download, no conversion, no second copy in memory. The same the other
  way round.
- Shadow scoring (shadow.py) and where comparisons go (storage/comparison_log.py).

CHALLENGER_URI unset: none of this is imported or started.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rottenbot_inference.inference.bundle import ModelBundle
from rottenbot_inference.inference.images import ImagePreprocessor
from rottenbot_inference.inference.loader import LocalSource, ModelSource
from rottenbot_inference.inference.mlflow_source import MlflowSource, is_mlflow_uri
from rottenbot_inference.inference.reloader import ModelManager
from rottenbot_inference.inference.service import Classification, preprocessor_for
from rottenbot_inference.inference.shadow import ShadowScorer
from rottenbot_inference.settings import Settings
from rottenbot_inference.storage.comparison_log import ComparisonLog
from rottenbot_inference.telemetry import shadow_metrics

if TYPE_CHECKING:
    from rottenbot_inference.api.state import AppState

log = logging.getLogger(__name__)


def challenger_source(settings: Settings) -> ModelSource:
    """CHALLENGER_URI as a source: an MLflow URI (any MODEL_URI form), else a local path."""
    uri = settings.challenger_uri
    if not uri:
        raise ValueError("CHALLENGER_URI is not set")
    if is_mlflow_uri(uri):
        return MlflowSource(settings, uri=uri)
    return LocalSource(Path(uri))


class ChallengerSlot:
    """The challenger's current bundle and preprocessor, swapped as one reference."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._serving: tuple[ModelBundle, ImagePreprocessor] | None = None

    @property
    def bundle(self) -> ModelBundle | None:
        serving = self._serving
        return None if serving is None else serving[0]

    @property
    def serving(self) -> tuple[ModelBundle, ImagePreprocessor] | None:
        return self._serving

    def install(self, bundle: ModelBundle) -> None:
        self._serving = (bundle, preprocessor_for(bundle, self.settings))


class ChallengerManager(ModelManager):
    """The champion's reloader, for the challenger: own metrics, warmed for batches of one,
    retrying an MLflow URI it could not load yet (pinned too) at each poll interval."""

    def __init__(self, settings: Settings, slot: ChallengerSlot, source: ModelSource) -> None:
        super().__init__(settings, slot, source=source)  # type: ignore[arg-type]
        self.warm_batch_size = 1  # the shadow thread runs one image at a time

    @property
    def polls(self) -> bool:
        interval = self.settings.model_poll_interval_s
        if self.current is None and interval > 0 and isinstance(self.source, MlflowSource):
            return True  # not loaded yet (registry down, refused): keep trying
        return super().polls

    def _record_load(self, outcome: str, seconds: float | None = None) -> None:
        shadow_metrics.record_load(outcome)

    def _record_reload(self, trigger: str, outcome: str) -> None:
        shadow_metrics.record_reload(trigger, outcome)


def _lender(manager: ModelManager, borrower: ModelManager) -> Any:
    """`manager`'s bundle for a cache key, if both read the same model store."""

    def donate(key: str) -> ModelBundle | None:
        current = manager.current
        if current is None or current.key != key or not _same_store(manager, borrower):
            return None
        return current.bundle

    return donate


def _same_store(a: ModelManager, b: ModelManager) -> bool:
    """Cache keys mean the same model: one MLflow server (its cache), or both local (content
    hashes)."""
    if isinstance(a.source, MlflowSource) and isinstance(b.source, MlflowSource):
        return a.source.cache_root == b.source.cache_root
    return not isinstance(a.source, MlflowSource) and not isinstance(b.source, MlflowSource)


class Challenger:
    """Everything the challenger needs in one process; see the module docstring."""

    def __init__(self, state: AppState) -> None:
        settings = state.settings
        self.settings = settings
        self.state = state
        self.slot = ChallengerSlot(settings)
        # ONNX Runtime computes on the calling thread, which the shadow scorer lowers to
        # SHADOW_NICE; OpenVINO computes on its own threads at normal priority, so a challenger
        # served by it competed with the champion for the cores (at 1x capacity the champion's
        # p99 went from 167 to 302 ms).
        runtime = settings.model_copy(update={"model_runtime": "onnxruntime",
                                              "model_precision": "auto"})
        self.manager = ChallengerManager(runtime, self.slot, challenger_source(runtime))
        self.comparisons = ComparisonLog(state.predictions)
        self.scorer = ShadowScorer(
            state.service,
            lambda: self.slot.serving,
            self.comparisons.add,
            settings.shadow_fraction,
            settings.shadow_nice,
        )
        self._loading: threading.Thread | None = None

    def start(self, champion: ModelManager) -> None:
        """(Event loop, once the champion is ready) lend sessions both ways, start scoring
        and flushing, and load the challenger in the background."""
        champion.donor = _lender(self.manager, champion)
        self.manager.donor = _lender(champion, self.manager)
        self.comparisons.start()
        self.scorer.start()
        self._loading = threading.Thread(target=self._load, name="challenger-load", daemon=True)
        self._loading.start()

    def _load(self) -> None:
        result = self.manager.check("start")
        if result.outcome == "swapped":
            log.info("challenger version %s loaded beside the champion", result.version)
        else:
            log.warning(
                "the challenger is not loaded (%s: %s); the champion serves alone",
                result.outcome,
                result.detail,
            )
        self.manager.start_watching()

    async def stop(self) -> None:
        await asyncio.to_thread(self.manager.stop)
        await asyncio.to_thread(self.scorer.stop)
        await self.comparisons.stop()

    def offer(self, result: Classification, data: bytes, prediction_uid: uuid.UUID | None) -> None:
        self.scorer.offer(result, data, prediction_uid)

    def describe(self) -> dict[str, Any]:
        """The challenger model and its reloads, and this process's shadow counts."""
        bundle = self.slot.bundle
        manager = self.manager
        scorer = self.scorer
        return {
            "uri": self.settings.challenger_uri,
            "loaded": bundle is not None,
            "version": None if bundle is None else bundle.version,
            "name": None if bundle is None else bundle.name,
            "warning": manager.warning,
            "reload": manager.describe()["reload"],
            "shadow": {
                "fraction": scorer.fraction,
                "sampled": scorer.sampled,
                "scored": scorer.scored,
                "skipped": dict(scorer.skipped),
                "pending_writes": self.comparisons.pending,
                "stored": self.comparisons.stored,
                "dropped_writes": self.comparisons.dropped,
            },
        }
