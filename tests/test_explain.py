"""Explanation heatmaps through the API: contract, errors, PNG overlay, saved predictions,
shedding under load, metrics, and one run through a real server process."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from rottenbot_inference.demo.synthetic import CLASS_NAMES, render
from rottenbot_inference.inference.batcher import Batcher
from rottenbot_inference.settings import BUNDLED_MODEL_DIR
from tests.helpers import TEST_SECRET, auth, jpeg_bytes, running_server

EXPLAIN = "/api/v1/inference/explain"
PREDICT = "/api/v1/inference/predict"
BANANA_ROTTEN = CLASS_NAMES.index("Banana__Rotten")


def _photo(width: int = 320, height: int = 240, class_index: int = BANANA_ROTTEN) -> bytes:
    rng = np.random.default_rng([31, class_index])
    return jpeg_bytes(render(class_index, rng, (height, width)))


def _file(data: bytes, content_type: str = "image/jpeg") -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("photo.jpg", data, content_type)}


@pytest.fixture
def demo(make_client: Callable[..., TestClient]) -> Callable[..., TestClient]:
    """In-process clients serving the bundled demo model."""

    def make(**overrides: object) -> TestClient:
        return make_client(model_path=BUNDLED_MODEL_DIR, **overrides)

    return make


def _decode_png(body: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_explain_answers_the_prediction_and_a_heatmap(demo) -> None:
    client = demo(explain_grid=5)
    photo = _photo()
    predicted = client.post(PREDICT, files=_file(photo), headers=auth()).json()
    response = client.post(EXPLAIN, files=_file(photo), headers=auth())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predicted_class_name"] == predicted["predicted_class_name"]
    assert body["confidence"] == pytest.approx(predicted["confidence"], abs=1e-4)
    assert body["class_name"] == body["predicted_class_name"]  # default: the top class
    assert body["versus"] == body["class_name"].replace("Rotten", "Healthy")  # its counterpart
    assert body["method"] == "occlusion"
    assert (body["rows"], body["cols"], body["passes"]) == (5, 5, 26)
    grid = np.array(body["grid"])
    assert grid.shape == (5, 5)
    assert np.isfinite(grid).all() and grid.max() > 0  # hiding something lowered the class


def test_explain_a_chosen_class(demo) -> None:
    client = demo(explain_grid=3)
    response = client.post(
        EXPLAIN, params={"class_name": "Apple__Healthy"}, files=_file(_photo()), headers=auth()
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["class_name"] == "Apple__Healthy"
    assert body["versus"] == "Apple__Rotten"
    assert body["class_confidence"] < body["confidence"]
    alone = client.post(
        EXPLAIN, params={"class_name": "Apple__Healthy", "versus": "none"}, files=_file(_photo()),
        headers=auth(),
    ).json()
    assert alone["versus"] is None
    assert alone["grid"] != body["grid"]


@pytest.mark.parametrize(
    ("params", "files", "headers", "status"),
    [
        ({"class_name": "Durian__Rotten"}, "photo", "auth", 422),
        ({"versus": "Durian__Healthy"}, "photo", "auth", 422),
        ({"format": "gif"}, "photo", "auth", 422),
        ({"top_k": "3"}, "photo", "auth", 422),  # not a parameter of /explain
        ({}, "text", "auth", 400),
        ({}, "corrupt", "auth", 400),
        ({}, "photo", None, 401),
    ],
)
def test_explain_refuses_bad_requests_with_4xx(demo, params, files, headers, status) -> None:
    client = demo(explain_grid=2)
    payload = {
        "photo": _file(_photo()),
        "text": _file(b"hello", "text/plain"),
        "corrupt": _file(b"\xff\xd8\xff" + b"\x00" * 64),
    }[files]
    response = client.post(
        EXPLAIN, params=params, files=payload, headers=auth() if headers else {}
    )
    assert response.status_code == status, response.text
    assert "detail" in response.json()


def test_explain_upload_over_the_limit_is_413(demo) -> None:
    client = demo(explain_grid=2, max_upload_bytes=1000)
    response = client.post(EXPLAIN, files=_file(_photo()), headers=auth())
    assert response.status_code == 413


@pytest.mark.parametrize("how", ["query", "accept"])
def test_explain_png_overlay_keeps_the_upload_aspect_ratio(demo, how) -> None:
    client = demo(explain_grid=4)
    kwargs: dict[str, object] = (
        {"params": {"format": "png"}, "headers": auth()}
        if how == "query"
        else {"headers": {**auth(), "Accept": "image/png"}}
    )
    response = client.post(EXPLAIN, files=_file(_photo(640, 480)), **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-explained-class"] in CLASS_NAMES
    image = _decode_png(response.content)
    assert image.shape == (336, 448, 3)  # 640x480 -> longer side 448


def test_saved_prediction_explanation_is_owner_only(demo) -> None:
    client = demo(explain_grid=3)
    owner = uuid.uuid4()
    saved = client.post(
        PREDICT, params={"save_prediction": "true"}, files=_file(_photo()), headers=auth(owner)
    )
    assert saved.status_code == 200, saved.text
    uid = saved.json()["prediction_uid"]
    url = f"/api/v1/inference/predictions/{uid}/explanation.png"
    response = client.get(url, headers=auth(owner))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-explained-class"] == saved.json()["predicted_class_name"]
    assert _decode_png(response.content).shape == (336, 448, 3)  # the 320x240 upload
    assert client.get(url, headers=auth(uuid.uuid4())).status_code == 404  # another user
    missing = f"/api/v1/inference/predictions/{uuid.uuid4()}/explanation.png"
    assert client.get(missing, headers=auth(owner)).status_code == 404
    assert client.get(url).status_code == 401


def test_explanations_are_shed_while_predictions_are_busy(demo) -> None:
    client = demo(explain_grid=2, explain_shed_at=3)
    state = client.app.state.rottenbot  # type: ignore[attr-defined]
    state.service.pace.active = 3  # three predict images being decoded, queued or computed
    try:
        refused = client.post(EXPLAIN, files=_file(_photo()), headers=auth())
        predicted = client.post(PREDICT, files=_file(_photo()), headers=auth())
    finally:
        state.service.pace.active = 0
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "busy with predictions" in refused.json()["detail"]
    assert predicted.status_code == 200  # predictions are still admitted
    assert client.post(EXPLAIN, files=_file(_photo()), headers=auth()).status_code == 200
    metrics = client.get("/metrics").text
    assert 'inference_rejected_requests_total{reason="explain_shed"' in metrics
    assert 'inference_explanations_total{outcome="shed"' in metrics
    assert 'inference_explanations_total{outcome="ok"' in metrics
    assert "inference_explanation_duration_milliseconds_bucket" in metrics


def test_explanations_over_their_concurrency_cap_get_503(demo) -> None:
    client = demo(explain_grid=2, explain_max_concurrent=2)
    explainer = client.app.state.rottenbot.explainer  # type: ignore[attr-defined]
    explainer.active = 2  # two explanations admitted and running
    try:
        refused = client.post(EXPLAIN, files=_file(_photo()), headers=auth())
    finally:
        explainer.active = 0
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "Too many explanations" in refused.json()["detail"]
    assert 'reason="explain_busy"' in client.get("/metrics").text


def test_explanation_stands_aside_while_predictions_are_queued(demo, monkeypatch) -> None:
    """With a prediction always waiting, an explanation never runs its model passes: it gives
    up at its deadline with 503, and a prediction sent meanwhile is answered."""
    client = demo(explain_grid=2, explain_timeout_s=0.5)
    monkeypatch.setattr(Batcher, "queued", property(lambda self: 1))
    response = client.post(EXPLAIN, files=_file(_photo()), headers=auth())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    monkeypatch.undo()
    assert client.post(PREDICT, files=_file(_photo()), headers=auth()).status_code == 200
    metrics = client.get("/metrics").text
    assert 'inference_explanations_total{outcome="deadline"' in metrics
    assert 'reason="explain_deadline"' in metrics


def test_explain_through_a_real_server(tmp_path) -> None:
    env = {"DATA_DIR": str(tmp_path / "data"), "JWT_SECRET": TEST_SECRET, "EXPLAIN_GRID": "4"}
    with (
        running_server(env, tmp_path / "server.log") as base_url,
        httpx.Client(base_url=base_url, timeout=60) as client,
    ):
        photo = _photo(400, 300)
        body = client.post(EXPLAIN, files=_file(photo), headers=auth()).json()
        assert (body["rows"], body["cols"], len(body["grid"])) == (4, 4, 4)
        png = client.post(EXPLAIN, params={"format": "png"}, files=_file(photo), headers=auth())
        assert png.status_code == 200
        assert _decode_png(png.content).shape == (336, 448, 3)
        metrics = client.get("/metrics").text
        assert 'inference_explanations_total{outcome="ok"' in metrics
