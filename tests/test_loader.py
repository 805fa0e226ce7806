"""Model sources, conversion to ONNX, the conversion cache and the Keras fallback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rottenbot_inference.inference import conversion
from rottenbot_inference.inference.loader import (
    LocalSource,
    ModelLoader,
    ModelLoadError,
    parse_class_map,
)
from tests.helpers import build_tiny_keras, class_map

REPO = Path(__file__).resolve().parents[1]


def test_mixed_float16_model_loads_as_float32(tiny_model: Path) -> None:
    model = conversion.load_keras_float32(tiny_model)
    policies = {layer.dtype_policy.name for layer in model.layers}
    assert policies == {"float32"}
    assert model.outputs[0].dtype == "float32"


def test_conversion_matches_keras_without_a_transpose_storm(tiny_model: Path) -> None:
    model = conversion.load_keras_float32(tiny_model)
    result = conversion.convert_and_verify(model, threads=1)
    assert result.max_abs_diff <= 1e-4
    assert result.transpose_count <= 1


def test_keras_load_converts_once_then_uses_the_cache(make_settings, tiny_model, tmp_path) -> None:
    settings = make_settings(model_cache_dir=tmp_path / "cache")
    bundle = ModelLoader(settings).load(LocalSource(tiny_model))
    assert bundle.runtime.name == "onnxruntime"
    cached = list((tmp_path / "cache").glob("*.onnx"))
    assert len(cached) == 1
    assert bundle.class_names == tuple(class_map().values())
    # A fresh process loads from the cache without importing TensorFlow.
    script = (
        "import sys; from pathlib import Path\n"
        "from rottenbot_inference.settings import Settings\n"
        "from rottenbot_inference.inference.loader import ModelLoader, LocalSource\n"
        f"s = Settings(_env_file=None, model_cache_dir=Path({str(tmp_path / 'cache')!r}))\n"
        f"b = ModelLoader(s).load(LocalSource(Path({str(tiny_model)!r})))\n"
        "print(b.runtime.name, 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["onnxruntime", "False"]


def test_mlflow_directory_and_onnx_file_sources(make_settings, tiny_model, tmp_path) -> None:
    mlflow_dir = tmp_path / "mlflow-model"
    (mlflow_dir / "data").mkdir(parents=True)
    shutil.copy(tiny_model, mlflow_dir / "data" / "model.keras")
    (mlflow_dir / "MLmodel").write_text(
        "flavors:\n  tensorflow:\n    data: data\n    model_type: keras\n    save_format: keras\n"
    )
    shutil.copy(tiny_model.parent / "index_to_class.json", mlflow_dir)
    settings = make_settings(model_cache_dir=tmp_path / "cache")  # holds only this conversion
    from_dir = ModelLoader(settings).load(LocalSource(mlflow_dir))
    assert from_dir.runtime.name == "onnxruntime"
    assert from_dir.name == "mlflow-model"

    onnx_path = tmp_path / "onnx" / "model.onnx"
    onnx_path.parent.mkdir()
    shutil.copy(next(settings.cache_dir.glob("*.onnx")), onnx_path)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(class_map()))
    from_onnx = ModelLoader(settings).load(LocalSource(onnx_path, classes_path=classes))
    probe = np.random.default_rng(0).uniform(0, 255, (3, 224, 224, 3)).astype(np.float32)
    assert np.allclose(from_dir.predict(probe), from_onnx.predict(probe), atol=1e-6)


def test_wrong_model_paths_are_clear_errors(make_settings, tiny_model, tmp_path) -> None:
    loader = ModelLoader(make_settings())
    with pytest.raises(ModelLoadError, match="does not exist"):
        loader.load(LocalSource(tmp_path / "nope.keras"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no MLmodel"):
        loader.load(LocalSource(tmp_path / "empty"))
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(tiny_model, lonely / "model.keras")
    with pytest.raises(ModelLoadError, match=r"index_to_class\.json"):
        loader.load(LocalSource(lonely / "model.keras"))
    three = tmp_path / "three.json"
    three.write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    with pytest.raises(RuntimeError, match="expected"):
        loader.load(LocalSource(tiny_model, classes_path=three))


@pytest.mark.parametrize(
    "raw", [{}, {"0": "a", "2": "b"}, {"x": "a"}, "text", [1, 2]], ids=str
)
def test_bad_class_maps_are_refused(raw) -> None:
    with pytest.raises(ModelLoadError):
        parse_class_map(raw, "test")


def test_class_map_order_follows_indices() -> None:
    raw = {str(i): f"c{i}" for i in reversed(range(12))}
    assert parse_class_map(raw, "test") == tuple(f"c{i}" for i in range(12))


def test_failed_conversion_falls_back_to_keras_loudly(
    make_client, monkeypatch, caplog, tmp_path
) -> None:
    def broken(_model):
        raise ValueError("max() arg is an empty sequence")

    monkeypatch.setattr(conversion, "convert", broken)
    client = make_client(
        model_cache_dir=tmp_path / "cold-cache", model_convert_isolated=False, model_runtime="auto"
    )
    from tests.helpers import auth

    info = client.get("/api/v1/inference/model", headers=auth()).json()
    assert info["runtime"]["name"] == "keras"
    assert any("ONNX conversion failed" in note for note in info["notes"])
    assert "FALLING BACK" in caplog.text
    assert not list((tmp_path / "cold-cache").glob("*.onnx"))


def test_disagreeing_conversion_falls_back_or_fails(make_settings, tiny_model, tmp_path) -> None:
    strict = make_settings(
        model_cache_dir=tmp_path / "c1", verify_tolerance=-1.0, model_runtime="auto"
    )
    bundle = ModelLoader(strict).load(LocalSource(tiny_model))
    assert bundle.runtime.name == "keras"
    assert "differs from Keras" in bundle.notes[0]
    onnx_only = make_settings(
        model_cache_dir=tmp_path / "c2", verify_tolerance=-1.0, model_runtime="onnxruntime"
    )
    with pytest.raises(ModelLoadError, match="differs"):
        ModelLoader(onnx_only).load(LocalSource(tiny_model))


def test_keras_runtime_can_be_forced(make_settings, tiny_model) -> None:
    bundle = ModelLoader(make_settings(model_runtime="keras")).load(LocalSource(tiny_model))
    assert bundle.runtime.name == "keras"
    onnx = ModelLoader(make_settings()).load(LocalSource(tiny_model))
    probe = np.random.default_rng(1).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    assert np.max(np.abs(bundle.predict(probe) - onnx.predict(probe))) <= 1e-4


def test_float32_model_converts_too(make_settings, tmp_path) -> None:
    path = build_tiny_keras(tmp_path / "f32", mixed=False, seed=3)
    bundle = ModelLoader(make_settings()).load(LocalSource(path))
    assert bundle.runtime.name == "onnxruntime"


@pytest.mark.slow
def test_production_architecture_converts_faithfully(tmp_path) -> None:
    """MobileNetV3Large-28 trained under mixed_float16: 1 Transpose, ~268 nodes, diff <= 1e-4."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from build_production_model import build, sample_photos
    finally:
        sys.path.pop(0)
    import onnx

    model_dir = build(tmp_path / "prod", calibrate=True)
    model = conversion.load_keras_float32(model_dir / "data" / "model.keras")
    result = conversion.convert_and_verify(model, threads=2)
    assert result.transpose_count <= 1, "the NHWC/NCHW Transpose storm is back"
    assert result.node_count <= 300
    assert result.max_abs_diff <= 1e-4
    # Agreement on real photographs too, and the outputs are not the flat 1/28.
    from rottenbot_inference.inference.runtime import OnnxRuntime

    photos = sample_photos(8)
    expected = np.asarray(model(photos, training=False))
    actual = OnnxRuntime(result.onnx_bytes, threads=2).run(photos)
    assert np.max(np.abs(expected - actual)) <= 1e-4
    assert expected.max() > 2 / 28
    ops = Counter(n.op_type for n in onnx.load_from_string(result.onnx_bytes).graph.node)
    assert ops["Conv"] >= 60
