"""Models from MLflow (a tracking server with its model registry), through MLflow's client.

`MODEL_URI` forms (`MLFLOW_TRACKING_URI` names the server):

    models:/<name>@<alias>       the version an alias points at (the reloader follows it)
    models:/<name>/<version>     one registered version
    models:/m-<id>               a logged model (MLflow 3)
    runs:/<run_id>/<path>        a model logged in a run
    mlflow-artifacts:/<path>     an artifact the server proxies (also s3://, gs://, http(s)://)

Downloads land in a cache (`DATA_DIR/mlflow-cache/<server>/...`) keyed by what cannot change
under the same name: a registry version, a logged model, a run's artifact path. A pinned URI
whose entry is cached needs no server at all; an alias is re-resolved each time, and when the
server cannot be reached the last good version it resolved to is served (`stale`).

The class map (`index_to_class.json`) comes from the model's own artifacts when it is there,
else from the run that logged the version, else from run `RUN_ID` (the old deployment's way).

Only `mlflow-skinny` is needed here; every MLflow import is lazy, so a service serving a local
model never imports MLflow.
"""

from __future__ import annotations

import contextlib
import datetime as dt
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
from typing import Any, Literal
from urllib.parse import quote, urlparse

import yaml

from rottenbot_inference.inference.loader import (
    CLASSES_FILE,
    LocalArtifact,
    ModelLoadError,
    model_file,
    parse_class_map,
)
from rottenbot_inference.settings import Settings

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("models", "runs", "mlflow-artifacts")
ARTIFACT_SCHEMES = ("mlflow-artifacts", "s3", "gs", "wasbs", "abfss", "http", "https", "file")
URI_FORMS = (
    "models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id>, runs:/<run_id>/<path> "
    "or mlflow-artifacts:/<path>"
)
ENTRY_FILE = "entry.json"
PARTIAL_PREFIX = ".partial-"
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

Kind = Literal["alias", "version", "logged", "run", "artifact"]


class RegistryUnavailable(ModelLoadError):
    """The tracking server or artifact store cannot be reached now: worth retrying."""


def is_mlflow_uri(uri: str | None) -> bool:
    return bool(uri) and uri.strip().partition(":")[0].lower() in MLFLOW_SCHEMES  # type: ignore[union-attr]


def wants_mlflow(settings: Settings) -> bool:
    """USE_LOCAL=false, or USE_LOCAL left unset with an MLflow MODEL_URI."""
    if not settings.use_local:
        if not settings.model_uri:
            raise ModelLoadError(
                "USE_LOCAL=false needs MODEL_URI (e.g. models:/rottenbot@champion) and "
                "MLFLOW_TRACKING_URI"
            )
        return True
    explicit_local = "use_local" in settings.model_fields_set
    return not explicit_local and is_mlflow_uri(settings.model_uri)


@dataclass(frozen=True)
class ModelRef:
    """A parsed MODEL_URI."""

    uri: str
    kind: Kind
    name: str
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    path: str | None = None  # run artifact path, or the logged model id

    @property
    def follows_alias(self) -> bool:
        return self.kind == "alias"


def parse_model_uri(uri: str) -> ModelRef:
    """Validate MODEL_URI up front, so that a typo fails at once with the accepted forms."""
    raw = uri.strip()
    scheme, colon, rest = raw.partition(":")
    scheme = scheme.lower()
    if not colon or not scheme:
        raise ModelLoadError(f"MODEL_URI {raw!r} is not a URI; use {URI_FORMS}")
    if scheme == "models":
        body = rest[1:] if rest.startswith("/") and not rest.startswith("//") else None
        if body is not None:
            if match := re.fullmatch(r"([^/@]+)@([^/@]+)", body):
                return ModelRef(raw, "alias", match[1], alias=match[2])
            if match := re.fullmatch(r"([^/@]+)/(\d+)", body):
                return ModelRef(raw, "version", match[1], version=match[2])
            if re.fullmatch(r"m-[0-9a-fA-F]+", body):
                return ModelRef(raw, "logged", body, path=body)
            if re.fullmatch(r"[^/@]+/[A-Za-z]+", body):
                raise ModelLoadError(
                    f"MODEL_URI {raw!r}: stage and 'latest' URIs are not supported (stages are "
                    "deprecated in MLflow); point an alias at the version instead: "
                    f"models:/{body.split('/')[0]}@champion"
                )
        raise ModelLoadError(f"MODEL_URI {raw!r} is not a valid models:/ URI; use {URI_FORMS}")
    if scheme == "runs":
        match = re.fullmatch(r"/([0-9A-Za-z_-]+)/(.+?)/?", rest)
        if not match:
            raise ModelLoadError(f"MODEL_URI {raw!r}: expected runs:/<run_id>/<artifact path>")
        path = match[2]
        return ModelRef(raw, "run", path.rsplit("/", 1)[-1], run_id=match[1], path=path)
    if scheme in ARTIFACT_SCHEMES:
        name = urlparse(raw).path.rstrip("/").rsplit("/", 1)[-1] or "model"
        if name == "artifacts":  # mlflow-artifacts:/1/models/m-.../artifacts
            parent = urlparse(raw).path.rstrip("/").rsplit("/", 2)
            name = parent[-2] if len(parent) >= 2 and parent[-2] else name
        return ModelRef(raw, "artifact", name)
    raise ModelLoadError(f"MODEL_URI {raw!r}: unsupported scheme {scheme!r}; use {URI_FORMS}")


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


@dataclass(frozen=True)
class MlflowArtifact(LocalArtifact):
    """A downloaded MLflow model on local disk, with its registry coordinates."""

    key: str = ""
    uri: str = ""
    tracking_uri: str | None = None
    run_id: str | None = None
    alias: str | None = None
    classes_from: str | None = None
    downloaded_at: str | None = None
    from_cache: bool = False  # no download was needed
    stale: bool = False  # registry unreachable: served from cache as the last good version
    registry_error: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.tracking_uri,
            "model_uri": self.uri,
            "registered_model": self.name,
            "alias": self.alias,
            "version": self.version,
            "run_id": self.run_id,
            "classes_from": self.classes_from,
            "downloaded_at": self.downloaded_at,
        }


def _utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _safe(part: str) -> str:
    """A path component for any string (model names may hold spaces, slashes, unicode)."""
    return quote(part, safe="-_.@") or "_"


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{PARTIAL_PREFIX}{uuid.uuid4().hex}.json")
    with temporary.open("w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


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
        self.cache_root = settings.mlflow_cache / f"{slug or 'server'}-{digest}"
        self._mlflow: Any = None
        self._client: Any = None
        self._remove_partials()

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
        ref = self.ref
        if ref.kind == "version":
            return f"versions/{_safe(ref.name)}/{ref.version}"
        if ref.kind == "logged":
            return f"logged/{_safe(ref.name)}"
        if ref.kind == "run":
            return f"runs/{_safe(ref.run_id or '')}/{_safe(ref.path or '')}"
        if ref.kind == "artifact":
            return f"uris/{hashlib.sha256(ref.uri.encode()).hexdigest()[:24]}"
        return None

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
                key=f"versions/{_safe(ref.name)}/{found.version}",
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

    # -- the cache --------------------------------------------------------------------------

    def _load_entry(
        self, key: str, from_cache: bool = True, fingerprint: str | None = None
    ) -> MlflowArtifact | None:
        folder = self.cache_root / key
        try:
            entry = json.loads((folder / ENTRY_FILE).read_text())
        except (OSError, ValueError):
            return None
        if fingerprint is not None and entry.get("fingerprint") not in (None, fingerprint):
            log.warning("cached %s is not what the registry now calls it; downloading again",
                        folder)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        model = folder / entry["model"]
        found = folder / entry["model_file"]
        if not found.is_file() or (from_cache and _sha256(found) != entry.get("sha256")):
            log.warning("cached model %s is damaged; it will be downloaded again", folder)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        version = entry.get("version")
        label = f"{entry['name']} version {version}" if version else entry["name"]
        with contextlib.suppress(OSError):
            os.utime(folder / ENTRY_FILE)  # recently used: pruned last
        return MlflowArtifact(
            path=model,
            source=f"{self.ref.uri} ({label})" if self.ref.kind == "alias" else self.ref.uri,
            name=entry["name"],
            version=version,
            classes_path=folder / CLASSES_FILE,
            key=key,
            uri=self.ref.uri,
            tracking_uri=self.tracking_uri,
            run_id=entry.get("run_id"),
            alias=self.ref.alias,
            classes_from=entry.get("classes_from"),
            downloaded_at=entry.get("downloaded_at"),
            from_cache=from_cache,
        )

    def _pointer(self) -> Path:
        digest = hashlib.sha256(self.ref.uri.encode()).hexdigest()[:24]
        return self.cache_root / "last-good" / f"{digest}.json"

    def remember_good(self, artifact: MlflowArtifact) -> None:
        """Record the version now serving as this URI's fallback for an unreachable registry."""
        _write_json(
            self._pointer(),
            {"uri": self.ref.uri, "key": artifact.key, "version": artifact.version,
             "recorded_at": _utcnow()},
        )

    def last_good(self) -> MlflowArtifact | None:
        try:
            pointer = json.loads(self._pointer().read_text())
        except (OSError, ValueError):
            return None
        artifact = self._load_entry(pointer["key"])
        if artifact is not None:
            log.info("last good model for %s: %s (since %s)", self.ref.uri, artifact.source,
                     pointer.get("recorded_at"))
        return artifact

    def prune(self, keep: set[str]) -> None:
        """Delete cached versions beyond the newest MLFLOW_CACHE_KEEP (keeping `keep`)."""
        try:
            pointers = [
                json.loads(path.read_text())["key"]
                for path in (self.cache_root / "last-good").glob("*.json")
            ]
        except (OSError, ValueError, KeyError):
            return  # never delete on a doubtful picture
        protected = keep | set(pointers)
        entries = sorted(
            self.cache_root.rglob(ENTRY_FILE), key=lambda path: path.stat().st_mtime, reverse=True
        )
        others = [path.parent for path in entries
                  if str(path.parent.relative_to(self.cache_root)) not in protected]
        for folder in others[self.settings.mlflow_cache_keep:]:
            log.info("removing cached model %s", folder)
            shutil.rmtree(folder, ignore_errors=True)

    def _remove_partials(self) -> None:
        """Leftovers of downloads a crash interrupted (older than an hour: not in progress)."""
        if not self.cache_root.is_dir():
            return
        cutoff = time.time() - 3600
        for path in self.cache_root.glob(f"{PARTIAL_PREFIX}*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()


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
