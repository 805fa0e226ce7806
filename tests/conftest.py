from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rottenbot_inference.app import create_app
from rottenbot_inference.settings import Settings
from tests.helpers import TEST_SECRET, build_tiny_keras, wait_ready

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite's reference runtime is fp32 ONNX Runtime (here and in every service process a test
# starts): the Keras parity checks compare at 1e-4, which bf16 cannot meet. OpenVINO and the
# runtime selection are tested where MODEL_RUNTIME is set explicitly (test_runtime_select.py).
os.environ.setdefault("MODEL_RUNTIME", "onnxruntime")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small mixed_float16 Keras model file with its index_to_class.json beside it."""
    return build_tiny_keras(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def converted_tiny_model(tiny_model: Path, shared_cache: Path, tmp_path_factory) -> Path:
    """`tiny_model` with its verified ONNX conversion already in `shared_cache`: service
    processes a test starts (MODEL_CACHE_DIR=shared_cache) load it without converting it."""
    from rottenbot_inference.inference.loader import ModelLoader, source_from_settings

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        model_path=tiny_model,
        model_cache_dir=shared_cache,
        data_dir=tmp_path_factory.mktemp("convert"),
    )
    ModelLoader(settings).load(source_from_settings(settings))
    return tiny_model


@pytest.fixture
def make_settings(tmp_path: Path, tiny_model: Path, shared_cache: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "model_path": tiny_model,
            "data_dir": tmp_path / "data",
            "model_cache_dir": shared_cache,
            "jwt_secret": TEST_SECRET,
            "max_batch_size": 4,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def make_client(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """In-process clients (lifespan run, model loaded and warmed) for given settings."""
    clients: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        wait_ready("", client=client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()
