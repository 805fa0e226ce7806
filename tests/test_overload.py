"""Overload: admission control at the door, deadlines from arrival, disconnects cancel work.

Each test runs the real app under uvicorn (httptools, as `serve` does) on a loopback port, in a
thread of the test process, so that it can swap the model for a gated one: the test holds the
inference thread closed, fills the service, and counts exactly which images were computed.
Requests go over real sockets (raw ones where the test must control the bytes on the wire).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from rottenbot_inference.api.admission import AdmissionController, AdmissionMiddleware
from rottenbot_inference.app import create_app
from rottenbot_inference.inference.bundle import ModelBundle
from rottenbot_inference.inference.pace import Pace
from rottenbot_inference.settings import Settings
from tests.helpers import TEST_SECRET, free_port, jpeg_bytes, token, wait_ready
from tests.servers_mlflow import metric_value
from tests.servers_storage import poll

PREDICT = "/api/v1/inference/predict"


class GatedRuntime:
    """Stands in for the model: blocks while the gate is closed, records each image's red."""

    name = "gated"
    input_shape = (224, 224, 3)

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.seen: list[int] = []
        self.delay_s = 0.0  # a slow model: this long per batch

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(120), "the test never opened the gate"
        time.sleep(self.delay_s)
        self.seen.extend(round(float(value)) for value in batch[:, 0, 0, 0])
        return np.full((len(batch), self.classes), 1 / self.classes, np.float32)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class Server:
    """The app under uvicorn in a thread; `runtime` gates and records the model."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.port = free_port()
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, http="httptools", loop="asyncio",
            log_config=None, access_log=False, lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.runtime: GatedRuntime

    def start(self) -> None:
        self.thread.start()
        wait_ready(self.base_url, timeout_s=120)
        service = self.state.service
        classes = service.bundle.class_names
        self.runtime = GatedRuntime(len(classes))
        service.install(ModelBundle("gated", "gated-1", "test", self.runtime, classes))

    def stop(self) -> None:
        self.runtime.gate.set()
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def state(self) -> Any:
        return self.app.state.rottenbot

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=30).text


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(**overrides: object) -> Server:
        values: dict[str, object] = {
            "data_dir": tmp_path / f"data{len(servers)}",
            "jwt_secret": TEST_SECRET,
            "model_poll_interval_s": 0,
            "max_batch_size": 1,
            "max_batch_delay_ms": 0,
            "inference_workers": 1,  # one inference thread: the gate holds all model work
            "access_log": False,
            **overrides,
        }
        server = Server(Settings(_env_file=None, **values))  # type: ignore[arg-type]
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


def solid(red: int) -> bytes:
    """An image the gated runtime recognises by its red value."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[..., 0] = red
    return jpeg_bytes(pixels, quality=100)


def multipart(image: bytes, boundary: str = "rottenbot-test") -> tuple[bytes, str]:
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + image + f"\r\n--{boundary}--\r\n".encode(), boundary


class RawRequest:
    """A predict request written by hand on a socket: headers now, the body when we say."""

    def __init__(self, server: Server, image: bytes) -> None:
        self.body, boundary = multipart(image)
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        headers = (
            f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token(uuid.uuid4())}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        )
        self.sock.sendall(headers.encode())

    def send_body(self, part: slice = slice(None)) -> None:
        self.sock.sendall(self.body[part])

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and body of the next response."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        pairs = (line.partition(":") for line in lines)
        headers = {name.strip().lower(): value.strip() for name, _, value in pairs}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            assert chunk
            rest += chunk
        return int(status_line.split()[1]), headers, rest[:length]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def post(server: Server, image: bytes) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}{PREDICT}", files={"file": ("a.jpg", image, "image/jpeg")},
        headers={"Authorization": f"Bearer {token(uuid.uuid4())}"}, timeout=120,
    )


def admission_of(server: Server) -> AdmissionController:
    """The app's admission controller (its middleware stack is built at the first request)."""
    layer: Any = server.app.middleware_stack
    while layer is not None and not isinstance(layer, AdmissionMiddleware):
        layer = getattr(layer, "app", None)
    assert layer is not None, "no AdmissionMiddleware in the app"
    return layer.controller


def rejections(server: Server, reason: str) -> float:
    return metric_value(server.metrics(), "inference_rejected_requests_total", reason=reason) or 0


# --- the decision itself --------------------------------------------------------------------


def test_controller_refuses_over_the_inflight_cap_or_the_wait_estimate() -> None:
    controller = AdmissionController(max_inflight=3, max_queue_wait_ms=100, min_queue=2)
    assert controller.refusal(interval_ms=0) is None  # nothing measured yet: admit
    controller.inflight = 1
    assert controller.refusal(interval_ms=1000) is None  # under a batch: never by estimate
    controller.inflight = 2
    assert controller.refusal(interval_ms=40) is None  # 80 ms expected
    assert controller.refusal(interval_ms=60) == "queue_wait"  # 120 ms expected
    controller.inflight = 3
    assert controller.refusal(interval_ms=0) == "inflight_limit"
    assert AdmissionController(3, 0).refusal(interval_ms=1e6) is None  # estimate off


def test_pace_counts_busy_time_between_answers_only() -> None:
    now = [100.0]
    pace = Pace(weight=0.5, clock=lambda: now[0])
    pace.started()
    now[0] += 0.080
    pace.finished(answered=True)
    assert pace.interval_ms == pytest.approx(40)  # from 0, halfway to 80 (its own time)
    now[0] += 10  # idle: never counted
    pace.started()
    pace.started()
    now[0] += 0.010
    pace.finished(answered=False)  # failures are not answers
    now[0] += 0.010
    pace.finished(answered=True)  # 20 ms since the busy period began
    assert pace.interval_ms == pytest.approx(30)
    pace.started()
    now[0] += 0.030
    pace.finished(answered=True)
    assert pace.interval_ms == pytest.approx(30)
    assert pace.active == 0


def test_pace_empty_is_set_only_while_no_image_is_in_the_pipeline() -> None:
    pace = Pace()
    empty = pace.empty
    assert empty.is_set()
    pace.started()
    assert not empty.is_set()  # 1 in the pipeline
    pace.started()
    pace.finished(answered=True)
    assert not empty.is_set()  # 1 again
    pace.finished(answered=False)  # a failure leaves the pipeline too
    assert empty.is_set()
    pace.started()
    assert not empty.is_set()


def test_pace_shed_recently_reads_its_own_clock() -> None:
    now = [50.0]
    pace = Pace(clock=lambda: now[0])
    assert not pace.shed_recently(1.0)  # never refused
    pace.shed()
    now[0] += 0.999
    assert pace.shed_recently(1.0)
    now[0] += 0.001
    assert not pace.shed_recently(1.0)


def test_default_inflight_cap_is_what_the_batcher_holds() -> None:
    settings = Settings(_env_file=None, queue_capacity=10, max_batch_size=4)
    assert settings.effective_max_inflight == 14
    assert Settings(_env_file=None, max_inflight_requests=3).effective_max_inflight == 3


# --- through a real server --------------------------------------------------------------------


def test_over_the_inflight_cap_is_503_before_the_body_is_read_then_recovers(
    serve: Callable[..., Server],
) -> None:
    server = serve(max_inflight_requests=2, max_queue_wait_ms=0)
    runtime = server.runtime
    before = rejections(server, "inflight_limit")
    runtime.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, server, solid(40))
        assert runtime.entered.wait(60)  # the model holds the first image
        second = pool.submit(post, server, solid(80))
        poll(lambda: server.state.service.batcher.queued == 1, 60, "second image not queued")

        # Third: only the headers are sent; the 503 comes back without waiting for the body.
        third = RawRequest(server, solid(120))
        try:
            status, headers, body = third.response()
            assert status == 503, body
            assert headers["retry-after"] == "1"
            assert b"overloaded" in body
            # The connection stays usable: the late body is discarded, the next request works.
            third.send_body()
            third.sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert third.response()[0] == 200
        finally:
            third.close()
        assert rejections(server, "inflight_limit") == before + 1

        runtime.gate.set()  # load drops: the admitted ones finish, new ones are admitted
        assert first.result().status_code == 200
        assert second.result().status_code == 200
    assert post(server, solid(160)).status_code == 200
    assert runtime.seen == [40, 80, 160]  # the refused image was never decoded nor computed


def test_wait_estimate_sheds_once_the_service_is_measured_slow(
    serve: Callable[..., Server],
) -> None:
    server = serve(max_inflight_requests=100, max_queue_wait_ms=10)  # a batch: one image
    runtime = server.runtime
    before = rejections(server, "queue_wait")
    # One slow answer (the model takes 0.3 s): the average (weight 0.05) rises to >= 15 ms.
    runtime.delay_s = 0.3
    assert post(server, solid(40)).status_code == 200
    runtime.delay_s = 0
    assert server.state.service.pace.interval_ms >= 15

    runtime.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post, server, solid(80))  # admitted: nothing ahead of it
        poll(lambda: server.state.service.batcher.in_flight == 1, 60, "not computing")
        refused = post(server, solid(120))  # one ahead x >= 15 ms > 10 ms
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert rejections(server, "queue_wait") == before + 1
        runtime.gate.set()
        assert held.result().status_code == 200
    assert runtime.seen == [40, 80]


def test_deadline_counts_from_arrival_not_from_the_model_queue(
    serve: Callable[..., Server],
) -> None:
    """A body that took longer than REQUEST_TIMEOUT_S to arrive is not decoded or computed."""
    timeout_s = 1.0
    server = serve(request_timeout_s=timeout_s)
    admission = admission_of(server)
    slow = RawRequest(server, solid(40))
    try:
        slow.send_body(slice(0, 100))
        # Arrival is recorded before the request counts as admitted: once it does, waiting
        # longer than the timeout is past the deadline however late the server saw the headers.
        poll(lambda: admission.inflight == 1, 60, "the request was not admitted")
        time.sleep(1.5 * timeout_s)
        slow.send_body(slice(100, None))
        status, headers, body = slow.response()
    finally:
        slow.close()
    assert status == 503 and headers["retry-after"] == "1", body
    assert b"waited too long" in body
    assert server.state.service.batcher.dropped["deadline"] == 1
    assert post(server, solid(80)).status_code == 200  # the service itself is fine
    assert server.runtime.seen == [80]


def test_an_image_whose_deadline_passed_in_the_queue_is_never_computed(
    serve: Callable[..., Server],
) -> None:
    server = serve(request_timeout_s=2.0)
    runtime = server.runtime
    runtime.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(post, server, solid(40))
        assert runtime.entered.wait(60)
        queued = pool.submit(post, server, solid(80))
        late = queued.result()  # answered at its deadline, while the model is still held
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert "waited too long" in late.json()["detail"]
        runtime.gate.set()
        held.result()  # also past its deadline by now (503); it was computing already
    assert post(server, solid(120)).status_code == 200
    assert runtime.seen == [40, 120]  # the queued image was skipped
    assert server.state.service.batcher.dropped["deadline"] >= 1


def test_a_client_that_disconnects_while_queued_is_not_computed(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    runtime = server.runtime
    batcher = server.state.service.batcher
    closed_before = metric_value(
        server.metrics(), "inference_api_requests_total", endpoint="/predict", status="499"
    ) or 0
    runtime.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        held: Future[httpx.Response] = pool.submit(post, server, solid(40))
        assert runtime.entered.wait(60)
        gone = RawRequest(server, solid(80))
        gone.send_body()
        poll(lambda: batcher.queued == 1, 60, "the second image was not queued")
        gone.close()  # the client gives up while its image waits for the model

        def logged_499() -> bool:
            value = metric_value(
                server.metrics(), "inference_api_requests_total", endpoint="/predict",
                status="499",
            )
            return (value or 0) == closed_before + 1

        poll(logged_499, 60, "the disconnect was not noticed")
        runtime.gate.set()
        assert held.result().status_code == 200
    assert post(server, solid(120)).status_code == 200
    assert runtime.seen == [40, 120]  # the abandoned image never reached the model
    assert batcher.dropped["cancelled"] == 1
    dropped = metric_value(server.metrics(), "inference_batcher_dropped_total", reason="cancelled")
    assert dropped == 1
