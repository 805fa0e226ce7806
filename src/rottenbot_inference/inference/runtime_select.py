"""Which runtime serves a verified ONNX model: ONNX Runtime or OpenVINO, in fp32 or bf16.

- MODEL_RUNTIME=onnxruntime (or keras, for an .onnx file): ONNX Runtime, fp32.
- MODEL_RUNTIME=auto or openvino: OpenVINO. MODEL_PRECISION=auto asks for bf16 on a CPU with
  native bf16 (AMX or AVX512-BF16), fp32 elsewhere (OpenVINO fp32 measured faster than ONNX
  Runtime fp32 on both CPUs tried, see docs/models.md); fp32 or bf16 force one.
- Every OpenVINO model must agree with fp32 ONNX Runtime on the probe images before it serves:
  identical top-1 on every image and a max abs softmax difference within
  MODEL_AGREEMENT_TOLERANCE. A bf16 model that disagrees under MODEL_PRECISION=auto is refused
  and fp32 is tried; under MODEL_PRECISION=bf16 it serves, with a warning.
- Falls back to ONNX Runtime, loudly (a WARNING and a note in the model endpoint), when
  openvino is not importable, fails to compile or run the model, or disagrees in fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from rottenbot_inference.inference import runtime_metrics  # noqa: F401  (registers the gauge)
from rottenbot_inference.inference.runtime import OnnxRuntime, Runtime
from rottenbot_inference.settings import Settings

log = logging.getLogger(__name__)

PROBE_IMAGES = 8
PROBE_SEED = 15
_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@dataclass(frozen=True)
class Agreement:
    """How a candidate runtime's probabilities compare with fp32 ONNX Runtime's."""

    top1_identical: bool
    max_abs_diff: float
    tolerance: float
    images: int

    @property
    def ok(self) -> bool:
        return self.top1_identical and self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.ok,
            "top1_identical": self.top1_identical,
            "max_abs_diff": round(self.max_abs_diff, 6),
            "tolerance": self.tolerance,
            "images": self.images,
        }

    def describe(self) -> str:
        top1 = "identical top-1" if self.top1_identical else "a different top-1"
        return (
            f"{top1} on {self.images} probe images, max abs softmax difference "
            f"{self.max_abs_diff:.2g} (tolerance {self.tolerance:g})"
        )


def compare(candidate: np.ndarray, reference: np.ndarray, tolerance: float) -> Agreement:
    """Agreement of two (images, classes) probability arrays."""
    same = bool((candidate.argmax(axis=1) == reference.argmax(axis=1)).all())
    diff = float(np.abs(candidate - reference).max())
    return Agreement(same and bool(np.isfinite(diff)), diff, tolerance, int(reference.shape[0]))


def probe_images(shape: tuple[int, int, int]) -> np.ndarray:
    """The agreement check's deterministic probe images (smooth gradients + noise)."""
    from rottenbot_inference.inference.conversion import probe_batch

    return probe_batch(shape, size=PROBE_IMAGES, seed=PROBE_SEED)


def check_agreement(
    candidate: Runtime, reference: Runtime, probe: np.ndarray, tolerance: float
) -> Agreement:
    """Run the probe through both (as one batch, and its first image alone) and compare."""
    got = np.concatenate([candidate.run(probe), candidate.run(probe[:1])])
    expected = reference.run(probe)
    return compare(got, np.concatenate([expected, expected[:1]]), tolerance)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(capabilities: tuple[str, ...] = ()) -> bool:
    """Does this CPU compute bf16 natively (OpenVINO lists BF16, or AMX / AVX512-BF16 flags)?"""
    return "BF16" in capabilities or bool(cpu_flags() & _BF16_FLAGS)


def _load_openvino() -> ModuleType:
    """The OpenVINO runtime module (raises ImportError where openvino is not installed)."""
    from rottenbot_inference.inference import openvino_runtime

    return openvino_runtime


@dataclass(frozen=True)
class Selected:
    runtime: Runtime
    notes: tuple[str, ...] = ()


def build_runtime(settings: Settings, onnx: Path, threads: int) -> Selected:
    """The runtime that serves `onnx` under MODEL_RUNTIME / MODEL_PRECISION (module docstring)."""
    reference = OnnxRuntime(onnx, threads)
    reference.report = {"selected_by": f"MODEL_RUNTIME={settings.model_runtime}", "fallback": None}
    if settings.model_runtime not in ("auto", "openvino"):
        return Selected(reference)
    try:
        openvino = _load_openvino()
    except ImportError as exc:
        return _fall_back(reference, f"OpenVINO is not importable ({exc})")
    try:
        capabilities = openvino.cpu_capabilities()
    except Exception:  # the CPU plugin did not load: the compile below reports why
        capabilities = ()
    native = native_bf16(capabilities)
    wanted = settings.model_precision
    first = "bf16" if wanted == "bf16" or (wanted == "auto" and native) else "fp32"
    attempts = [first, "fp32"] if first == "bf16" and wanted == "auto" else [first]
    probe = probe_images(reference.input_shape)
    notes: list[str] = []
    reason = ""
    for precision in attempts:
        try:
            candidate = openvino.OpenVinoRuntime(
                onnx,
                threads=threads,
                workers=settings.effective_inference_workers,
                precision=precision,
                cache_dir=_ov_cache(settings),
            )
            agreement = check_agreement(
                candidate, reference, probe, settings.model_agreement_tolerance
            )
        except Exception as exc:
            reason = f"OpenVINO {precision} failed ({type(exc).__name__}: {exc})"
            log.warning("%s", reason)
            if precision != attempts[-1]:
                notes.append(reason)
            continue
        forced_bf16 = precision == "bf16" and wanted == "bf16"
        if agreement.ok or forced_bf16:
            if not agreement.ok:
                notes.append(
                    f"MODEL_PRECISION=bf16 serves a model that disagrees with fp32 "
                    f"ONNX Runtime: {agreement.describe()}"
                )
                log.warning("%s", notes[-1])
            if precision == "bf16" and candidate.precision != "bf16":
                notes.append(
                    "bf16 was asked for, but this CPU has no native bf16: OpenVINO "
                    f"computes in {candidate.precision}"
                )
                log.warning("%s", notes[-1])
            candidate.report = {
                "selected_by": f"MODEL_RUNTIME={settings.model_runtime}, MODEL_PRECISION={wanted}",
                "native_bf16": native,
                "agreement": agreement.as_dict(),
                "fallback": None,
            }
            log.info(
                "OpenVINO %s serves the model (%s; compiled in %.2f s)",
                candidate.precision,
                agreement.describe(),
                candidate.compile_s,
            )
            return Selected(candidate, tuple(notes))
        reason = f"OpenVINO {precision} disagrees with fp32 ONNX Runtime: {agreement.describe()}"
        if precision == "bf16":
            notes.append(f"bf16 refused: {reason}")
            log.warning("bf16 REFUSED: %s; trying fp32", reason)
    return _fall_back(reference, reason, notes)


def _fall_back(reference: OnnxRuntime, reason: str, notes: list[str] | None = None) -> Selected:
    log.warning("%s; FALLING BACK TO ONNX RUNTIME fp32", reason)
    reference.report = {**reference.report, "fallback": reason}
    return Selected(reference, (*(notes or []), f"ONNX Runtime fallback: {reason}"))


def _ov_cache(settings: Settings) -> Path | None:
    """OpenVINO's compiled-model cache (MODEL_CACHE_DIR/openvino), None where not writable."""
    folder = settings.cache_dir / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.info("no OpenVINO model cache (%s): every start compiles", exc)
        return None
    return folder
