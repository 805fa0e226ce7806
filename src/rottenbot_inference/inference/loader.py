"""Turns a model source into a ready ModelBundle.

Sources resolve to a local artifact (a `.keras` file, an `.onnx` file or an MLflow model
directory); Keras models are converted to ONNX once, verified against Keras, and cached by
content hash so that later starts neither convert again nor import TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml

from rottenbot_inference.inference import runtime_select
from rottenbot_inference.inference.bundle import ModelBundle
from rottenbot_inference.inference.runtime import KerasRuntime, Runtime
from rottenbot_inference.settings import Settings

log = logging.getLogger(__name__)

CLASSES_FILE = "index_to_class.json"
# Bump when the conversion itself changes, so cached graphs are rebuilt.
CONVERSION_TAG = "tf2onnx-opset17-v1"
BUNDLED_CACHE_NAME = "onnx-cache"


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded."""


@dataclass(frozen=True)
class LocalArtifact:
    """A model that is on local disk, with where it came from."""

    path: Path  # .keras, .onnx or MLflow model directory
    source: str
    name: str
    version: str | None = None  # None: derived from the content hash
    classes_path: Path | None = None


@dataclass(frozen=True)
class ConversionOutcome:
    """What `ModelLoader.convert` did to get a Keras model's ONNX conversion into the cache."""

    action: Literal["cached", "copied", "converted"]
    onnx_path: Path  # the conversion, in the loader's cache folder
    found_at: Path | None = None  # "copied": the existing conversion that was reused

    def describe(self, model: Path) -> str:
        if self.action == "cached":
            return f"{model}: already converted, found in {self.onnx_path}; nothing written"
        if self.action == "copied":
            return (
                f"{model}: already converted, found in {self.found_at}; "
                f"copied to {self.onnx_path}"
            )
        return f"{model}: converted to ONNX, verified against Keras and written to {self.onnx_path}"


class ModelSource(Protocol):
    def fetch(self) -> LocalArtifact: ...


@dataclass(frozen=True)
class LocalSource:
    path: Path
    classes_path: Path | None = None

    def fetch(self) -> LocalArtifact:
        path = self.path.expanduser()
        if not path.exists():
            raise ModelLoadError(f"model path {path} does not exist")
        name = path.stem if path.is_file() else path.name
        return LocalArtifact(
            path=path, source=f"local:{path}", name=name, classes_path=self.classes_path
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_file(path: Path) -> Path:
    """The `.keras` or `.onnx` file behind a path (a file, or an MLflow model directory)."""
    if path.is_file():
        if path.suffix not in (".keras", ".onnx"):
            raise ModelLoadError(f"{path}: expected a .keras or .onnx file")
        return path
    mlmodel = path / "MLmodel"
    if mlmodel.is_file():
        flavors: dict[str, Any] = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
        if "onnx" in flavors and "data" in flavors["onnx"]:
            return path / flavors["onnx"]["data"]
        for candidate in ("data/model.keras", "data/model/model.keras", "model.keras"):
            if (path / candidate).is_file():
                return path / candidate
        raise ModelLoadError(
            f"{path}: MLmodel has no ONNX or Keras (.keras) model data (flavors: "
            f"{', '.join(flavors) or 'none'}); SavedModel and .h5 layouts are not supported: "
            "log the model in Keras format (data/model.keras) or as ONNX"
        )
    for candidate in ("model.onnx", "model.keras"):
        if (path / candidate).is_file():
            return path / candidate
    raise ModelLoadError(f"{path}: no MLmodel, model.keras or model.onnx inside")


def load_class_names(artifact: LocalArtifact) -> tuple[str, ...]:
    """Class names by index from index_to_class.json (explicit, or found beside the model)."""
    if artifact.classes_path is not None:
        candidates = [artifact.classes_path]
    else:
        folder = artifact.path if artifact.path.is_dir() else artifact.path.parent
        candidates = [folder / CLASSES_FILE, folder / "artifacts" / CLASSES_FILE]
        candidates.append(folder.parent / CLASSES_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return parse_class_map(json.loads(candidate.read_text()), candidate)
    raise ModelLoadError(f"no {CLASSES_FILE} found (looked at {', '.join(map(str, candidates))})")


def parse_class_map(raw: Any, origin: Path | str) -> tuple[str, ...]:
    """`{"0": "Apple__Healthy", ...}` (or a plain list) -> names ordered by index."""
    if isinstance(raw, list) and all(isinstance(name, str) for name in raw):
        return tuple(raw)
    if not isinstance(raw, dict) or not raw:
        raise ModelLoadError(f"{origin}: expected an index -> class name mapping")
    try:
        by_index = {int(key): str(value) for key, value in raw.items()}
    except ValueError as exc:
        raise ModelLoadError(f"{origin}: keys must be class indices") from exc
    if sorted(by_index) != list(range(len(by_index))):
        raise ModelLoadError(f"{origin}: class indices must be 0..{len(by_index) - 1}")
    return tuple(by_index[index] for index in range(len(by_index)))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(handle.name, path)


class ModelLoader:
    """Builds bundles from sources following the runtime and cache settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.threads = settings.effective_inference_threads

    def load(self, source: ModelSource) -> ModelBundle:
        artifact = source.fetch()
        path = model_file(artifact.path)
        class_names = load_class_names(artifact)
        content_hash = _sha256(path)
        version = artifact.version or content_hash[:12]
        runtime, notes = self._runtime_for(path, content_hash)
        bundle = ModelBundle(
            name=artifact.name,
            version=version,
            source=artifact.source,
            runtime=runtime,
            class_names=class_names,
            notes=tuple(notes),
        )
        probe = bundle.predict(_zeros(bundle.input_shape))  # also checks the class count
        log.info(
            "model %s version %s loaded from %s with %s (%d classes, output %s)",
            bundle.name,
            bundle.version,
            bundle.source,
            runtime.name,
            len(class_names),
            probe.shape,
        )
        return bundle

    def needs_conversion(self, path: Path) -> bool:
        """True for a Keras model file whose ONNX conversion is not cached yet."""
        if path.suffix != ".keras" or self.settings.model_runtime == "keras":
            return False
        entry = self._cache_entry(_sha256(path))
        folders = (self.settings.cache_dir, path.parent / BUNDLED_CACHE_NAME)
        return not any((folder / entry).is_file() for folder in folders)

    def convert(self, path: Path) -> ConversionOutcome:
        """Put the ONNX conversion of a Keras model file into the cache folder now.

        Already there: nothing is written. Found in the other place the loader looks (the
        bundled cache beside the model): copied, without TensorFlow. Otherwise converted.
        """
        if path.suffix != ".keras":
            raise ModelLoadError(f"{path}: only a .keras model can be converted")
        content_hash = _sha256(path)
        entry = self._cache_entry(content_hash)
        target = self.settings.cache_dir / entry
        if target.is_file():
            return ConversionOutcome("cached", target)
        beside = path.parent / BUNDLED_CACHE_NAME / entry
        if beside.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as handle:
                shutil.copyfile(beside, handle.name)
            os.chmod(handle.name, 0o644)
            os.replace(handle.name, target)
            log.info("copied the conversion of %s from %s to %s", path.name, beside, target)
            return ConversionOutcome("copied", target, found_at=beside)
        _, notes = self._convert(path, content_hash)
        if not target.is_file():
            raise ModelLoadError(f"{path}: no conversion was written ({'; '.join(notes)})")
        return ConversionOutcome("converted", target)

    # -- runtimes ------------------------------------------------------------------------

    def _runtime_for(self, path: Path, content_hash: str) -> tuple[Runtime, list[str]]:
        if path.suffix == ".onnx":
            return self._serving_runtime(path)
        if self.settings.model_runtime == "keras":
            return self._keras_runtime(path), ["Keras runtime selected by MODEL_RUNTIME"]
        cached = self._cached_onnx(path, content_hash)
        if cached is not None:
            return self._serving_runtime(cached)
        return self._convert(path, content_hash)

    def _serving_runtime(self, onnx: Path) -> tuple[Runtime, list[str]]:
        """ONNX Runtime or OpenVINO for a verified ONNX model (MODEL_RUNTIME, MODEL_PRECISION)."""
        selected = runtime_select.build_runtime(self.settings, onnx, self.threads)
        return selected.runtime, list(selected.notes)

    def _cache_entry(self, content_hash: str) -> str:
        return f"{content_hash}-{CONVERSION_TAG}.onnx"

    def _cached_onnx(self, path: Path, content_hash: str) -> Path | None:
        entry = self._cache_entry(content_hash)
        for folder in (self.settings.cache_dir, path.parent / BUNDLED_CACHE_NAME):
            if (folder / entry).is_file():
                log.info("using converted model from cache %s", folder / entry)
                return folder / entry
        return None

    def _convert(self, path: Path, content_hash: str) -> tuple[Runtime, list[str]]:
        try:
            from rottenbot_inference.inference import conversion
        except ImportError as exc:  # pragma: no cover - depends on installed extras
            raise ModelLoadError(
                f"{path} must be converted to ONNX, which needs TensorFlow: "
                "pip install 'rottenbot-inference[keras]'"
            ) from exc
        conversion.configure_tensorflow(self.threads)
        model = conversion.load_keras_float32(path)
        try:
            result = conversion.convert_and_verify(model, self.threads)
        except Exception as exc:
            reason = f"ONNX conversion failed ({type(exc).__name__}: {exc})"
        else:
            if result.max_abs_diff <= self.settings.verify_tolerance:
                target = self.settings.cache_dir / self._cache_entry(content_hash)
                _write_atomically(target, result.onnx_bytes)
                log.info(
                    "converted %s to ONNX: %d nodes, %d Transpose, max abs diff %.2e; cached at %s",
                    path.name,
                    result.node_count,
                    result.transpose_count,
                    result.max_abs_diff,
                    target,
                )
                return self._serving_runtime(target)
            reason = (
                f"ONNX output differs from Keras by {result.max_abs_diff:.2e} "
                f"(> {self.settings.verify_tolerance:.0e})"
            )
        if not self.settings.keras_fallback:
            raise ModelLoadError(f"{path}: {reason}")
        log.error("%s; FALLING BACK TO THE SLOW KERAS RUNTIME for %s", reason, path)
        return KerasRuntime(model, self.threads), [f"Keras fallback: {reason}"]

    def _keras_runtime(self, path: Path) -> Runtime:
        from rottenbot_inference.inference import conversion

        conversion.configure_tensorflow(self.threads)
        return KerasRuntime(conversion.load_keras_float32(path), self.threads)


def _zeros(shape: tuple[int, int, int]) -> Any:
    import numpy as np

    return np.zeros((1, *shape), dtype=np.float32)


def source_from_settings(settings: Settings) -> ModelSource:
    """The model source the settings name: MODEL_PATH, or MLflow when USE_LOCAL=false (or when
    USE_LOCAL is not set and MODEL_URI is an MLflow URI such as `models:/rottenbot@champion`)."""
    from rottenbot_inference.inference import mlflow_source

    if mlflow_source.wants_mlflow(settings):
        return mlflow_source.MlflowSource(settings)
    return LocalSource(settings.model_path, settings.classes_path)
