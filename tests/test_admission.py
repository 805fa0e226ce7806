"""Admission control (api/admission.py) directly, without a server: the controller's two limits
at their boundaries, and the middleware around a stand-in ASGI app (which requests it looks at,
the 503 it sends, the in-flight count, the arrival time and the deadline). Fast: the mutation
run (scripts/mutation.sh) uses these tests for api/admission.py; tests/test_overload.py covers
the same through a real server.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from rottenbot_inference.api import admission
from rottenbot_inference.api.admission import (
    ARRIVED_AT,
    OVERLOADED,
    PREDICT_PATH,
    AdmissionController,
    AdmissionMiddleware,
    request_deadline,
)
from rottenbot_inference.inference.pace import Pace
from rottenbot_inference.settings import Settings


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


# --- the controller ---------------------------------------------------------------------------


def test_inflight_limit_at_its_boundary() -> None:
    controller = AdmissionController(max_inflight=3, max_queue_wait_ms=0)
    assert controller.inflight == 0
    controller.inflight = 2
    assert controller.refusal(interval_ms=0) is None
    controller.inflight = 3
    assert controller.refusal(interval_ms=0) == "inflight_limit"
    controller.inflight = 4
    assert controller.refusal(interval_ms=0) == "inflight_limit"


def test_wait_estimate_at_its_boundaries() -> None:
    controller = AdmissionController(max_inflight=100, max_queue_wait_ms=100, min_queue=2)
    controller.inflight = 1  # under min_queue: never by estimate
    assert controller.refusal(interval_ms=1e6) is None
    controller.inflight = 2
    assert controller.refusal(interval_ms=50) is None  # exactly the limit: admitted
    assert controller.refusal(interval_ms=50.5) == "queue_wait"  # just over it
    assert controller.refusal(interval_ms=0) is None  # not measured yet
    controller.inflight = 100
    assert controller.refusal(interval_ms=50) == "inflight_limit"  # the cap is checked first


def test_wait_estimate_defaults_to_one_admitted_request_and_can_be_off() -> None:
    controller = AdmissionController(max_inflight=100, max_queue_wait_ms=100)
    assert controller.min_queue == 1
    controller.inflight = 1
    assert controller.refusal(interval_ms=101) == "queue_wait"
    controller.inflight = 0
    assert controller.refusal(interval_ms=1e9) is None  # nobody ahead
    small = AdmissionController(max_inflight=100, max_queue_wait_ms=0.5)
    small.inflight = 1
    assert small.refusal(interval_ms=1) == "queue_wait"  # any positive limit applies
    off = AdmissionController(max_inflight=100, max_queue_wait_ms=0, min_queue=0)
    off.inflight = 50
    assert off.refusal(interval_ms=1e9) is None


# --- the middleware ---------------------------------------------------------------------------


class App:
    """A stand-in for the API: records what reached it, answers 200 (or raises)."""

    def __init__(self, fail: bool = False) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.receives: list[Any] = []
        self.inflight_seen: list[int] = []
        self.fail = fail
        self.middleware: AdmissionMiddleware | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        self.receives.append(receive)
        if self.middleware is not None:
            self.inflight_seen.append(self.middleware.controller.inflight)
        if self.fail:
            raise RuntimeError("the handler failed")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def wrap(app: App, **values: Any) -> AdmissionMiddleware:
    middleware = AdmissionMiddleware(app, settings(**values))
    app.middleware = middleware
    return middleware


def scope(path: str = PREDICT_PATH, method: str = "POST", kind: str = "http",
          interval_ms: float | None = None, pace: Pace | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"type": kind, "path": path, "method": method}
    if interval_ms is not None:
        pace = pace or Pace()
        pace.interval_ms = interval_ms
        service = SimpleNamespace(pace=pace)
        found["app"] = SimpleNamespace(state=SimpleNamespace(rottenbot=SimpleNamespace(
            service=service)))
    return found


async def receive() -> dict[str, Any]:
    raise AssertionError("the middleware must not read the body")


def call(middleware: AdmissionMiddleware, request: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(middleware(request, receive, send))
    return sent


def test_the_controller_follows_the_settings() -> None:
    middleware = wrap(App(), queue_capacity=10, max_batch_size=4, max_queue_wait_ms=250)
    controller = middleware.controller
    assert (controller.max_inflight, controller.max_queue_wait_ms, controller.min_queue) == (
        14, 250, 4,
    )
    assert wrap(App(), max_inflight_requests=3).controller.max_inflight == 3


def test_admitted_predict_requests_are_counted_and_stamped() -> None:
    app = App()
    middleware = wrap(app, max_inflight_requests=2)
    before = time.monotonic()
    sent = call(middleware, scope())
    assert [m.get("status") for m in sent] == [200, None]
    assert app.inflight_seen == [1]  # counted while inside
    assert app.receives == [receive]  # the body is the app's to read
    assert middleware.controller.inflight == 0  # and no longer after
    arrived = app.scopes[0]["state"][ARRIVED_AT]
    assert before <= arrived <= time.monotonic()


def test_the_count_drops_when_the_handler_fails() -> None:
    middleware = wrap(App(fail=True), max_inflight_requests=2)
    with pytest.raises(RuntimeError):
        call(middleware, scope())
    assert middleware.controller.inflight == 0


@pytest.mark.parametrize(
    "request_scope",
    [
        scope(path="/health/ready"),
        scope(method="GET"),
        scope(kind="websocket"),
        scope(kind="lifespan"),
    ],
)
def test_other_requests_pass_straight_through(request_scope: dict[str, Any]) -> None:
    app = App()
    middleware = wrap(app, max_inflight_requests=1)
    middleware.controller.inflight = 5  # even when full
    assert call(middleware, request_scope)[0]["status"] == 200
    assert app.inflight_seen == [5]  # not counted
    assert app.receives == [receive]
    assert "state" not in app.scopes[0]


def test_a_refusal_is_503_with_retry_after_before_the_body_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reasons: list[str] = []
    monkeypatch.setattr(admission, "record_rejection", reasons.append)
    app = App()
    middleware = wrap(app, max_inflight_requests=1, retry_after_s=7)
    middleware.controller.inflight = 1
    for _ in range(2):  # the same answer each time: the template is not reused by reference
        start, body = call(middleware, scope())
        assert start["type"] == "http.response.start" and start["status"] == 503
        payload = json.dumps({"detail": OVERLOADED}, separators=(",", ":")).encode()
        assert start["headers"] == [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"retry-after", b"7"),
        ]
        assert body == {"type": "http.response.body", "body": payload}
        start["headers"].append((b"x-added", b"by a later layer"))
    assert reasons == ["inflight_limit", "inflight_limit"]
    assert app.scopes == []  # never reached the app
    assert middleware.controller.inflight == 1


def test_the_wait_estimate_uses_the_services_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    reasons: list[str] = []
    monkeypatch.setattr(admission, "record_rejection", reasons.append)
    app = App()
    middleware = wrap(app, max_inflight_requests=100, max_queue_wait_ms=100, max_batch_size=1)
    middleware.controller.inflight = 2
    pace = Pace(clock=lambda: 7.0)
    assert call(middleware, scope(interval_ms=50, pace=pace))[0]["status"] == 200  # 100 ms
    assert pace.shed_at == float("-inf")  # admitted: not shedding
    assert call(middleware, scope(interval_ms=51, pace=pace))[0]["status"] == 503  # 102 ms
    assert reasons == ["queue_wait"]
    assert pace.shed_at == 7.0  # the refusal is noted where shadow work looks
    strict = wrap(App(), max_inflight_requests=100, max_queue_wait_ms=1, max_batch_size=1)
    strict.controller.inflight = 50
    assert call(strict, scope())[0]["status"] == 200  # no app state: nothing measured (0 ms)
    assert reasons == ["queue_wait"]


def test_request_deadline_counts_from_arrival() -> None:
    config = settings(request_timeout_s=4)
    stamped = SimpleNamespace(state=SimpleNamespace(**{ARRIVED_AT: 100.0}))
    assert request_deadline(stamped, config) == 104.0  # type: ignore[arg-type]
    unstamped = SimpleNamespace(state=SimpleNamespace())
    before = time.monotonic()
    deadline = request_deadline(unstamped, config)  # type: ignore[arg-type]
    assert before + 4 <= deadline <= time.monotonic() + 4
