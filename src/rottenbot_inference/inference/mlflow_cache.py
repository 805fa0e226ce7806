"""The download cache of MLflow models (`DATA_DIR/mlflow-cache/<server>/...`).

Entries are keyed by what cannot change under the same name: a registry version, a logged
model, a run's artifact path. Each entry folder holds the model, its class map and `entry.json`
(where it came from, the model file's SHA-256, the registry's fingerprint of the version). A
damaged entry, or one the registry now describes differently, is removed and downloaded again.
Per MODEL_URI a "last good" pointer names the version last served, the fallback when the
registry cannot be reached; old entries beyond MLFLOW_CACHE_KEEP are pruned.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rottenbot_inference.inference.loader import CLASSES_FILE, LocalArtifact
from rottenbot_inference.inference.mlflow_uri import ModelRef

log = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"
PARTIAL_PREFIX = ".partial-"


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


def version_key(name: str, version: object) -> str:
    """The entry of one registry version."""
    return f"versions/{_safe(name)}/{version}"


def pinned_key(ref: ModelRef) -> str | None:
    """The entry of a URI that always means the same model (None for an alias)."""
    if ref.kind == "version":
        return version_key(ref.name, ref.version)
    if ref.kind == "logged":
        return f"logged/{_safe(ref.name)}"
    if ref.kind == "run":
        return f"runs/{_safe(ref.run_id or '')}/{_safe(ref.path or '')}"
    if ref.kind == "artifact":
        return f"uris/{hashlib.sha256(ref.uri.encode()).hexdigest()[:24]}"
    return None


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


class DownloadCache:
    """One tracking server's cached models, as seen for one MODEL_URI (`ref`)."""

    def __init__(self, root: Path, ref: ModelRef, tracking_uri: str, keep: int) -> None:
        self.root = root
        self.ref = ref
        self.tracking_uri = tracking_uri
        self.keep = keep

    def load(
        self, key: str, from_cache: bool = True, fingerprint: str | None = None
    ) -> MlflowArtifact | None:
        """The entry `key` as an artifact; None when missing, damaged or no longer current."""
        folder = self.root / key
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
        return self.root / "last-good" / f"{digest}.json"

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
        artifact = self.load(pointer["key"])
        if artifact is not None:
            log.info("last good model for %s: %s (since %s)", self.ref.uri, artifact.source,
                     pointer.get("recorded_at"))
        return artifact

    def prune(self, keep: set[str]) -> None:
        """Delete cached versions beyond the newest `self.keep` (keeping `keep`)."""
        try:
            pointers = [
                json.loads(path.read_text())["key"]
                for path in (self.root / "last-good").glob("*.json")
            ]
        except (OSError, ValueError, KeyError):
            return  # never delete on a doubtful picture
        protected = keep | set(pointers)
        entries = sorted(
            self.root.rglob(ENTRY_FILE), key=lambda path: path.stat().st_mtime, reverse=True
        )
        others = [path.parent for path in entries
                  if str(path.parent.relative_to(self.root)) not in protected]
        for folder in others[self.keep:]:
            log.info("removing cached model %s", folder)
            shutil.rmtree(folder, ignore_errors=True)

    def remove_partials(self) -> None:
        """Leftovers of downloads a crash interrupted (older than an hour: not in progress)."""
        if not self.root.is_dir():
            return
        cutoff = time.time() - 3600
        for path in self.root.glob(f"{PARTIAL_PREFIX}*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
