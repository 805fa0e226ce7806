"""The bundled demo model: served on embedded defaults, accurate on a fresh held-out set."""

from __future__ import annotations

import subprocess
import sys

import cv2
import httpx
import pytest

from rottenbot_inference.demo.synthetic import CLASS_NAMES, make_dataset
from rottenbot_inference.settings import BUNDLED_MODEL_DIR
from tests.helpers import TEST_SECRET, auth, running_server

PREDICT = "/api/v1/inference/predict"
HELD_OUT_SEED = 20261129  # never used for training (training uses seed 0, its check seed 1)
PER_CLASS = 10


def test_bundled_conversion_is_used_without_tensorflow(tmp_path) -> None:
    """The ONNX graph shipped beside the demo model matches it: no conversion, no TensorFlow."""
    script = (
        "import sys; from pathlib import Path\n"
        "from rottenbot_inference.settings import Settings\n"
        "from rottenbot_inference.inference.loader import ModelLoader, source_from_settings\n"
        f"s = Settings(_env_file=None, data_dir=Path({str(tmp_path)!r}))\n"
        "b = ModelLoader(s).load(source_from_settings(s))\n"
        "print(b.runtime.name, len(b.class_names), 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["onnxruntime", "28", "False"]
    assert not (tmp_path / "model-cache").exists() or not any((tmp_path / "model-cache").iterdir())


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    env = {"DATA_DIR": str(folder / "data"), "JWT_SECRET": TEST_SECRET}
    with running_server(env, folder / "server.log") as base_url:
        yield base_url


def test_demo_model_is_served_by_default(demo_server: str) -> None:
    info = httpx.get(f"{demo_server}/api/v1/inference/model", headers=auth()).json()
    assert info["classes"] == list(CLASS_NAMES)
    assert info["source"] == f"local:{BUNDLED_MODEL_DIR}"
    assert info["runtime"]["name"] == "onnxruntime"


def test_demo_model_accuracy_through_the_api(demo_server: str) -> None:
    """Top-1 accuracy >= 90% on freshly generated pictures (another seed), sent as JPEG."""
    images, labels = make_dataset(PER_CLASS, seed=HELD_OUT_SEED)
    headers = auth()
    correct = 0
    with httpx.Client(base_url=demo_server, timeout=60) as client:
        for rgb, label in zip(images, labels, strict=True):
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            response = client.post(
                PREDICT, files={"file": ("p.jpg", jpeg.tobytes(), "image/jpeg")}, headers=headers
            )
            assert response.status_code == 200, response.text
            correct += response.json()["predicted_class"] == int(label)
    accuracy = correct / len(labels)
    print(f"demo model held-out accuracy through the API: {accuracy:.3f} ({len(labels)} images)")
    assert accuracy >= 0.90
