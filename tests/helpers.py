"""Test helpers: tiny models, images, tokens, servers on loopback."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from PIL import Image

from rottenbot_inference.auth.tokens import mint_token
from rottenbot_inference.settings import DEV_JWT_SECRET

CLASS_COUNT = 28
TEST_SECRET = "test-secret-" + "x" * 32


def class_map(count: int = CLASS_COUNT) -> dict[str, str]:
    return {str(index): f"Class{index:02d}__{'Rotten' if index % 2 else 'Healthy'}"
            for index in range(count)}


def build_tiny_keras(
    folder: Path, mixed: bool = True, seed: int = 0, classes: int = CLASS_COUNT
) -> Path:
    """A small Keras image model with the production I/O contract (224x224x3 -> 28 softmax).

    It uses hard-swish (the op that trips tf2onnx's transpose optimizer) and, by default,
    the mixed_float16 policy RottenBot's model was trained with.
    """
    import keras

    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        inputs = keras.Input((224, 224, 3))
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.AveragePooling2D(4)(x)
        x = keras.layers.Conv2D(16, 3, strides=2, activation="hard_swish")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.DepthwiseConv2D(3, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(classes, activation="softmax", dtype="float32")(x)
        model = keras.Model(inputs, outputs)
        # Non-trivial outputs: a random dense layer spread over inputs gives varied classes.
        dense = model.layers[-1]
        kernel, bias = dense.get_weights()
        dense.set_weights([np.random.default_rng(seed).normal(0, 3, kernel.shape), bias])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    path = folder / "model.keras"
    model.save(path)
    (folder / "index_to_class.json").write_text(json.dumps(class_map(classes)))
    return path


def jpeg_bytes(pixels: np.ndarray, quality: int = 90, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, **save)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def random_photo(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """Smooth random colours (JPEG-friendly, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def token(user: uuid.UUID | None = None, secret: str = TEST_SECRET, **kwargs: object) -> str:
    return mint_token(secret, "HS256", user or uuid.uuid4(), **kwargs)  # type: ignore[arg-type]


def auth(user: uuid.UUID | None = None, secret: str = TEST_SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, secret)}"}


def process_env(model: Path, cache: Path, data_dir: Path) -> dict[str, str]:
    """The settings every test service process shares: its model (conversion cached in
    `cache`, shared between tests), its own data folder and the tests' JWT secret."""
    return {
        "MODEL_PATH": str(model),
        "MODEL_CACHE_DIR": str(cache),
        "DATA_DIR": str(data_dir),
        "JWT_SECRET": TEST_SECRET,
    }


def in_ci() -> bool:
    """CI=true (or 1/yes): what the test extra provides must be there; nothing skips."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_import(module: str, reason: str) -> ModuleType:
    """`pytest.importorskip` that fails under CI=true instead of skipping (like the guards
    for redis-server, PostgreSQL and the deployment tools)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{reason} ({type(exc).__name__}: {exc})"
        if in_ci():
            pytest.fail(f"{message}; CI=true requires it", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base_url: str, timeout_s: float = 300, process: subprocess.Popen | None = None,
               client: object | None = None) -> None:
    """Poll /health/ready until 200 (a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            getter = client.get if client is not None else httpx.get  # type: ignore[attr-defined]
            if getter(f"{base_url}/health/ready").status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError("service did not become ready")


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`rottenbot-inference serve` in a subprocess on a free loopback port."""
    port = free_port()
    full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), **env}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "rottenbot_inference", "serve"],
            env=full_env, stdout=log, stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base_url, process=process)
            yield base_url
        finally:
            stop_process(process)


__all__ = ["DEV_JWT_SECRET"]
