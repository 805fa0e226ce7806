"""What a MODEL_URI means: its form checked up front, parsed into a ModelRef.

The accepted forms (`MLFLOW_TRACKING_URI` names the server):

    models:/<name>@<alias>       the version an alias points at (the reloader follows it)
    models:/<name>/<version>     one registered version
    models:/m-<id>               a logged model (MLflow 3)
    runs:/<run_id>/<path>        a model logged in a run
    mlflow-artifacts:/<path>     an artifact the server proxies (also s3://, gs://, http(s)://)

Nothing here talks to a server or imports MLflow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlparse

from rottenbot_inference.inference.loader import ModelLoadError
from rottenbot_inference.settings import Settings

MLFLOW_SCHEMES = ("models", "runs", "mlflow-artifacts")
ARTIFACT_SCHEMES = ("mlflow-artifacts", "s3", "gs", "wasbs", "abfss", "http", "https", "file")
URI_FORMS = (
    "models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id>, runs:/<run_id>/<path> "
    "or mlflow-artifacts:/<path>"
)
Kind = Literal["alias", "version", "logged", "run", "artifact"]


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
