"""Runtime and precision selection (MODEL_RUNTIME, MODEL_PRECISION), the agreement check with
real OpenVINO computing, the loud fallbacks to ONNX Runtime, and OpenVINO behind a real server.

Small ONNX models (8x8x3 inputs) keep the compiles short."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from rottenbot_inference.inference import runtime_select
from rottenbot_inference.inference.runtime import OnnxRuntime
from rottenbot_inference.settings import Settings
from tests.helpers import (
    auth,
    jpeg_bytes,
    process_env,
    random_photo,
    require_import,
    running_server,
)

require_import("openvino", "OpenVINO (a runtime dependency) is not importable")
onnx = require_import("onnx", "onnx (the keras extra) builds the test models")

SHAPE = (8, 8, 3)


def _matmul_model(path: Path, weights: np.ndarray) -> Path:
    """NHWC image -> flatten -> MatMul(weights) -> softmax."""
    from onnx import TensorProto, helper, numpy_helper

    inputs = int(np.prod(SHAPE))
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["y"], axis=1),
        ],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *SHAPE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weights.shape[1]])],
        [
            numpy_helper.from_array(np.array([-1, inputs], np.int64), "shape"),
            numpy_helper.from_array(weights.astype(np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    inputs = int(np.prod(SHAPE))
    plain = np.random.default_rng(0).normal(0, 0.003, (inputs, 4))
    # Two classes whose weights differ by 2^-12 (relative): fp32 ranks class 1 first on every
    # (positive) image; bf16 (8 significant bits) rounds both columns to the same weights.
    tied = np.full((inputs, 2), 0.01)
    tied[:, 1] *= 1 + 2.0**-12
    return {
        "plain": _matmul_model(folder / "plain.onnx", plain),
        "tied": _matmul_model(folder / "tied.onnx", tied),
    }


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "model_cache_dir": tmp_path / "cache",
        "model_runtime": "auto",
        "inference_workers": 1,
        "max_batch_size": 4,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def _native(monkeypatch: pytest.MonkeyPatch, value: bool) -> None:
    monkeypatch.setattr(runtime_select, "native_bf16", lambda capabilities=(): value)


def _probe() -> np.ndarray:
    return runtime_select.probe_images(SHAPE)


@pytest.mark.parametrize("native", [True, False], ids=["bf16-cpu", "fp32-cpu"])
def test_auto_asks_for_bf16_only_on_a_bf16_cpu(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    _native(monkeypatch, native)
    selected = runtime_select.build_runtime(_settings(tmp_path), models["plain"], threads=1)
    runtime = selected.runtime
    assert runtime.name == "openvino"
    assert runtime.requested_precision == ("bf16" if native else "fp32")  # type: ignore[attr-defined]
    described = runtime.describe()
    assert described["precision"] == runtime.precision
    assert described["agreement"]["passed"] and described["native_bf16"] is native
    # What it serves agrees with fp32 ONNX Runtime, at every batch size the batcher uses.
    reference = OnnxRuntime(models["plain"], threads=1)
    for size in (1, 3, 4, 7):
        batch = _probe()[:size]
        got, expected = runtime.run(batch), reference.run(batch)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 0.05
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_forced_fp32_and_forced_onnxruntime(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _native(monkeypatch, True)
    fp32 = runtime_select.build_runtime(
        _settings(tmp_path, model_precision="fp32"), models["plain"], threads=1
    ).runtime
    assert (fp32.name, fp32.precision) == ("openvino", "fp32")

    def no_openvino() -> None:
        raise AssertionError("MODEL_RUNTIME=onnxruntime must not load OpenVINO")

    monkeypatch.setattr(runtime_select, "_load_openvino", no_openvino)
    selected = runtime_select.build_runtime(
        _settings(tmp_path, model_runtime="onnxruntime"), models["plain"], threads=1
    )
    assert (selected.runtime.name, selected.runtime.precision) == ("onnxruntime", "fp32")
    assert selected.notes == ()


def test_bf16_is_refused_without_openvino(tmp_path: Path) -> None:
    for runtime in ("onnxruntime", "keras"):
        with pytest.raises(ValidationError, match="MODEL_PRECISION=bf16 needs"):
            _settings(tmp_path, model_runtime=runtime, model_precision="bf16")


def test_missing_openvino_falls_back_loudly(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    def missing() -> None:
        raise ImportError("No module named 'openvino'")

    monkeypatch.setattr(runtime_select, "_load_openvino", missing)
    caplog.set_level(logging.WARNING, logger=runtime_select.__name__)
    selected = runtime_select.build_runtime(
        _settings(tmp_path, model_runtime="openvino"), models["plain"], threads=1
    )
    assert selected.runtime.name == "onnxruntime"
    assert any("OpenVINO is not importable" in note for note in selected.notes)
    assert "not importable" in selected.runtime.describe()["fallback"]
    assert "FALLING BACK TO ONNX RUNTIME" in caplog.text


def test_a_failed_compile_falls_back_loudly(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    from rottenbot_inference.inference import openvino_runtime

    core = openvino_runtime.core()

    class Failing:
        def __getattr__(self, name: str) -> Any:
            return getattr(core, name)

        def compile_model(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("Exception from src/plugins/intel_cpu: unsupported operation")

    monkeypatch.setattr(openvino_runtime, "core", Failing)
    caplog.set_level(logging.WARNING, logger=runtime_select.__name__)
    selected = runtime_select.build_runtime(_settings(tmp_path), models["plain"], threads=1)
    assert selected.runtime.name == "onnxruntime"
    assert any("unsupported operation" in note for note in selected.notes)
    assert "FALLING BACK TO ONNX RUNTIME" in caplog.text
    probe = _probe()
    assert selected.runtime.run(probe).shape == (8, 4)


def test_agreement_check_refuses_openvino_beyond_the_tolerance(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real OpenVINO computes; its outputs differ from ONNX Runtime's by rounding only (< 1e-6),
    yet more than the tolerance asked for here: bf16 is refused, then fp32, then it falls back.
    """
    _native(monkeypatch, True)
    settings = _settings(tmp_path, model_agreement_tolerance=1e-15)
    selected = runtime_select.build_runtime(settings, models["tied"], threads=1)
    assert selected.runtime.name == "onnxruntime"
    assert selected.notes[0].startswith("bf16 refused: OpenVINO bf16 disagrees")
    assert "ONNX Runtime fallback: OpenVINO fp32 disagrees" in selected.notes[-1]


def test_tied_logits_refuse_real_bf16(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the CPU computes bf16, rounding ties the two logits and flips top-1: bf16 is
    refused and OpenVINO fp32 serves. Elsewhere OpenVINO compiles the bf16 request to fp32,
    which agrees, and says so."""
    from rottenbot_inference.inference import openvino_runtime

    real_bf16 = runtime_select.native_bf16(openvino_runtime.cpu_capabilities())
    _native(monkeypatch, True)
    selected = runtime_select.build_runtime(_settings(tmp_path), models["tied"], threads=1)
    runtime = selected.runtime
    assert (runtime.name, runtime.precision) == ("openvino", "fp32")
    assert (runtime.run(_probe()).argmax(1) == 1).all()  # fp32 ranks class 1 first
    if real_bf16:
        assert selected.notes[0].startswith("bf16 refused: OpenVINO bf16 disagrees")
        assert "different top-1" in selected.notes[0]
    else:
        assert "no native bf16" in selected.notes[0]


def test_openvino_behind_a_real_server(
    converted_tiny_model: Path, shared_cache: Path, tmp_path: Path
) -> None:
    env = {
        **process_env(converted_tiny_model, shared_cache, tmp_path / "data"),
        "MODEL_RUNTIME": "openvino",
        "MAX_BATCH_SIZE": "4",
        "ADMIN_API_KEY": "runtime-select-admin-key",
    }
    photo = jpeg_bytes(random_photo())

    def predict(base_url: str) -> dict[str, Any]:
        response = httpx.post(
            f"{base_url}/api/v1/inference/predict?save_prediction=False",
            files={"file": ("a.jpg", photo, "image/jpeg")},
            headers=auth(),
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.json()

    with running_server(env, tmp_path / "server.log") as base_url:
        first = predict(base_url)
        # A hot swap builds, checks and installs another OpenVINO model beside the serving one.
        swapped = httpx.post(
            f"{base_url}/api/v1/admin/reload?reinstall=true",
            headers={"X-Admin-Key": env["ADMIN_API_KEY"]},
            timeout=120,
        )
        assert swapped.status_code == 200 and swapped.json()["outcome"] == "swapped"
        assert predict(base_url)["predicted_class"] == first["predicted_class"]
        info = httpx.get(f"{base_url}/api/v1/inference/model", headers=auth(), timeout=30).json()
        metrics = httpx.get(f"{base_url}/metrics", timeout=30).text
    runtime = info["runtime"]
    assert runtime["name"] == "openvino" and runtime["agreement"]["passed"]
    assert runtime["precision"] in ("fp32", "bf16") and runtime["fallback"] is None
    assert runtime["batch_shapes"] == [1]
    assert info["reload"]["counts"]["swapped"] == 2  # the start and the admin reload
    line = next(row for row in metrics.splitlines() if row.startswith("inference_model_runtime"))
    assert 'runtime="openvino"' in line and f'precision="{runtime["precision"]}"' in line
