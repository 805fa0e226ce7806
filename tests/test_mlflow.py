"""Models from a real MLflow server: sources, the cache, start-up errors, hot swap, admin.

One `mlflow server` (SQLite store, local artifact root) serves the whole module; the service
reaches it through a TCP proxy so that "registry down" costs nothing to stage. Models are
small Keras models logged the way the old training pipeline logs them (tensorflow flavor,
`index_to_class.json` in the run). No timing assertions: every wait polls with a generous
deadline.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from rottenbot_inference.app import create_app
from rottenbot_inference.inference.loader import ModelLoader, ModelLoadError
from rottenbot_inference.inference.mlflow_source import (
    MlflowSource,
    RegistryUnavailable,
    parse_model_uri,
    wants_mlflow,
)
from rottenbot_inference.inference.reloader import ModelManager
from rottenbot_inference.inference.service import InferenceService
from rottenbot_inference.settings import Settings
from tests.helpers import (
    TEST_SECRET,
    auth,
    class_map,
    free_port,
    jpeg_bytes,
    random_photo,
)
from tests.servers_mlflow import (
    MlflowServer,
    ServiceProcess,
    TcpProxy,
    build_keras,
    launched_mlflow_server,
    log_model,
    metric_value,
    model_artifact_file,
    rss_mb,
    set_alias,
)

PREDICT = "/api/v1/inference/predict"
MODEL = "/api/v1/inference/model"
RELOAD = "/api/v1/admin/reload"
ADMIN_KEY = "admin-key-" + "k" * 24


@dataclass
class Registry:
    server: MlflowServer
    folder: Path
    models: dict[int, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def model(self, seed: int, classes: int = 28) -> Path:
        """A Keras model file per (seed, classes), built once."""
        key = seed * 1000 + classes
        if key not in self.models:
            self.models[key] = build_keras(self.folder / f"keras-{seed}-{classes}", seed, classes)
        return self.models[key]

    def proxy(self) -> TcpProxy:
        proxy = TcpProxy(self.server.port)
        proxy.start()
        return proxy


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """Launched with the module's first test; the tests that need no registry (first in the
    file) run while it starts. Every test of the module needs the full mlflow package (test
    extra): skipped without it, failed under CI=true."""
    yield from launched_mlflow_server(tmp_path_factory.mktemp("mlflow") / "server")


@pytest.fixture(scope="module")
def registry(mlflow_server: MlflowServer) -> Registry:
    mlflow_server.wait()
    return Registry(mlflow_server, mlflow_server.folder.parent)


def mlflow_settings(tmp_path: Path, cache: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "use_local": False,
        "data_dir": tmp_path / "data",
        "model_cache_dir": cache,
        "jwt_secret": TEST_SECRET,
        "max_batch_size": 4,
        "model_convert_isolated": False,  # in-process: TensorFlow is loaded in tests anyway
        "model_poll_interval_s": 0,
        "model_load_deadline_s": 5,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def manager_for(settings: Settings) -> ModelManager:
    return ModelManager(settings, InferenceService(settings))


def convert_logged(registry: Registry, name: str, version: str, cache: Path) -> None:
    """Convert a registered version's Keras file into `cache` here (TensorFlow is loaded),
    sparing a service process the conversion child's TensorFlow import."""
    path = model_artifact_file(registry.server, name, version, "data/model.keras")
    ModelLoader(Settings(_env_file=None, model_cache_dir=cache)).convert(path)  # type: ignore[call-arg]


def photo(seed: int = 0) -> bytes:
    return jpeg_bytes(random_photo(seed=seed))


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"timed out waiting for {what}")


# -- URIs and settings (no server) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "kind", "name", "extra"),
    [
        ("models:/rottenbot@champion", "alias", "rottenbot", {"alias": "champion"}),
        ("models:/rottenbot/3", "version", "rottenbot", {"version": "3"}),
        ("models:/m-0123abcd", "logged", "m-0123abcd", {}),
        ("runs:/abc123/model", "run", "model", {"run_id": "abc123", "path": "model"}),
        ("mlflow-artifacts:/1/models/m-1/artifacts", "artifact", "m-1", {}),
    ],
)
def test_uri_forms(uri: str, kind: str, name: str, extra: dict[str, str]) -> None:
    ref = parse_model_uri(uri)
    assert (ref.kind, ref.name) == (kind, name)
    for key, value in extra.items():
        assert getattr(ref, key) == value


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("rottenbot", "is not a URI"),
        ("models:/rottenbot", "not a valid models:/ URI"),
        ("models:/rottenbot/Production", "stage and 'latest' URIs are not supported"),
        ("models://profile@databricks/x/1", "not a valid models:/ URI"),
        ("runs:/only-a-run-id", "runs:/<run_id>/<artifact path>"),
        ("ftp://host/model", "unsupported scheme"),
    ],
)
def test_wrong_uris_fail_at_once_with_the_accepted_forms(uri: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match="MODEL_URI") as caught:
        parse_model_uri(uri)
    assert message in str(caught.value)


def test_which_settings_mean_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # mlflow.set_tracking_uri (earlier tests log models) also sets this variable in the process.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def settings(**values: Any) -> Settings:
        return Settings(_env_file=None, data_dir=tmp_path, **values)  # type: ignore[arg-type]

    assert not wants_mlflow(settings())
    assert wants_mlflow(settings(model_uri="models:/rottenbot@champion"))  # USE_LOCAL unset
    assert not wants_mlflow(settings(use_local=True, model_uri="models:/rottenbot@champion"))
    assert wants_mlflow(settings(use_local=False, model_uri="runs:/abc/model"))
    with pytest.raises(ModelLoadError, match="USE_LOCAL=false needs MODEL_URI"):
        wants_mlflow(settings(use_local=False))
    with pytest.raises(ModelLoadError, match="needs MLFLOW_TRACKING_URI"):
        MlflowSource(settings(use_local=False, model_uri="models:/rottenbot/1"))


# -- admin endpoint with a local model (in-process) ------------------------------------------------


def test_admin_reload_is_off_without_a_key(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    assert client.post(RELOAD, headers={"X-Admin-Key": "anything"}).status_code == 404


def test_admin_reload_of_a_local_model(make_client: Callable[..., TestClient]) -> None:
    client = make_client(admin_api_key=ADMIN_KEY)
    assert client.post(RELOAD).status_code == 401
    assert client.post(RELOAD, headers={"X-Admin-Key": ADMIN_KEY + "x"}).status_code == 401
    assert client.post(RELOAD, headers=auth()).status_code == 401  # a user token is not admin
    unchanged = client.post(RELOAD, headers={"X-Admin-Key": ADMIN_KEY})
    assert unchanged.status_code == 200 and unchanged.json()["outcome"] == "unchanged"
    before = client.app.state.rottenbot.service.bundle  # type: ignore[attr-defined]
    swapped = client.post(f"{RELOAD}?reinstall=true", headers={"X-Admin-Key": ADMIN_KEY})
    assert swapped.status_code == 200 and swapped.json()["outcome"] == "swapped"
    after = client.app.state.rottenbot.service.bundle  # type: ignore[attr-defined]
    assert after is not before and after.version == before.version
    body = client.get(MODEL, headers=auth()).json()
    assert body["registry"] is None and body["reload"]["counts"]["swapped"] == 2  # start + this


# -- start-up errors -----------------------------------------------------------------------------


def test_unreachable_registry_retries_with_readiness_false_then_fails(
    tmp_path: Path, shared_cache: Path
) -> None:
    settings = mlflow_settings(
        tmp_path, shared_cache, model_uri="models:/rottenbot@champion",
        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        model_load_deadline_s=6, mlflow_http_retries=0,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        waiting = wait_for(
            lambda: (r := client.get("/health/ready")).status_code == 503
            and "waiting for the model registry" in r.json().get("detail", "") and r.json(),
            60, "readiness to report the registry wait",
        )
        assert waiting["status"] == "loading"
        assert "unreachable" in waiting["detail"]
        failed = wait_for(
            lambda: (r := client.get("/health/ready").json())["status"] == "failed" and r,
            120, "the load to give up",
        )
    assert "gave up after" in failed["detail"]
    assert "MODEL_LOAD_DEADLINE_S" in failed["detail"]


def test_missing_alias_model_or_version_fail_clearly(
    registry: Registry, tmp_path: Path, shared_cache: Path
) -> None:
    version, _ = log_model(registry.url, registry.model(1), "rb-errors")
    cases = {
        "models:/rb-errors@nope": "alias 'nope' of registered model 'rb-errors'",
        "models:/no-such-model@champion": "registered model 'no-such-model'",
        f"models:/rb-errors/{int(version) + 5}": f"version {int(version) + 5}",
        "runs:/0123456789abcdef0123456789abcdef/model": "downloading",
    }
    for uri, message in cases.items():
        settings = mlflow_settings(tmp_path, shared_cache, model_uri=uri,
                                   mlflow_tracking_uri=registry.url)
        started = time.monotonic()
        with pytest.raises(ModelLoadError) as caught:
            manager_for(settings).load_initial()
        assert not isinstance(caught.value, RegistryUnavailable), caught.value
        assert message in str(caught.value), caught.value
        assert time.monotonic() - started < settings.model_load_deadline_s + 30  # no retrying


def test_wrong_uri_stops_the_server_with_a_clear_message(
    registry: Registry, tmp_path: Path
) -> None:
    service = ServiceProcess(
        {"USE_LOCAL": "false", "MODEL_URI": "models:/rottenbot", "MLFLOW_TRACKING_URI":
         registry.url, "DATA_DIR": str(tmp_path / "data")},
        tmp_path / "service.log",
    )
    service.start(wait=False)
    try:
        assert service.process is not None
        code = service.process.wait(timeout=120)
    finally:
        service.stop()
    assert code != 0
    assert "not a valid models:/ URI" in service.log_text()


# -- flavors and class maps ----------------------------------------------------------------------


def test_keras_flavor_with_the_class_map_from_run_id(
    registry: Registry, tmp_path: Path, shared_cache: Path
) -> None:
    """mlflow.keras.log_model, no class map beside it: RUN_ID's index_to_class.json is used."""
    import mlflow

    version, model_run = log_model(registry.url, registry.model(1), "rb-keras", flavor="keras",
                                   classes_in_run=False)
    mlflow.set_tracking_uri(registry.url)
    with mlflow.start_run() as classes_run:
        mlflow.log_dict(class_map(), "index_to_class.json")
    settings = mlflow_settings(
        tmp_path, shared_cache, model_uri=f"models:/rb-keras/{version}",
        mlflow_tracking_uri=registry.url, run_id=classes_run.info.run_id,
    )
    manager = manager_for(settings)
    bundle = manager.load_initial()
    assert bundle.version == version
    assert bundle.class_names == tuple(class_map().values())
    info = manager.describe()
    assert info["run_id"] == model_run
    assert info["registry"]["classes_from"] == f"run {classes_run.info.run_id}"

    # Without RUN_ID, the missing class map is a clear error.
    settings = mlflow_settings(tmp_path / "again", shared_cache,
                               model_uri=f"models:/rb-keras/{version}",
                               mlflow_tracking_uri=registry.url)
    with pytest.raises(ModelLoadError, match=r"no index_to_class\.json"):
        manager_for(settings).load_initial()


def test_onnx_flavor_by_run_and_artifact_uri(
    registry: Registry, tmp_path: Path, shared_cache: Path
) -> None:
    """mlflow.onnx.log_model (external weights file beside model.onnx) loads with no
    conversion, by runs:/ and by mlflow-artifacts:/ URI; outputs match the Keras model."""
    from mlflow import MlflowClient

    from rottenbot_inference.inference import conversion

    keras_path = registry.model(4)
    version, run_id = log_model(registry.url, keras_path, "rb-onnx", flavor="onnx")
    location = MlflowClient(registry.url).get_model_version_download_uri("rb-onnx", version)
    assert location.startswith("mlflow-artifacts:/")
    expected = np.asarray(conversion.load_keras_float32(keras_path)(
        conversion.probe_batch((224, 224, 3), size=2)))
    for uri in (f"runs:/{run_id}/model", location):
        settings = mlflow_settings(tmp_path / uri.split(":")[0], shared_cache, model_uri=uri,
                                   mlflow_tracking_uri=registry.url)
        manager = manager_for(settings)
        bundle = manager.load_initial()
        assert bundle.runtime.name == "onnxruntime"
        assert manager.describe()["run_id"] == run_id
        actual = bundle.predict(conversion.probe_batch((224, 224, 3), size=2))
        np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_wrong_class_count_is_refused_and_the_old_version_keeps_serving(
    registry: Registry, tmp_path: Path, shared_cache: Path
) -> None:
    good, _ = log_model(registry.url, registry.model(4), "rb-classes", flavor="onnx")
    set_alias(registry.url, "rb-classes", "champion", good)
    settings = mlflow_settings(tmp_path, shared_cache, model_uri="models:/rb-classes@champion",
                               mlflow_tracking_uri=registry.url)
    manager = manager_for(settings)
    manager.load_initial()
    # 5 outputs, but the run's index_to_class.json names 28 classes.
    bad, _ = log_model(registry.url, registry.model(5, classes=5), "rb-classes", flavor="onnx")
    set_alias(registry.url, "rb-classes", "champion", bad)
    result = manager.check("poll")
    assert result.outcome == "failed"
    assert result.candidate_version == bad
    assert "expected (1, 28)" in (result.detail or "")
    assert manager.service.bundle is not None
    assert manager.service.bundle.version == good
    assert manager.describe()["reload"]["last_failure"]["candidate_version"] == bad
    assert "was refused" in (manager.warning or "")
    # Not retried on every poll; retried on request.
    assert "refused before" in (manager.check("poll").detail or "")
    assert manager.check("admin", retry_failed=True).outcome == "failed"
    # The alias moving back clears the warning.
    set_alias(registry.url, "rb-classes", "champion", good)
    assert manager.check("poll").outcome == "unchanged"


# -- the served process: hot swap under load, refusal, admin, memory -----------------------------


# One onnxruntime session of the tiny test model costs about this much RSS: the memory bound
# across swaps is sized to it, so that a leaked old session shows.
SESSION_MB = 7.0
CLIENTS = 4  # concurrent request streams across the swap


class RequestStream:
    """A thread sending predict requests one after another, recording every answer."""

    def __init__(self, base_url: str, user: uuid.UUID, pause_s: float = 0.1) -> None:
        self.base_url = base_url
        self.headers = auth(user)
        self.image = photo(7)
        self.pause_s = pause_s
        self.results: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RequestStream:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as client:
            count = 0
            while not self._stop.is_set():
                save = count % 10 == 0  # some saved rows too
                try:
                    response = client.post(
                        f"{PREDICT}?save_prediction={save}&top_k=1",
                        files={"file": ("a.jpg", self.image, "image/jpeg")},
                        headers=self.headers,
                    )
                    body = response.json()
                    self.results.append({"status": response.status_code, **body})
                except httpx.HTTPError as exc:
                    self.results.append({"status": -1, "error": repr(exc)})
                count += 1
                time.sleep(self.pause_s)  # steady, and leaves CPU for the background conversion

    def versions_seen(self) -> list[str]:
        return [r.get("model_version", "?") for r in self.results]


def model_info(base_url: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url}{MODEL}", headers=auth(), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def predicted_version(base_url: str) -> str:
    response = httpx.post(f"{base_url}{PREDICT}", headers=auth(), timeout=60,
                          files={"file": ("a.jpg", photo(1), "image/jpeg")})
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def test_hot_swap_under_load_refuses_a_broken_version_and_frees_memory(
    registry: Registry, tmp_path: Path, shared_cache: Path
) -> None:
    name = "rottenbot"
    v1, run1 = log_model(registry.url, registry.model(1), name)
    set_alias(registry.url, name, "champion", v1)
    convert_logged(registry, name, v1, shared_cache)  # v2's conversion runs in the service
    proxy = registry.proxy()
    service = ServiceProcess(
        {
            "USE_LOCAL": "false",
            "MLFLOW_TRACKING_URI": proxy.url,
            "MODEL_URI": f"models:/{name}@champion",
            "MODEL_POLL_INTERVAL_S": "1",
            "DATA_DIR": str(tmp_path / "data"),
            "MODEL_CACHE_DIR": str(shared_cache),
            "JWT_SECRET": TEST_SECRET,
            "ADMIN_API_KEY": ADMIN_KEY,
            "MAX_BATCH_SIZE": "4",
        },
        tmp_path / "service.log",
    )
    try:
        base = service.start()
        assert "converting" not in service.log_text()  # v1's conversion is cached: none here
        info = model_info(base)
        assert (info["version"], info["run_id"]) == (v1, run1)
        assert info["registry"]["alias"] == "champion"
        assert info["registry"]["classes_from"] == f"run {run1}"
        assert info["serving_from_cache"] is False

        # -- v2 under concurrent request streams: zero non-200 answers --------------------
        # Several clients at once, so that requests are in every stage (reading, queued,
        # computing) at the instant of the swap: a race there would fail one of them.
        user = uuid.uuid4()
        streams = [RequestStream(base, user, pause_s=0.02 * (i + 1)) for i in range(CLIENTS)]
        with contextlib.ExitStack() as running:
            for stream in streams:
                running.enter_context(stream)
            wait_for(lambda: all(len(s.results) >= 5 for s in streams), 120, "the streams")
            v2, run2 = log_model(registry.url, registry.model(2), name)
            set_alias(registry.url, name, "champion", v2)
            wait_for(lambda: all(v2 in s.versions_seen() for s in streams), 300,
                     f"version {v2} to answer every client")
            seen = [len(s.results) for s in streams]
            wait_for(lambda: all(len(s.results) >= n + 10 for s, n in zip(streams, seen,
                                                                          strict=True)),
                     120, "more answers on v2")
        results = [r for s in streams for r in s.results]
        failures = [r for r in results if r["status"] != 200]
        assert not failures, failures[:5]
        for stream in streams:  # each client: v1 until the swap, v2 from then on
            versions = stream.versions_seen()
            switch = versions.index(v2)
            assert set(versions[:switch]) == {v1} and set(versions[switch:]) == {v2}, versions
        confidences = {r["model_version"]: r["confidence"] for r in results}
        assert confidences[v1] != pytest.approx(confidences[v2], abs=1e-6)  # v2 differs
        # Saved rows carry the version that produced them.
        stream = streams[0]
        switch = stream.versions_seen().index(v2)
        for result in (stream.results[0], next(r for r in stream.results[switch:]
                                               if r.get("prediction_uid"))):
            saved = httpx.get(f"{base}/api/v1/inference/predictions/{result['prediction_uid']}",
                              headers=auth(user), timeout=30).json()
            assert saved["model_version"] == result["model_version"]
        info = model_info(base)
        assert (info["version"], info["run_id"]) == (v2, run2)
        swap = info["reload"]["last_swap"]
        assert (swap["trigger"], swap["previous_version"], swap["version"]) == ("poll", v1, v2)
        assert "converted model.keras" in service.log_text()  # the background conversion ran

        # -- a corrupt v3 is refused; v2 keeps serving -----------------------------------
        v3, _ = log_model(registry.url, registry.model(3), name)
        model_artifact_file(registry.server, name, v3, "data/model.keras").write_bytes(
            b"PK\x03\x04 this is not a model" * 10
        )
        set_alias(registry.url, name, "champion", v3)
        failure = wait_for(
            lambda: (model_info(base)["reload"]["last_failure"] or {}).get("candidate_version")
            == v3 and model_info(base)["reload"]["last_failure"],
            180, "v3 to be refused",
        )
        assert "not a valid Keras archive" in failure["detail"]
        assert predicted_version(base) == v2
        ready = httpx.get(f"{base}/health/ready", timeout=30)
        assert ready.status_code == 200 and "refused" in ready.json()["detail"]
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert (metric_value(metrics, "inference_model_reloads_total", trigger="poll",
                             outcome="failed") or 0) >= 1
        assert (metric_value(metrics, "inference_model_reloads_total", trigger="poll",
                             outcome="swapped") or 0) >= 1
        assert metric_value(metrics, "inference_model_registry_reachable") == 1

        # -- the admin endpoint: its own credential, constant-time compared ---------------
        assert httpx.post(f"{base}{RELOAD}", timeout=30).status_code == 401
        assert httpx.post(f"{base}{RELOAD}", headers={"X-Admin-Key": "wrong"},
                          timeout=30).status_code == 401
        assert httpx.post(f"{base}{RELOAD}", headers=auth(), timeout=30).status_code == 401
        retried = httpx.post(f"{base}{RELOAD}", headers={"X-Admin-Key": ADMIN_KEY}, timeout=300)
        assert retried.status_code == 409, retried.text  # v3 tried again, refused again
        assert retried.json()["version"] == v2
        set_alias(registry.url, name, "champion", v2)
        unchanged = httpx.post(f"{base}{RELOAD}", timeout=300,
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert unchanged.status_code == 200 and unchanged.json()["outcome"] == "unchanged"

        # -- memory across swaps: the old bundle is freed ----------------------------------
        rss = [rss_mb(service.pid)]
        for target in (v1, v2) * 3:
            set_alias(registry.url, name, "champion", target)
            # The manager's worker runs one check at a time and answers a reload request
            # once its check is over: the swap done and the old bundle freed (or, if a poll
            # swapped first, after that poll's check). No guessed sleep.
            reloaded = httpx.post(f"{base}{RELOAD}", headers={"X-Admin-Key": ADMIN_KEY},
                                  timeout=300)
            assert reloaded.status_code == 200, reloaded.text
            assert reloaded.json()["version"] == target
            rss.append(rss_mb(service.pid))
        print(f"\nservice RSS (MB) after each swap: {[round(value, 1) for value in rss]}")
        (tmp_path.parent / "mlflow-rss.json").write_text(json.dumps(rss))
        # After the first two swaps (allocator pools settle), four more may not grow RSS by
        # 1.5 sessions' worth: one old session leaked per swap would add 4 x SESSION_MB, one
        # every other swap 2 x. (Measured: within 1.1 MB; docs/models.md.)
        assert max(rss[3:]) - rss[2] < 1.5 * SESSION_MB, rss
        assert "Traceback" not in service.log_text()
    finally:
        service.stop()
        proxy.stop()


def test_restart_with_the_registry_down_serves_the_cached_model(
    registry: Registry, tmp_path: Path, shared_cache: Path
) -> None:
    """The last good version comes from DATA_DIR's cache (no conversion), readiness, the model
    endpoint and /metrics say so; once the registry is back (checked on SIGHUP), all clear."""
    name = "rb-offline"
    v1, _ = log_model(registry.url, registry.model(1), name)
    set_alias(registry.url, name, "champion", v1)
    proxy = registry.proxy()
    env = {
        "USE_LOCAL": "false",
        "MLFLOW_TRACKING_URI": proxy.url,
        "MODEL_URI": f"models:/{name}@champion",
        "MODEL_POLL_INTERVAL_S": "0",  # reload on SIGHUP only
        "DATA_DIR": str(tmp_path / "data"),
        "MODEL_CACHE_DIR": str(shared_cache),
        "JWT_SECRET": TEST_SECRET,
        "MLFLOW_HTTP_RETRIES": "0",
    }
    # A first run fills the cache (downloaded model + conversion).
    manager = manager_for(mlflow_settings(tmp_path, shared_cache,
                                          model_uri=env["MODEL_URI"],
                                          mlflow_tracking_uri=proxy.url))
    assert manager.load_initial().version == v1
    proxy.stop()
    service = ServiceProcess(env, tmp_path / "service.log")
    try:
        base = service.start()
        info = model_info(base)
        assert info["version"] == v1
        assert info["serving_from_cache"] is True
        assert info["registry"]["reachable"] is False
        ready = httpx.get(f"{base}/health/ready", timeout=30).json()
        assert ready["status"] == "ready" and "unreachable" in ready["detail"]
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert metric_value(metrics, "inference_model_serving_from_cache") == 1
        assert metric_value(metrics, "inference_model_registry_reachable") == 0
        assert predicted_version(base) == v1
        log_text = service.log_text()
        assert "serving the last good model from the cache" in log_text
        assert "converting" not in log_text and "downloaded" not in log_text

        proxy.start()
        service.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for(lambda: not model_info(base)["serving_from_cache"], 120, "the registry check")
        info = model_info(base)
        assert info["registry"]["reachable"] is True
        assert "detail" not in httpx.get(f"{base}/health/ready", timeout=30).json()
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert metric_value(metrics, "inference_model_serving_from_cache") == 0
    finally:
        service.stop()
        proxy.stop()
