"""The shadow challenger (CHALLENGER_URI): agreement, refusal, promotion, overload.

Models are tiny ONNX graphs built here (no TensorFlow): the mean colour of the image picks the
class, red -> 0, green -> 1, blue -> `blue_class`. The champion (v1) says class 2 for blue, the
challenger (v2) class 3, so the two disagree on exactly the blue-dominated images: a known
subset. One real `mlflow server` serves the module. No timing assertions: waits poll.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from rottenbot_inference.app import create_app
from rottenbot_inference.inference import shadow
from rottenbot_inference.inference.agreement import ComparisonRecord, Summary, wilson_interval
from rottenbot_inference.inference.images import ImagePreprocessor
from rottenbot_inference.inference.pace import Pace
from rottenbot_inference.inference.runtime import OnnxRuntime
from rottenbot_inference.inference.shadow import QUEUE_SIZE, ShadowJob, ShadowScorer
from rottenbot_inference.settings import Settings
from rottenbot_inference.storage.comparisons import ComparisonRepository
from rottenbot_inference.storage.db import PredictionRepository, create_engine, migrate
from rottenbot_inference.storage.records import FeedbackRecord, PredictionRecord
from tests.helpers import (
    CLASS_COUNT,
    TEST_SECRET,
    auth,
    class_map,
    jpeg_bytes,
    random_photo,
    require_import,
)
from tests.servers_mlflow import (
    MlflowServer,
    launched_mlflow_server,
    log_model,
    metric_value,
    set_alias,
)
from tests.servers_storage import PREDICTIONS, PostgresServer, poll
from tests.servers_storage import postgres_fixture as postgres_fixture  # registers `postgres`
from tests.test_overload import Server
from tests.test_telemetry import (
    _LABEL,
    _SELECTOR,
    CHALLENGER_ONLY,
    DASHBOARD,
    _expressions,
    _scrape,
)

PREDICT = "/api/v1/inference/predict"
COMPARISON = "/api/v1/inference/model/comparison"
RELOAD = "/api/v1/admin/reload"
ADMIN_KEY = "admin-key-" + "c" * 24
ADMIN = {"X-Admin-Key": ADMIN_KEY}
NAMES = class_map()


def colour_model(path: Path, blue_class: int, softmax: bool = True) -> Path:
    """(N, 224, 224, 3) -> 28 probabilities, from the mean colour; `softmax=False`: logits
    (not probabilities: a broken version the verification refuses)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, CLASS_COUNT), np.float32)
    weights[0, 0] = weights[1, 1] = weights[2, blue_class] = 0.05
    bias = np.full(CLASS_COUNT, -50.0, np.float32)
    bias[[0, 1, blue_class]] = 0.0
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["mean", "weights"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["logits"]),
    ]
    output = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
        output = "probabilities"
    graph = helper.make_graph(
        nodes,
        "colour",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 224, 224, 3])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", CLASS_COUNT])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    (path.parent / "index_to_class.json").write_text(json.dumps(NAMES))
    return path


def photos(count: int) -> list[bytes]:
    """Smooth random colours: about a third of them blue-dominated."""
    return [jpeg_bytes(random_photo(96, 128, seed=seed)) for seed in range(count)]


def offline_agreement(champion: Path, challenger: Path, images: list[bytes]) -> tuple[int, int]:
    """(agreeing, blue-dominated) top-1s of the two model files on the decoded images."""
    preprocessor = ImagePreprocessor((224, 224), max_pixels=10**8)
    batch = np.stack([preprocessor.prepare(data).pixels for data in images])
    first = OnnxRuntime(champion, 1).run(batch).argmax(axis=1)
    second = OnnxRuntime(challenger, 1).run(batch).argmax(axis=1)
    blue = int((batch.mean(axis=(1, 2)).argmax(axis=1) == 2).sum())
    return int((first == second).sum()), blue


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_import("onnx", "the onnx package (test extra) is needed")
    folder = tmp_path_factory.mktemp("colour-models")
    return {
        "v1": colour_model(folder / "v1" / "model.onnx", blue_class=2),
        "v2": colour_model(folder / "v2" / "model.onnx", blue_class=3),
        "broken": colour_model(folder / "broken" / "model.onnx", blue_class=3, softmax=False),
    }


@pytest.fixture(scope="module", autouse=True)
def launched_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """Launched with the module's first test: the tests without a registry (first in the file)
    run while it starts."""
    yield from launched_mlflow_server(tmp_path_factory.mktemp("mlflow") / "server")


@pytest.fixture(scope="module")
def mlflow_server(launched_mlflow: MlflowServer) -> MlflowServer:
    launched_mlflow.wait()
    return launched_mlflow


def registered(server: MlflowServer, name: str, models: dict[str, Path], *keys: str) -> list[str]:
    return [log_model(server.url, models[key], name)[0] for key in keys]


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "jwt_secret": TEST_SECRET,
            "admin_api_key": ADMIN_KEY,
            "max_batch_size": 4,
            "model_load_deadline_s": 5,
            "shadow_fraction": 1.0,
            "access_log": False,
            **overrides,
        }
        client = TestClient(create_app(Settings(_env_file=None, **values)))  # type: ignore[arg-type]
        client.__enter__()
        clients.append(client)
        poll(lambda: client.get("/health/ready").status_code == 200, 120, "never ready")
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def predict(
    client: TestClient, image: bytes, save: bool = False, user: uuid.UUID | None = None
) -> dict[str, Any]:
    response = client.post(
        f"{PREDICT}?save_prediction={save}",
        headers=auth(user),
        files={"file": ("a.jpg", image, "image/jpeg")},
    )
    assert response.status_code == 200, response.text
    return response.json()


def comparison(client: TestClient, **params: str) -> dict[str, Any]:
    response = client.get(COMPARISON, headers=ADMIN, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def shadow_counts(client: TestClient) -> dict[str, Any]:
    return client.app.state.rottenbot.challenger.describe()["shadow"]  # type: ignore[attr-defined]


def dashboard_series_exist(client: TestClient) -> None:
    """The challenger's Grafana panels query only series /metrics has (with a challenger)."""
    samples = _scrape(client)
    checked = 0
    for expression in _expressions(json.loads(DASHBOARD.read_text())):
        for name, selector in _SELECTOR.findall(expression):
            if not name.startswith(CHALLENGER_ONLY):
                continue
            checked += 1
            assert name in samples, f"the dashboard queries {name}, which /metrics lacks"
            labels = set().union(*(sample.labels for sample in samples[name]))
            for label, _ in _LABEL.findall(selector or ""):
                assert label in labels, f"{name} has no label {label}"
    assert checked >= 4


# -- without a registry ---------------------------------------------------------------------


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(81, 100)  # type: ignore[misc]
    assert (round(low, 4), round(high, 4)) == (0.7222, 0.8749)
    assert wilson_interval(0, 10)[0] == 0.0  # type: ignore[index]
    assert wilson_interval(0, 0) is None


class _Pipeline:
    """Just what ShadowScorer reads of an InferenceService: the pace and the batcher's queue."""

    def __init__(self) -> None:
        self.pace = Pace()
        self.batcher = self  # .queued
        self.queued = 0


def _job(answered_at: float) -> ShadowJob:
    return ShadowJob(np.zeros((2, 2, 3), np.float32), None, 0, "a", 1.0, "1", None, answered_at)


def test_the_shadow_thread_waits_for_an_empty_pipeline_without_polling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It sleeps on the pipeline's empty event: woken when the champion's last image leaves,
    and, while it is busy, it gives up MAX_WAIT_S after the answer having looked only twice."""
    pipeline = _Pipeline()
    scorer = ShadowScorer(pipeline, lambda: None, lambda record: None, 1.0)  # type: ignore[arg-type]
    looks = 0
    idle = scorer.idle

    def counted() -> bool:
        nonlocal looks
        looks += 1
        return idle()

    # Only the challenger's computation is niced; the waiting thread asks for the GIL often.
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    compute_nice = scorer._compute.submit(
        lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ).result()
    assert compute_nice == max(base, scorer.nice) == max(base, 19)
    monkeypatch.setattr(scorer, "idle", counted)
    monkeypatch.setattr(shadow, "MAX_WAIT_S", 0.3)
    pipeline.pace.started()  # the champion is busy
    assert scorer._wait_for_idle(_job(time.monotonic())) == "busy"
    assert looks == 2  # before the wait and after the timeout, nothing in between

    monkeypatch.setattr(shadow, "MAX_WAIT_S", 60.0)
    threading.Timer(0.1, pipeline.pace.finished, kwargs={"answered": True}).start()
    looks = 0
    assert scorer._wait_for_idle(_job(time.monotonic())) is None  # woken well before 60 s
    assert looks == 2
    pipeline.pace.started()
    assert scorer._wait_for_idle(_job(time.monotonic() - 61)) == "busy"  # too late already
    pipeline.pace.finished(answered=True)
    pipeline.pace.shed()  # a request refused at admission: skipped at once, empty or not
    assert scorer._wait_for_idle(_job(time.monotonic())) == "shedding"
    monkeypatch.setattr(pipeline.pace, "shed_at", time.monotonic() - shadow.SHED_QUIET_S - 1)
    assert scorer._wait_for_idle(_job(time.monotonic())) is None  # a second later: idle again


def test_no_challenger_no_cost(
    make_app: Callable[..., TestClient], models: dict[str, Path]
) -> None:
    client = make_app(model_path=models["v1"])
    predict(client, photos(1)[0])
    assert client.app.state.rottenbot.challenger is None  # type: ignore[attr-defined]
    assert "shadow" not in {thread.name for thread in threading.enumerate()}
    for response in (
        client.get(COMPARISON, headers=ADMIN),
        client.post("/api/v1/admin/challenger/reload", headers=ADMIN),
    ):
        assert response.status_code == 404 and "CHALLENGER_URI" in response.json()["detail"]
    assert client.get(COMPARISON).status_code == 401  # the admin key guards it


def test_a_challenger_that_cannot_load_leaves_the_champion_serving(
    make_app: Callable[..., TestClient], models: dict[str, Path]
) -> None:
    client = make_app(
        model_path=models["v1"], challenger_uri=str(models["broken"]), model_poll_interval_s=0.2
    )
    state = client.app.state.rottenbot  # type: ignore[attr-defined]
    failure = poll(lambda: state.challenger.manager.last_failure, 60, "the broken one loaded?")
    assert "not probabilities" in failure.detail
    assert predict(client, photos(1)[0])["predicted_class"] in (0, 1, 2)
    body = comparison(client)
    assert body["challenger"]["loaded"] is False and body["samples"] == 0
    assert body["challenger"]["shadow"]["skipped"] == {"not_loaded": 1}
    # A reload request retries the refused version: refused again (409), the champion serves on.
    retried = client.post("/api/v1/admin/challenger/reload", headers=ADMIN)
    assert retried.status_code == 409 and retried.json()["outcome"] == "failed", retried.text
    assert client.post("/api/v1/admin/challenger/reload").status_code == 401


def comparison_record(
    champion: int, challenger: int, prediction_uid: uuid.UUID | None = None
) -> ComparisonRecord:
    return ComparisonRecord(
        uid=uuid.uuid4(),
        created_at=dt.datetime.now(dt.UTC),
        champion_version="1",
        challenger_version="2",
        champion_class=champion,
        champion_class_name=NAMES[str(champion)],
        champion_confidence=0.5,
        challenger_class=challenger,
        challenger_class_name=NAMES[str(challenger)],
        challenger_confidence=0.75,
        challenger_ms=4.0,
        prediction_uid=prediction_uid,
    )


def test_the_summary_on_postgresql_joins_feedback(postgres: PostgresServer) -> None:
    """The SQL the comparison endpoint runs, on PostgreSQL (the app tests use SQLite)."""
    url = make_url(postgres.url(postgres.create_database("shadow")))
    user, saved = uuid.uuid4(), [uuid.uuid4(), uuid.uuid4()]
    now = dt.datetime.now(dt.UTC)

    async def scenario() -> Summary:
        await migrate(url)
        engine = create_engine(url)
        try:
            predictions = PredictionRepository(engine)
            await predictions.insert_many(
                [
                    PredictionRecord(uid, user, now, f"{user}/{uid}.jpg", 2, NAMES["2"], 0.5)
                    for uid in saved
                ]
            )
            for uid, right in zip(saved, ("3", "2"), strict=True):
                await predictions.set_feedback(
                    FeedbackRecord(uid, user, int(right), NAMES[right], "1", right == "2", now)
                )
            repository = ComparisonRepository(engine)
            await repository.insert_many(
                [
                    comparison_record(2, 3, saved[0]),
                    comparison_record(2, 3, saved[1]),
                    comparison_record(0, 0),
                    comparison_record(1, 1),
                    comparison_record(1, 0),
                ]
            )
            return await repository.summary("1", "2")
        finally:
            await engine.dispose()

    summary = asyncio.run(scenario()).as_dict()
    assert (summary["samples"], summary["agreed"]) == (5, 2)
    assert summary["mean_confidence_delta"] == pytest.approx(0.25)
    assert summary["confusion"][0] == {"champion": NAMES["2"], "challenger": NAMES["3"], "count": 2}
    assert summary["feedback"]["count"] == 2
    assert summary["feedback"]["champion_accuracy"] == 0.5  # right on the second only
    assert summary["feedback"]["challenger_accuracy"] == 0.5  # right on the first only


# -- overload ---------------------------------------------------------------------------------


@pytest.fixture
def overloaded(tmp_path: Path, models: dict[str, Path]) -> Iterator[Server]:
    """The app under uvicorn with a slow champion (tests/test_overload.py's gated runtime, one
    inference thread, batches of one) and the v2 colour model as a local challenger."""
    server = Server(
        Settings(  # type: ignore[call-arg]
            _env_file=None,
            data_dir=tmp_path / "data",
            jwt_secret=TEST_SECRET,
            model_poll_interval_s=0,
            max_batch_size=1,
            inference_workers=1,
            access_log=False,
            challenger_uri=str(models["v2"]),
            max_queue_wait_ms=0,  # no shedding at the door: every request reaches the model
            shadow_fraction=1.0,
            admin_api_key=ADMIN_KEY,
        )
    )
    server.start()
    server.runtime.delay_s = 0.02
    try:
        yield server
    finally:
        server.stop()


def test_overload_drops_shadow_work_first_and_the_champion_answers_all(
    overloaded: Server,
) -> None:
    import httpx

    state = overloaded.state
    poll(lambda: state.challenger.slot.bundle, 60, "challenger not loaded")
    scorer = state.challenger.scorer
    image = photos(1)[0]
    statuses: Counter[int] = Counter()
    per_client = 15

    def client_loop() -> None:
        with httpx.Client(base_url=overloaded.base_url, timeout=60) as http:
            for _ in range(per_client):
                response = http.post(
                    PREDICT, headers=auth(), files={"file": ("a.jpg", image, "image/jpeg")}
                )
                statuses[response.status_code] += 1

    clients = [threading.Thread(target=client_loop) for _ in range(8)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(120)
    scored_under_load, sampled = scorer.scored, scorer.sampled
    total = 8 * per_client
    assert statuses == {200: total}, statuses  # champion goodput: every request answered
    assert len(overloaded.runtime.seen) == total  # and computed, none dropped
    assert sampled == total
    # Shadow work went first: hardly any ran while the champion had work queued.
    assert scored_under_load <= 0.1 * sampled, (scored_under_load, sampled, scorer.skipped)
    poll(lambda: scorer.scored + sum(scorer.skipped.values()) == sampled, 30, "shadow drain")
    skipped = sum(scorer.skipped[reason] for reason in ("busy", "shedding", "queue_full"))
    # At most what waited in the queue (and the one in hand) when the load stopped ran after.
    assert skipped >= sampled - (QUEUE_SIZE + 1) - scored_under_load, scorer.skipped
    text = overloaded.metrics()
    counted = sum(
        metric_value(text, "inference_shadow_skipped_total", reason=reason) or 0
        for reason in ("busy", "shedding", "queue_full")
    )
    assert counted >= skipped


# -- a real mlflow server -------------------------------------------------------------------


def test_agreement_matches_offline_feedback_and_a_broken_challenger_is_refused(
    make_app: Callable[..., TestClient], models: dict[str, Path], mlflow_server: MlflowServer
) -> None:
    name = "rb-shadow"
    v1, v2, broken = registered(mlflow_server, name, models, "v1", "v2", "broken")
    set_alias(mlflow_server.url, name, "champion", v1)
    set_alias(mlflow_server.url, name, "challenger", v2)
    client = make_app(
        use_local=False,
        model_uri=f"models:/{name}@champion",
        challenger_uri=f"models:/{name}@challenger",
        mlflow_tracking_uri=mlflow_server.url,
        model_poll_interval_s=0.5,
    )
    poll(lambda: client.app.state.rottenbot.challenger.slot.bundle, 60, "challenger not loaded")  # type: ignore[attr-defined]
    images = photos(30)
    agreeing, blue = offline_agreement(models["v1"], models["v2"], images)
    assert 0 < blue < len(images) and agreeing == len(images) - blue  # the known subset
    user = uuid.uuid4()
    answers = [
        predict(client, image, save=index < 12, user=user) for index, image in enumerate(images)
    ]
    poll(lambda: shadow_counts(client)["scored"] == len(images), 60, "shadow scoring")

    # Owners' feedback on the saved ones: the challenger's blue class (3) is the truth.
    truth: dict[str, str] = {}
    for answer in answers[:12]:
        right = NAMES["3"] if answer["predicted_class"] == 2 else answer["predicted_class_name"]
        truth[answer["prediction_uid"]] = right

    def give_feedback() -> bool:
        for uid, right in list(truth.items()):
            response = client.put(
                f"{PREDICTIONS}/{uid}/feedback", headers=auth(user), json={"correct_class": right}
            )
            if response.status_code != 200:
                return False  # 409 while the save is still in the outbox
            del truth[uid]
        return True

    poll(give_feedback, 60, "saved predictions never reached the database")
    body = comparison(client)
    assert body["source"] == "database"
    assert (body["champion_version"], body["challenger_version"]) == (v1, v2)
    assert body["samples"] == len(images)
    interval = body["agreement_interval"]
    offline_rate = agreeing / len(images)
    assert interval["low"] <= offline_rate <= interval["high"]
    assert body["agreement_rate"] == pytest.approx(offline_rate)
    confusion = {
        (cell["champion"], cell["challenger"]): cell["count"] for cell in body["confusion"]
    }
    assert confusion[(NAMES["2"], NAMES["3"])] == blue
    assert sum(confusion.values()) == len(images)
    saved_blue = sum(answer["predicted_class"] == 2 for answer in answers[:12])
    assert body["feedback"]["count"] == 12
    assert body["feedback"]["champion_correct"] == 12 - saved_blue
    assert body["feedback"]["challenger_correct"] == 12
    assert body["mean_challenger_ms"] > 0
    dashboard_series_exist(client)

    # A broken challenger version is refused; the champion serves on, the challenger stays v2.
    set_alias(mlflow_server.url, name, "challenger", broken)
    state = client.app.state.rottenbot  # type: ignore[attr-defined]
    failure = poll(lambda: state.challenger.manager.last_failure, 60, "broken version ignored")
    assert failure.candidate_version == broken and "not probabilities" in failure.detail
    assert predict(client, images[0])["model_version"] == v1
    described = comparison(client)["challenger"]
    assert described["version"] == v2 and "was refused" in described["warning"]
    assert state.service.bundle.version == v1


def test_promotion_reuses_the_challenger_session_with_zero_non_200(
    make_app: Callable[..., TestClient], models: dict[str, Path], mlflow_server: MlflowServer
) -> None:
    name = "rb-promote"
    v1, v2 = registered(mlflow_server, name, models, "v1", "v2")
    set_alias(mlflow_server.url, name, "champion", v1)
    set_alias(mlflow_server.url, name, "challenger", v2)
    client = make_app(
        use_local=False,
        model_uri=f"models:/{name}@champion",
        challenger_uri=f"models:/{name}@challenger",
        mlflow_tracking_uri=mlflow_server.url,
        model_poll_interval_s=0,
    )
    state = client.app.state.rottenbot  # type: ignore[attr-defined]
    challenger = poll(lambda: state.challenger.slot.bundle, 60, "challenger not loaded")
    builds: list[str] = []
    build = state.models._build

    def counted(artifact: Any, background: bool) -> Any:
        builds.append(artifact.source)  # a download + conversion + session would come here
        return build(artifact, background)

    state.models._build = counted
    statuses: Counter[int] = Counter()
    versions: Counter[str] = Counter()
    stop = threading.Event()
    image = photos(3)[2]

    def stream() -> None:
        while not stop.is_set():
            response = client.post(
                PREDICT, headers=auth(), files={"file": ("a.jpg", image, "image/jpeg")}
            )
            statuses[response.status_code] += 1
            if response.status_code == 200:
                versions[response.json()["model_version"]] += 1

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        poll(lambda: versions[v1] >= 10, 60, "no traffic before the move")
        set_alias(mlflow_server.url, name, "champion", v2)
        reload = client.post(RELOAD, headers=ADMIN)
        assert reload.status_code == 200 and reload.json()["outcome"] == "swapped", reload.text
        poll(lambda: versions[v2] >= 10, 60, "no traffic after the move")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert set(statuses) == {200}, statuses
    assert builds == []  # no download, no conversion, no new session
    assert state.service.bundle.version == v2
    assert state.service.bundle.runtime is challenger.runtime  # the very same session
    assert (
        metric_value(client.get("/metrics").text, "inference_model_loads_total", outcome="reused")
        >= 1
    )
    before = shadow_counts(client)["skipped"].get("same_version", 0)
    predict(client, image)
    assert shadow_counts(client)["skipped"].get("same_version", 0) == before + 1
