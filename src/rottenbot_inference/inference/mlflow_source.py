"""Models from MLflow (a tracking server with its model registry), through MLflow's client.

`MlflowSource` resolves MODEL_URI (forms and parsing: mlflow_uri.py) and downloads what it names
into the download cache (mlflow_cache.py). A pinned URI whose entry is cached needs no server
at all; an alias is re-resolved each time, and when the server cannot be reached the last good
version it resolved to is served (`stale`).

The class map (`index_to_class.json`) comes from the model's own artifacts when it is there,
else from the run that logged the version, else from run `RUN_ID` (the old deployment's way).

Only `mlflow-skinny` is needed here; every MLflow import is lazy, so a service serving a local
model never imports MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from rottenbot_inference.inference.loader import (
    CLASSES_FILE,
    ModelLoadError,
    model_file,
    parse_class_map,
)
from rottenbot_inference.inference.mlflow_cache import (
    ENTRY_FILE,
    PARTIAL_PREFIX,
    DownloadCache,
    MlflowArtifact,
    _sha256,
    _utcnow,
    _write_json,
    pinned_key,
    version_key,
)
from rottenbot_inference.inference.mlflow_uri import (
    URI_FORMS,
    ModelRef,
    is_mlflow_uri,
    parse_model_uri,
    wants_mlflow,
)
from rottenbot_inference.settings import Settings

log = logging.getLogger(__name__)

# MLflow error codes that no retry will fix: the model, version, alias or run is not there
# (or we may not see it). Everything else (connection errors, timeouts, 5xx) is retried.
PERMANENT_ERROR_CODES = frozenset(
    {
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_PARAMETER_VALUE",
        "NOT_FOUND",
        "BAD_REQUEST",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "INVALID_STATE",
    }
)

class RegistryUnavailable(ModelLoadError):
    """The tracking server or artifact store cannot be reached now: worth retrying."""


@dataclass(frozen=True)
class Resolution:
    """What a MODEL_URI points at now (for an alias: this moment's version)."""

    key: str  # cache entry, relative to the server's cache folder
    name: str
    version: str | None = None  # registry version
    run_id: str | None = None
    # What the registry says the version is (its logged model / source and creation time):
    # a registry rebuilt at the same address may reuse "version 1" for another model.
    fingerprint: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} version {self.version}" if self.version else self.name


def _short(exc: BaseException) -> str:
    """A one-line reason, without MLflow's urllib3 retry essay."""
    text = str(exc)
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("Failed to establish a new connection", "cannot connect"),
        ("Name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("Read timed out", "read timed out"),
        ("timed out", "timed out"),
        ("RemoteDisconnected", "connection closed by the server"),
        ("Connection reset", "connection reset"),
    ):
        if needle in text:
            return reason
    line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."


_configure_lock = threading.Lock()


def configure_mlflow(settings: Settings, tracking_uri: str) -> Any:
    """Import MLflow with bounded HTTP retries, our logging, and this tracking/registry URI.

    The URIs are set process-wide as well as passed explicitly: MLflow resolves some URIs
    (`runs:/` to a logged model) through the global tracking URI, which otherwise defaults to
    a SQLite file in the working directory.
    """
    with _configure_lock:
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
        os.environ.setdefault(
            "MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(settings.mlflow_http_timeout_s)))
        )
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.mlflow_http_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        try:
            import mlflow
        except ImportError as exc:  # pragma: no cover - depends on installed packages
            raise ModelLoadError(
                "MLflow models need the MLflow client: pip install mlflow-skinny"
            ) from exc
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        return mlflow


class MlflowSource:
    """Resolves and downloads MODEL_URI through MLflow; see the module docstring."""

    def __init__(self, settings: Settings, uri: str | None = None) -> None:
        self.settings = settings
        model_uri = uri or settings.model_uri
        if not model_uri:
            raise ModelLoadError("MODEL_URI is not set")
        self.ref = parse_model_uri(model_uri)
        tracking_uri = settings.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:
            raise ModelLoadError(
                f"MODEL_URI {self.ref.uri} needs MLFLOW_TRACKING_URI (e.g. http://mlflow:5000)"
            )
        self.tracking_uri = tracking_uri.rstrip("/")
        server = urlparse(self.tracking_uri)
        slug = re.sub(r"[^A-Za-z0-9.-]+", "_", server.netloc or server.path)[-48:].strip("_")
        digest = hashlib.sha256(self.tracking_uri.encode()).hexdigest()[:8]
        self.cache = DownloadCache(
            settings.mlflow_cache / f"{slug or 'server'}-{digest}", self.ref, self.tracking_uri,
            settings.mlflow_cache_keep,
        )
        self._mlflow: Any = None
        self._client: Any = None
        self.cache.remove_partials()

    @property
    def cache_root(self) -> Path:
        return self.cache.root

    @property
    def follows_alias(self) -> bool:
        return self.ref.follows_alias

    def describe(self) -> str:
        return f"{self.ref.uri} on {self.tracking_uri}"

    # -- MLflow client --------------------------------------------------------------------

    def client(self) -> Any:
        if self._client is None:
            self._mlflow = configure_mlflow(self.settings, self.tracking_uri)
            from mlflow import MlflowClient

            self._client = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
        return self._client

    def _translate(self, exc: Exception, what: str) -> ModelLoadError:
        """A clear error: permanent (not found, bad request, no permission) or unreachable."""
        if isinstance(exc, ModelLoadError):
            return exc
        code = getattr(exc, "error_code", None)
        if code in PERMANENT_ERROR_CODES:
            message = getattr(exc, "message", None) or str(exc)
            prefix = f"{code}: "
            message = message[len(prefix):] if message.startswith(prefix) else message
            return ModelLoadError(f"{what}: {message} (MLflow at {self.tracking_uri})")
        return RegistryUnavailable(
            f"{what}: MLflow at {self.tracking_uri} is unreachable ({_short(exc)})"
        )

    # -- resolving ------------------------------------------------------------------------

    def static_key(self) -> str | None:
        """The cache entry of a URI that always means the same model (None for an alias)."""
        return pinned_key(self.ref)

    def resolve(self) -> Resolution:
        """What MODEL_URI names now (asks the registry for aliases and versions)."""
        ref = self.ref
        if ref.kind == "alias":
            try:
                found = self.client().get_model_version_by_alias(ref.name, ref.alias)
            except Exception as exc:
                raise self._translate(
                    exc, f"alias {ref.alias!r} of registered model {ref.name!r}"
                ) from exc
            return Resolution(
                key=version_key(ref.name, found.version),
                name=ref.name,
                version=str(found.version),
                run_id=found.run_id or None,
                fingerprint=_fingerprint(found),
            )
        if ref.kind == "version":
            try:
                found = self.client().get_model_version(ref.name, ref.version)
            except Exception as exc:
                raise self._translate(
                    exc, f"version {ref.version} of registered model {ref.name!r}"
                ) from exc
            return Resolution(
                key=self.static_key() or "", name=ref.name, version=ref.version,
                run_id=found.run_id or None, fingerprint=_fingerprint(found),
            )
        return Resolution(key=self.static_key() or "", name=ref.name, run_id=ref.run_id)

    def _download_uri(self, resolution: Resolution) -> str:
        ref = self.ref
        if ref.kind in ("alias", "version"):
            try:
                return self.client().get_model_version_download_uri(
                    resolution.name, resolution.version
                )
            except Exception as exc:
                raise self._translate(exc, f"{resolution.label} download location") from exc
        return ref.uri

    # -- fetching -------------------------------------------------------------------------

    def fetch(self) -> MlflowArtifact:
        """The model MODEL_URI names, downloaded or from the cache (ModelSource protocol).

        A pinned URI already cached needs no server. An alias asks the registry; if it cannot
        be reached, the last good version served for this URI comes back marked `stale`.
        """
        key = self.static_key()
        if key is not None:
            cached = self._load_entry(key)
            if cached is not None:
                return cached
        try:
            return self.fetch_resolution(self.resolve())
        except RegistryUnavailable as exc:
            last = self.last_good()
            if last is None:
                raise
            log.warning(
                "MLflow is unreachable (%s); serving the last good model from the cache: %s",
                exc, last.source,
            )
            return replace(last, stale=True, registry_error=str(exc))

    def fetch_resolution(self, resolution: Resolution) -> MlflowArtifact:
        """Download what a resolution names (unless cached), with its class map."""
        cached = self._load_entry(resolution.key, fingerprint=resolution.fingerprint)
        if cached is not None:
            return cached
        return self._download(resolution)

    def _download(self, resolution: Resolution) -> MlflowArtifact:
        self.client()
        mlflow = self._mlflow
        final = self.cache_root / resolution.key
        partial = self.cache_root / f"{PARTIAL_PREFIX}{uuid.uuid4().hex}"
        started = time.monotonic()
        try:
            download_uri = self._download_uri(resolution)
            try:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=download_uri,
                        dst_path=str(partial / "download"),
                        tracking_uri=self.tracking_uri,
                    )
                )
            except Exception as exc:
                raise self._translate(exc, f"downloading {resolution.label}") from exc
            target = partial / ("model" + (local.suffix if local.is_file() else ""))
            os.replace(local, target)
            shutil.rmtree(partial / "download", ignore_errors=True)
            found = model_file(target)  # checks the layout before anything is cached
            run_id = resolution.run_id or _mlmodel_run_id(target)
            names, classes_from = self._class_map(target, resolution, run_id, partial)
            (partial / CLASSES_FILE).write_text(json.dumps(dict(enumerate(names)), indent=1))
            entry = {
                "uri": self.ref.uri,
                "tracking_uri": self.tracking_uri,
                "download_uri": download_uri,
                "name": resolution.name,
                "version": resolution.version,
                "run_id": run_id,
                "model": target.name,
                "model_file": str(found.relative_to(partial)),
                "sha256": _sha256(found),
                "classes_from": classes_from,
                "fingerprint": resolution.fingerprint,
                "downloaded_at": _utcnow(),
            }
            _write_json(partial / ENTRY_FILE, entry)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # another process got here first, or a broken old entry
                if self._load_entry(resolution.key) is not None:
                    return self._load_entry(resolution.key, from_cache=False)  # type: ignore[return-value]
                shutil.rmtree(final, ignore_errors=True)
            os.rename(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        log.info(
            "downloaded %s from %s in %.1f s (class map from %s)",
            resolution.label, self.tracking_uri, time.monotonic() - started, classes_from,
        )
        artifact = self._load_entry(resolution.key, from_cache=False)
        if artifact is None:
            raise ModelLoadError(f"{final}: the downloaded model vanished from the cache")
        return artifact

    def _class_map(
        self, model_dir: Path, resolution: Resolution, run_id: str | None, scratch: Path
    ) -> tuple[tuple[str, ...], str]:
        """index_to_class.json: the model's artifacts, then its run, then run RUN_ID."""
        folder = model_dir if model_dir.is_dir() else model_dir.parent
        for candidate in (
            folder / CLASSES_FILE,
            folder / "artifacts" / CLASSES_FILE,
            folder / "data" / CLASSES_FILE,
            folder / "extra_files" / CLASSES_FILE,
        ):
            if candidate.is_file():
                origin = f"model artifact {candidate.relative_to(folder)}"
                return parse_class_map(json.loads(candidate.read_text()), origin), origin
        runs = [run for run in (run_id, self.settings.run_id) if run]
        for run in dict.fromkeys(runs):
            try:
                local = self._mlflow.artifacts.download_artifacts(
                    artifact_uri=f"runs:/{run}/{CLASSES_FILE}",
                    dst_path=str(scratch / f"classes-{run}"),
                    tracking_uri=self.tracking_uri,
                )
            except Exception as exc:
                error = self._translate(exc, f"{CLASSES_FILE} of run {run}")
                if isinstance(error, RegistryUnavailable):
                    raise error from exc
                log.info("run %s has no %s (%s)", run, CLASSES_FILE, error)
                continue
            origin = f"run {run}"
            return parse_class_map(json.loads(Path(local).read_text()), origin), origin
        looked = ", ".join(f"run {run}" for run in dict.fromkeys(runs)) or "no run (RUN_ID unset)"
        raise ModelLoadError(
            f"{resolution.label}: no {CLASSES_FILE} among the model's artifacts nor in {looked}; "
            f"log it with mlflow.log_dict(index_to_class, {CLASSES_FILE!r}) or set RUN_ID"
        )

    # -- the cache (mlflow_cache.py) ----------------------------------------------------------

    def _load_entry(
        self, key: str, from_cache: bool = True, fingerprint: str | None = None
    ) -> MlflowArtifact | None:
        return self.cache.load(key, from_cache=from_cache, fingerprint=fingerprint)

    def remember_good(self, artifact: MlflowArtifact) -> None:
        """Record the version now serving as this URI's fallback for an unreachable registry."""
        self.cache.remember_good(artifact)

    def last_good(self) -> MlflowArtifact | None:
        return self.cache.last_good()

    def prune(self, keep: set[str]) -> None:
        """Delete cached versions beyond the newest MLFLOW_CACHE_KEEP (keeping `keep`)."""
        self.cache.prune(keep)


def _fingerprint(version: Any) -> str:
    return f"{getattr(version, 'source', '')}|{getattr(version, 'creation_timestamp', '')}"


def _mlmodel_run_id(model_dir: Path) -> str | None:
    """The run that logged a model, from its MLmodel file."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return None
    try:
        run_id = (yaml.safe_load(mlmodel.read_text()) or {}).get("run_id")
    except yaml.YAMLError:
        return None
    return str(run_id) if run_id else None


__all__ = [
    "URI_FORMS",
    "MlflowArtifact",
    "MlflowSource",
    "ModelRef",
    "RegistryUnavailable",
    "Resolution",
    "configure_mlflow",
    "is_mlflow_uri",
    "parse_model_uri",
    "wants_mlflow",
]
