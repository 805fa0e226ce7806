"""The predict contract and the other endpoints, in-process."""

from __future__ import annotations

import re
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient

from rottenbot_inference.api.errors import PREDICTION_FAILED
from rottenbot_inference.api.limits import format_size
from tests.helpers import auth, class_map, jpeg_bytes, png_bytes, random_photo, token

PREDICT = "/api/v1/inference/predict"


def upload(data: bytes, content_type: str = "image/jpeg", name: str = "photo.jpg") -> dict:
    return {"file": (name, data, content_type)}


@pytest.fixture(scope="module")
def photo() -> bytes:
    return jpeg_bytes(random_photo())


def test_predict_returns_the_contract_fields(client: TestClient, photo: bytes) -> None:
    response = client.post(PREDICT, files=upload(photo), headers=auth())
    assert response.status_code == 200, response.text
    body = response.json()
    names = class_map()
    assert set(body) == {"predicted_class", "predicted_class_name", "confidence", "model_version"}
    assert body["predicted_class_name"] == names[str(body["predicted_class"])]
    assert 0.0 < body["confidence"] <= 1.0
    assert len(body["model_version"]) == 12


def test_frontend_style_query_is_accepted(client: TestClient, photo: bytes) -> None:
    user = uuid.uuid4()
    response = client.post(
        f"{PREDICT}?save_prediction=False&user_uid={user}",
        files=upload(photo, "image/jpg"),
        headers=auth(user),
    )
    assert response.status_code == 200, response.text


def test_user_uid_of_someone_else_is_forbidden(client: TestClient, photo: bytes) -> None:
    response = client.post(
        f"{PREDICT}?user_uid={uuid.uuid4()}", files=upload(photo), headers=auth(uuid.uuid4())
    )
    assert response.status_code == 403


def test_top_k_ranks_classes(client: TestClient, photo: bytes) -> None:
    response = client.post(f"{PREDICT}?top_k=5", files=upload(photo), headers=auth())
    assert response.status_code == 200
    body = response.json()
    ranked = body["top_k"]
    assert len(ranked) == 5
    assert ranked[0]["class"] == body["predicted_class"]
    assert ranked[0]["confidence"] == body["confidence"]
    confidences = [entry["confidence"] for entry in ranked]
    assert confidences == sorted(confidences, reverse=True)
    assert all(entry["class_name"] == class_map()[str(entry["class"])] for entry in ranked)


def test_same_image_same_answer_as_png(client: TestClient) -> None:
    from PIL import Image

    pixels = random_photo(224, 224, seed=3)
    as_png = client.post(
        f"{PREDICT}?top_k=28", files=upload(png_bytes(Image.fromarray(pixels)), "image/png"),
        headers=auth(),
    ).json()
    direct = client.app.state.rottenbot.service.bundle.predict(pixels[None].astype(np.float32))[0]
    by_class = {entry["class"]: entry["confidence"] for entry in as_png["top_k"]}
    assert np.allclose([by_class[i] for i in range(28)], direct, atol=1e-6)


def test_gif_declared_type_gets_the_contract_message(client: TestClient, photo: bytes) -> None:
    response = client.post(PREDICT, files=upload(photo, "image/gif", "a.gif"), headers=auth())
    assert response.status_code == 400
    assert response.json() == {
        "detail": "Invalid file type. Only JPEG, JPG, and PNG are supported. Got image/gif"
    }


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"GIF89a" + b"\x00" * 100, "not a JPEG or PNG"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "corrupt"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "corrupt"),
    ],
)
def test_bad_bytes_are_a_400(client: TestClient, data: bytes, fragment: str) -> None:
    response = client.post(PREDICT, files=upload(data), headers=auth())
    assert response.status_code == 400
    assert fragment in response.json()["detail"]


def test_truncated_jpeg_is_a_400(client: TestClient, photo: bytes) -> None:
    response = client.post(PREDICT, files=upload(photo[: len(photo) // 2]), headers=auth())
    assert response.status_code == 400


def test_octet_stream_is_judged_by_its_bytes(client: TestClient, photo: bytes) -> None:
    response = client.post(
        PREDICT, files=upload(photo, "application/octet-stream"), headers=auth()
    )
    assert response.status_code == 200


def test_missing_file_is_a_422(client: TestClient) -> None:
    assert client.post(PREDICT, headers=auth()).status_code == 422


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": f"Bearer {token(secret='another-secret-' + 'y' * 32)}"},
        {"Authorization": f"Bearer {token(ttl_s=-600)}"},
        {"Authorization": f"Bearer {token(refresh=True)}"},
    ],
    ids=["missing", "basic", "malformed", "wrong-secret", "expired", "refresh"],
)
def test_bad_tokens_are_401(client: TestClient, photo: bytes, headers: dict) -> None:
    response = client.post(PREDICT, files=upload(photo), headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "detail" in response.json()


def test_unknown_query_parameters_are_a_422_that_names_them(
    client: TestClient, photo: bytes
) -> None:
    response = client.post(f"{PREDICT}?topk=3&top_k=2&debug=1", files=upload(photo), headers=auth())
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert [error["loc"] for error in errors] == [["query", "topk"], ["query", "debug"]]
    assert errors[0]["msg"] == (
        "Unknown query parameter 'topk' (accepted: save_prediction, top_k, user_uid)"
    )
    # Authentication comes first: no token, no hints about the API.
    assert client.post(f"{PREDICT}?topk=3", files=upload(photo)).status_code == 401
    known = client.post(
        f"{PREDICT}?save_prediction=False&top_k=2", files=upload(photo), headers=auth()
    )
    assert known.status_code == 200 and len(known.json()["top_k"]) == 2


def test_top_k_above_the_class_count_is_a_422(client: TestClient, photo: bytes) -> None:
    every = client.post(f"{PREDICT}?top_k=28", files=upload(photo), headers=auth())
    assert every.status_code == 200 and len(every.json()["top_k"]) == 28
    response = client.post(f"{PREDICT}?top_k=29", files=upload(photo), headers=auth())
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "top_k"]
    assert error["msg"] == "Input should be less than or equal to 28, the model's number of classes"


def test_pixel_limit_is_a_413(make_client, photo: bytes) -> None:
    client = make_client(max_image_pixels=100 * 100)
    response = client.post(PREDICT, files=upload(photo), headers=auth())
    assert response.status_code == 413
    assert "pixels" in response.json()["detail"]


def test_upload_limit_is_a_413(make_client) -> None:
    client = make_client(max_upload_bytes=200_000)
    big = jpeg_bytes(np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8))
    assert len(big) > 200_000
    response = client.post(PREDICT, files=upload(big), headers=auth())
    assert response.status_code == 413
    assert "files of up to 195.3 KiB (200,000 bytes) are accepted" in response.json()["detail"]


def test_upload_limit_is_stated_in_the_clients_terms(make_client) -> None:
    client = make_client()  # MAX_UPLOAD_BYTES: 10 MiB
    response = client.post(PREDICT, files=upload(b"\xff" * (11 << 20)), headers=auth())
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "The upload exceeds the size limit: files of up to 10 MiB are accepted "
        "(the multipart form around the file may add 64 KiB)."
    )


@pytest.mark.parametrize(
    ("size", "text"),
    [(1, "1 byte"), (1023, "1,023 bytes"), (64 << 10, "64 KiB"), (10 << 20, "10 MiB"),
     (3 << 29, "1.5 GiB"), (10_551_296, "10.1 MiB (10,551,296 bytes)")],
)
def test_sizes_are_written_in_binary_units(size: int, text: str) -> None:
    assert format_size(size) == text


def test_streamed_body_over_limit_is_refused(make_client) -> None:
    """No Content-Length: the body is counted while it streams in."""
    client = make_client(max_upload_bytes=100_000)
    boundary = "xyz"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    def chunks():
        yield head
        for _ in range(100):
            yield b"\xff" * 10_000

    response = client.post(
        PREDICT,
        content=chunks(),
        headers={**auth(), "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413
    assert "files of up to 97.7 KiB (100,000 bytes)" in response.json()["detail"]


def test_full_queue_is_a_503_with_retry_after(make_client, photo: bytes, monkeypatch) -> None:
    client = make_client()
    from rottenbot_inference.inference.batcher import QueueFull

    async def refuse(*_args, **_kwargs):
        raise QueueFull("full")

    monkeypatch.setattr(client.app.state.rottenbot.service.batcher, "predict", refuse)
    response = client.post(PREDICT, files=upload(photo), headers=auth())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"


def test_runtime_failure_is_the_contract_500(client: TestClient, photo: bytes, monkeypatch) -> None:
    bundle = client.app.state.rottenbot.service.bundle

    def explode(_batch):
        raise RuntimeError("boom")

    monkeypatch.setattr(bundle.runtime, "run", explode)
    response = client.post(PREDICT, files=upload(photo), headers=auth())
    assert response.status_code == 500
    assert response.json() == {"detail": PREDICTION_FAILED}


def test_health_and_model_endpoints(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert client.get("/api/v1/inference/model").status_code == 401
    info = client.get("/api/v1/inference/model", headers=auth()).json()
    assert info["input_shape"] == [None, 224, 224, 3]
    assert info["classes"] == list(class_map().values())
    assert info["runtime"]["name"] == "onnxruntime"
    assert info["runtime"]["intra_op_threads"] >= 1
    assert info["batching"]["max_batch_size"] == 4


def test_model_endpoint_agrees_with_itself_and_shows_the_workers(make_client) -> None:
    client = make_client(inference_workers=3, preprocess_threads=2)
    info = client.get("/api/v1/inference/model", headers=auth()).json()
    assert info["batching"]["inference_workers"] == 3
    assert info["batching"]["preprocess_threads"] == 2
    reload = info["reload"]
    assert reload["last"]["outcome"] == "swapped" and reload["last"]["trigger"] == "start"
    assert reload["counts"] == {"swapped": 1, "unchanged": 0, "failed": 0, "unreachable": 0}


def test_not_ready_is_a_503(make_settings, photo: bytes, tmp_path) -> None:
    from rottenbot_inference.app import create_app

    app = create_app(make_settings(model_path=tmp_path / "missing.keras"))
    with TestClient(app) as client:
        response = client.post(PREDICT, files=upload(photo), headers=auth())
        assert response.status_code == 503
        assert "retry-after" in response.headers
        for _ in range(100):
            ready = client.get("/health/ready")
            if ready.json()["status"] == "failed":
                break
        assert ready.status_code == 503
        assert "does not exist" in ready.json()["detail"]


def test_openapi_docs_live_under_api_v1(client: TestClient) -> None:
    for page in ("/api/v1/docs", "/api/v1/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert assets and all(url.startswith("/api/v1/docs/assets/") for url in assets), assets
        for url in assets:  # served by this process (tests/test_docs_browser.py renders them)
            assert client.get(url).status_code == 200, url
    schema = client.get("/api/v1/openapi.json").json()
    assert "/api/v1/inference/predict" in schema["paths"]
