"""Loads the model at start and swaps in new versions while serving (hot swap).

`ModelManager` owns the model's life cycle in the server:

- start: fetch (retrying an unreachable registry with backoff until MODEL_LOAD_DEADLINE_S, or
  serving the last good cached version at once when there is one), convert, verify, warm up,
  install;
- watch: a worker thread re-resolves an alias MODEL_URI every MODEL_POLL_INTERVAL_S and reloads
  on request (SIGHUP, POST /api/v1/admin/reload). A new version is downloaded, converted (in a
  niced child process, so TensorFlow never enters the server and the inference thread keeps
  the CPU: convert_child.py), verified and warmed up beside the serving one, then installed
  with one reference swap. Requests already queued finish on the old bundle, which is then freed;
- a version that fails is refused: the old one keeps serving, the failure is logged, counted
  and shown by the model endpoint; it is not retried until the alias moves or a reload is
  requested.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import gc
import hashlib
import logging
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rottenbot_inference.inference.bundle import ModelBundle
from rottenbot_inference.inference.convert_child import ConversionChild, Unfaithful, describe_error
from rottenbot_inference.inference.loader import (
    LocalArtifact,
    ModelLoader,
    ModelLoadError,
    ModelSource,
    model_file,
    source_from_settings,
)
from rottenbot_inference.inference.mlflow_source import (
    MlflowArtifact,
    MlflowSource,
    RegistryUnavailable,
    _utcnow,
)
from rottenbot_inference.inference.service import InferenceService
from rottenbot_inference.settings import Settings
from rottenbot_inference.telemetry import metrics as telemetry_metrics
from rottenbot_inference.telemetry import traced

log = logging.getLogger(__name__)

Outcome = Literal["swapped", "unchanged", "failed", "unreachable"]
Trigger = Literal["start", "poll", "signal", "admin"]


@dataclass(frozen=True)
class ReloadResult:
    outcome: Outcome
    trigger: str
    version: str | None  # serving after this reload
    previous_version: str | None = None
    candidate_version: str | None = None  # what the source named (for failures)
    detail: str | None = None
    at: str = field(default_factory=_utcnow)

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "trigger": self.trigger,
            "version": self.version,
            "previous_version": self.previous_version,
            "candidate_version": self.candidate_version,
            "detail": self.detail,
            "at": self.at,
        }


@dataclass(frozen=True)
class _Serving:
    bundle: ModelBundle
    artifact: LocalArtifact
    key: str
    installed_at: str


@dataclass
class _Request:
    trigger: str
    retry_failed: bool
    reinstall: bool
    future: concurrent.futures.Future[ReloadResult]


class _Stopping(Exception):
    pass


def _content_key(artifact: LocalArtifact) -> str:
    """Identity of a local model: its model file's and class map's content."""
    digest = hashlib.sha256()
    for path in (model_file(artifact.path), artifact.classes_path):
        if path is not None and path.is_file():
            digest.update(path.read_bytes())
    return "local:" + digest.hexdigest()[:16]


def _check_archive(path: Path) -> None:
    """A `.keras` file must be a sound zip archive with a model config."""
    if path.suffix != ".keras":
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelLoadError(f"{path.name} is not a valid Keras archive ({exc})") from exc
    if damaged is not None:
        raise ModelLoadError(f"{path.name} is damaged (bad CRC in {damaged})")
    if "config.json" not in names:
        raise ModelLoadError(f"{path.name} holds no config.json: not a Keras 3 model file")


def trim_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), after a swap."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
            ctypes.CDLL(libc_name).malloc_trim(0)


def verify(bundle: ModelBundle) -> None:
    """Refuse a model whose outputs are not class probabilities on a probe batch."""
    from rottenbot_inference.inference.conversion import probe_batch

    probabilities = bundle.predict(probe_batch(bundle.input_shape, size=2))  # checks the shape
    if not np.isfinite(probabilities).all():
        raise ModelLoadError("the model's outputs are not finite on the probe images")
    sums = probabilities.sum(axis=1)
    if (probabilities < -1e-4).any() or np.abs(sums - 1).max() > 1e-2:
        raise ModelLoadError(
            f"the model's outputs are not probabilities (row sums {np.round(sums, 3).tolist()}); "
            "expected a softmax over the classes"
        )


class ModelManager:
    """The serving model's life cycle: first load, watching, hot swaps, reporting."""

    def __init__(
        self,
        settings: Settings,
        service: InferenceService,
        source: ModelSource | None = None,
        on_status: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.source = source if source is not None else source_from_settings(settings)
        self.loader = ModelLoader(settings)
        self.on_status = on_status
        self.current: _Serving | None = None
        self.registry_reachable: bool | None = None
        self.registry_error: str | None = None
        self.last_check_at: str | None = None
        self.last_result: ReloadResult | None = None  # the last check, whatever came of it
        self.last_swap: ReloadResult | None = None
        self.last_failure: ReloadResult | None = None
        self.counts: dict[str, int] = {"swapped": 0, "unchanged": 0, "failed": 0, "unreachable": 0}
        self._refused_key: str | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._requests: list[_Request] = []
        self._thread: threading.Thread | None = None
        self._converter = ConversionChild(settings)
        self.warm_batch_size = settings.max_batch_size  # batch sizes run once before install
        # Another manager's loaded bundle for a cache key, if it serves that version (the
        # challenger, see challenger.py): reused instead of downloading and converting again.
        self.donor: Callable[[str], ModelBundle | None] | None = None

    # -- reporting --------------------------------------------------------------------------

    @property
    def is_mlflow(self) -> bool:
        return isinstance(self.source, MlflowSource)

    @property
    def polls(self) -> bool:
        return (
            isinstance(self.source, MlflowSource)
            and self.source.follows_alias
            and self.settings.model_poll_interval_s > 0
        )

    @property
    def serving_from_cache(self) -> bool:
        """Serving a cached model because the registry could not be asked what is current."""
        artifact = self.current.artifact if self.current else None
        return isinstance(artifact, MlflowArtifact) and artifact.stale

    @property
    def warning(self) -> str | None:
        """What readiness should say besides 'ready' (None: nothing to say)."""
        if self.current is None:
            return None
        if self.serving_from_cache:
            return (
                f"serving cached model version {self.current.bundle.version}: the registry is "
                f"unreachable ({self.registry_error})"
            )
        if self.last_failure is not None and self._refused_key is not None:
            return (
                f"version {self.last_failure.candidate_version} was refused "
                f"({self.last_failure.detail}); still serving {self.current.bundle.version}"
            )
        return None

    def describe(self) -> dict[str, Any]:
        """For the model endpoint: where the model came from and how reloading goes."""
        artifact = self.current.artifact if self.current else None
        registry = None
        if isinstance(self.source, MlflowSource):
            registry = {
                **(artifact.describe() if isinstance(artifact, MlflowArtifact) else {}),
                "model_uri": self.source.ref.uri,
                "tracking_uri": self.source.tracking_uri,
                "reachable": self.registry_reachable,
                "error": self.registry_error,
                "follows_alias": self.source.follows_alias,
                "poll_interval_s": self.settings.model_poll_interval_s if self.polls else None,
                "last_check_at": self.last_check_at,
            }
        return {
            "run_id": artifact.run_id if isinstance(artifact, MlflowArtifact) else None,
            "serving_from_cache": self.serving_from_cache,
            "registry": registry,
            "reload": {
                "installed_at": self.current.installed_at if self.current else None,
                "last": self.last_result.as_dict() if self.last_result else None,
                "last_swap": self.last_swap.as_dict() if self.last_swap else None,
                "last_failure": self.last_failure.as_dict() if self.last_failure else None,
                "counts": dict(self.counts),
            },
        }

    def _status_changed(self) -> None:
        if self.on_status is not None:
            try:
                self.on_status()
            except Exception:
                log.exception("status callback failed")

    # -- the first load -------------------------------------------------------------------

    def load_initial(self, progress: Callable[[str], None] | None = None) -> ModelBundle:
        """Load and install the configured model; blocking (run it in a thread).

        An unreachable registry is retried with exponential backoff until
        MODEL_LOAD_DEADLINE_S; wrong URIs, missing models or aliases, and broken models raise
        at once.
        """
        deadline_s = self.settings.model_load_deadline_s
        deadline = time.monotonic() + deadline_s
        delay, attempt = 1.0, 0
        while True:
            attempt += 1
            try:
                artifact = self.source.fetch()
                bundle = self._build(artifact, background=False)
                break
            except RegistryUnavailable as exc:
                self._registry_down(exc, quiet=True)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ModelLoadError(
                        f"{exc}; gave up after {attempt} attempt(s) in {deadline_s:g} s "
                        "(MODEL_LOAD_DEADLINE_S) and no cached copy of the model exists"
                    ) from exc
                wait = min(delay, remaining, self.settings.model_load_retry_max_s)
                delay *= 2
                message = (
                    f"waiting for the model registry: {exc} (attempt {attempt}; retrying in "
                    f"{wait:.0f} s, giving up in {remaining:.0f} s)"
                )
                log.warning("%s", message)
                if progress is not None:
                    progress(message)
                if self._stopping.wait(wait):
                    raise ModelLoadError("shutting down while waiting for the registry") from exc
        if isinstance(artifact, MlflowArtifact) and artifact.stale:
            self.registry_reachable, self.registry_error = False, artifact.registry_error
        elif self.is_mlflow:
            self.registry_reachable, self.registry_error = True, None
        self._install(bundle, artifact, "start")
        # The first install counts as a swap (trigger "start"), so `counts` agrees with `last`.
        self.last_result = self.last_swap = ReloadResult("swapped", "start", bundle.version)
        self.counts["swapped"] += 1
        return bundle

    # -- watching ---------------------------------------------------------------------------

    def start_watching(self) -> None:
        """Start the worker thread (polls an alias; serves reload requests)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name="model-reloader", daemon=True)
        self._thread.start()
        if self.polls:
            log.info(
                "watching %s every %g s for a new version",
                self.source.describe(),  # type: ignore[attr-defined]
                self.settings.model_poll_interval_s,
            )

    def request_reload(
        self, trigger: str, retry_failed: bool = True, reinstall: bool = False
    ) -> concurrent.futures.Future[ReloadResult]:
        """Ask the worker to check the source now; the future gets the outcome."""
        future: concurrent.futures.Future[ReloadResult] = concurrent.futures.Future()
        if self._stopping.is_set() or self._thread is None:
            future.set_exception(RuntimeError("the model is not loaded yet, or shutting down"))
            return future
        with self._lock:
            self._requests.append(_Request(trigger, retry_failed, reinstall, future))
        self._wake.set()
        return future

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the worker (killing a conversion child) and fail pending requests."""
        self._stopping.set()
        self._wake.set()
        self._converter.kill()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        with self._lock:
            pending, self._requests = self._requests, []
        for request in pending:
            if not request.future.done():
                request.future.set_exception(RuntimeError("shutting down"))

    def _watch(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.settings.model_poll_interval_s if self.polls else None)
            self._wake.clear()
            if self._stopping.is_set():
                break
            with self._lock:
                requests, self._requests = self._requests, []
            if requests:
                trigger = requests[0].trigger
                retry_failed = any(request.retry_failed for request in requests)
                reinstall = any(request.reinstall for request in requests)
            else:
                trigger, retry_failed, reinstall = "poll", False, False
            try:
                result = self.check(trigger, retry_failed=retry_failed, reinstall=reinstall)
            except _Stopping:
                break
            except Exception as exc:  # never let the watcher die
                log.exception("model check failed")
                result = ReloadResult("failed", trigger, self._version(), detail=str(exc))
            for request in requests:
                if not request.future.done():
                    request.future.set_result(result)
        with self._lock:
            pending, self._requests = self._requests, []
        for request in pending:
            if not request.future.done():
                request.future.set_exception(RuntimeError("shutting down"))

    def _version(self) -> str | None:
        return self.current.bundle.version if self.current else None

    def check(
        self, trigger: str, retry_failed: bool = False, reinstall: bool = False
    ) -> ReloadResult:
        """Resolve the source; load, verify and install what it names if that is new."""
        self.last_check_at = _utcnow()
        previous = self._version()
        try:
            if isinstance(self.source, MlflowSource):
                resolution = self.source.resolve()
                key, candidate = resolution.key, resolution.version
                load: Callable[[], LocalArtifact] = lambda: self.source.fetch_resolution(resolution)  # type: ignore[attr-defined]  # noqa: E731
            else:
                artifact = self.source.fetch()
                key, candidate = _content_key(artifact), None
                load = lambda: artifact  # noqa: E731
        except RegistryUnavailable as exc:
            self._registry_down(exc)
            return self._finish(ReloadResult("unreachable", trigger, previous, detail=str(exc)))
        except ModelLoadError as exc:  # the alias was deleted, the file is gone, ...
            self._registry_up()
            repeated = self.last_failure is not None and self.last_failure.detail == str(exc)
            (log.debug if repeated else log.error)("model source check failed: %s", exc)
            return self._finish(
                ReloadResult("failed", trigger, previous, detail=str(exc)), failure=True
            )
        self._registry_up()
        current = self.current
        if current is not None and current.key == key and not reinstall:
            if self.serving_from_cache:  # the registry confirms what the cache served
                self.current = replace(current, artifact=replace(current.artifact, stale=False))
                log.info("the registry confirms version %s is current", previous)
                self._status_changed()
            return self._finish(ReloadResult("unchanged", trigger, previous), quiet=True)
        if key == self._refused_key and not retry_failed:
            return self._finish(
                ReloadResult(
                    "failed", trigger, previous, candidate_version=candidate,
                    detail="refused before; retried when the alias moves or on a reload request",
                ),
                quiet=True,
            )
        started = time.monotonic()
        try:
            with traced("reload_model", {"reload.trigger": trigger}):
                artifact = load()
                candidate = artifact.version or candidate
                bundle = self._donated(key, artifact)
                if bundle is None:
                    log.info("loading %s (trigger %s) beside version %s", artifact.source,
                             trigger, previous)
                    bundle = self._build(artifact, background=True)
        except _Stopping:
            raise
        except RegistryUnavailable as exc:
            self._registry_down(exc)
            return self._finish(
                ReloadResult("unreachable", trigger, previous, candidate_version=candidate,
                             detail=str(exc))
            )
        except Exception as exc:
            self._refused_key = key
            detail = describe_error(exc)
            log.error(
                "REFUSED model version %s (%s); still serving version %s", candidate, detail,
                previous,
            )
            self._record_load("failure", time.monotonic() - started)
            return self._finish(
                ReloadResult("failed", trigger, previous, candidate_version=candidate,
                             detail=detail),
                failure=True,
            )
        self._install(bundle, artifact, trigger, key=key)
        result = self._finish(
            ReloadResult("swapped", trigger, self._version(), previous_version=previous,
                         candidate_version=candidate)
        )
        del bundle, current  # the old bundle lives on only in requests still queued for it
        self._stopping.wait(1.0)  # let requests queued on the old model finish, then free it
        trim_memory()
        return result

    def _finish(
        self, result: ReloadResult, failure: bool = False, quiet: bool = False
    ) -> ReloadResult:
        self.counts[result.outcome] += 1
        if not quiet or result.trigger != "poll":
            self._record_reload(result.trigger, result.outcome)
        self.last_result = result
        if result.outcome == "swapped":
            self.last_swap = result
        if failure:
            self.last_failure = result
            self._status_changed()
        return result

    def _registry_down(self, exc: Exception, quiet: bool = False) -> None:
        was = self.registry_reachable
        self.registry_reachable, self.registry_error = False, str(exc)
        telemetry_metrics.record_registry_error()
        if was is not False and not quiet:
            log.warning("the model registry is unreachable: %s (still serving %s)", exc,
                        self._version())
        if was is not False:
            self._status_changed()

    def _registry_up(self) -> None:
        if not self.is_mlflow:
            return
        was = self.registry_reachable
        self.registry_reachable, self.registry_error = True, None
        if was is False:
            log.info("the model registry is reachable again")
            self._status_changed()

    # -- building and installing ------------------------------------------------------------

    def _build(self, artifact: LocalArtifact, background: bool) -> ModelBundle:
        """Convert (in a child process), load, verify and warm up; the caller installs."""
        started = time.monotonic()
        path = model_file(artifact.path)
        loader = self.loader
        _check_archive(path)  # a damaged download fails here, not after a TensorFlow import
        if self.settings.model_convert_isolated and self.loader.needs_conversion(path):
            nice = self.settings.model_reload_nice if background else 0
            try:
                self._converter.run(path, nice)
            except ModelLoadError as exc:
                if self._stopping.is_set():  # killed by stop()
                    raise _Stopping() from None
                if not isinstance(exc, Unfaithful):
                    raise
                if not self.settings.keras_fallback:
                    raise ModelLoadError(str(exc)) from exc
                log.error("%s; loading it in-process (the Keras fallback may follow)", exc)
        if self._stopping.is_set():
            raise _Stopping()
        bundle = loader.load(_Fixed(artifact))
        verify(bundle)
        bundle.warm_up(self.warm_batch_size)
        self._record_load("success", time.monotonic() - started)
        return bundle

    def _donated(self, key: str, artifact: LocalArtifact) -> ModelBundle | None:
        """The donor's loaded bundle for `key` (same session: no download, no conversion),
        relabelled with this source and warmed up for this manager's batch sizes."""
        found = self.donor(key) if self.donor is not None else None
        if found is None:
            return None
        bundle = replace(found, source=artifact.source)
        bundle.warm_up(self.warm_batch_size)
        log.info("version %s is already loaded beside this model: reusing its session",
                 bundle.version)
        self._record_load("reused")
        return bundle

    def _record_load(self, outcome: str, seconds: float | None = None) -> None:
        telemetry_metrics.record_model_load(outcome, seconds)

    def _record_reload(self, trigger: str, outcome: str) -> None:
        telemetry_metrics.record_model_reload(trigger, outcome)

    def _install(
        self, bundle: ModelBundle, artifact: LocalArtifact, trigger: str, key: str | None = None
    ) -> None:
        previous = self._version()
        if key is None:
            mlflow_key = artifact.key if isinstance(artifact, MlflowArtifact) else None
            key = mlflow_key or _content_key(artifact)
        self.service.install(bundle)  # the swap: one reference
        self.current = _Serving(bundle, artifact, key, _utcnow())
        if key == self._refused_key:
            self._refused_key = None
        if isinstance(self.source, MlflowSource) and isinstance(artifact, MlflowArtifact):
            try:
                if not artifact.stale:
                    self.source.remember_good(artifact)
                self.source.prune(keep={artifact.key})
            except OSError:
                log.warning("could not update the model cache", exc_info=True)
        log.info(
            "serving model %s version %s (%s; trigger %s; previous %s)",
            bundle.name, bundle.version, artifact.source, trigger, previous,
        )
        self._status_changed()


@dataclass(frozen=True)
class _Fixed:
    """A source that returns an artifact already fetched."""

    artifact: LocalArtifact

    def fetch(self) -> LocalArtifact:
        return self.artifact
