"""Through a real server process on loopback (uvicorn + uvloop + httptools)."""

from __future__ import annotations

import concurrent.futures
import socket
from pathlib import Path

import httpx
import pytest

from tests.helpers import auth, jpeg_bytes, process_env, random_photo, running_server

PREDICT = "/api/v1/inference/predict"


@pytest.fixture(scope="module")
def server(tiny_model: Path, shared_cache: Path, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("server")
    env = {
        **process_env(tiny_model, shared_cache, folder / "data"),
        "MAX_UPLOAD_BYTES": "300000",
    }
    with running_server(env, folder / "server.log") as base_url:
        yield base_url


def test_predict_over_http(server: str) -> None:
    photo = jpeg_bytes(random_photo())
    response = httpx.post(
        f"{server}{PREDICT}?save_prediction=False&top_k=3",
        files={"file": ("a.jpg", photo, "image/jpeg")},
        headers=auth(),
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["top_k"]) == 3


def test_concurrent_clients_all_get_answers(server: str) -> None:
    photos = [jpeg_bytes(random_photo(seed=seed)) for seed in range(6)]
    headers = auth()

    def call(photo: bytes) -> tuple[int, int]:
        response = httpx.post(
            f"{server}{PREDICT}", files={"file": ("a.jpg", photo, "image/jpeg")},
            headers=headers, timeout=60,
        )
        return response.status_code, response.json().get("predicted_class", -1)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, photos * 5))
    assert {status for status, _ in results} == {200}
    # The same image always gets the same class, whatever batch it landed in.
    for index in range(6):
        assert len({results[index + 6 * k][1] for k in range(5)}) == 1


def test_oversized_upload_is_refused_before_it_is_read(server: str) -> None:
    """The 413 arrives although the client sent only the headers (Content-Length 50 MB)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST {PREDICT} HTTP/1.1\r\nHost: {host}\r\nAuthorization: "
            f"{auth()['Authorization']}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {50 * 1024 * 1024}\r\n\r\n".encode()
        )
        reply = b""
        while chunk := sock.recv(4096):  # the server closes the connection after the 413
            reply += chunk
    assert reply.decode().startswith("HTTP/1.1 413")
    assert "files of up to 293 KiB (300,000 bytes) are accepted" in reply.decode()


def test_health_over_http(server: str) -> None:
    assert httpx.get(f"{server}/health/live").status_code == 200
    assert httpx.get(f"{server}/health/ready").json()["status"] == "ready"
    assert httpx.get(f"{server}/api/v1/docs").status_code == 200
