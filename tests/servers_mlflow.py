"""A real `mlflow server` on loopback for tests, a TCP proxy to cut it off, and model logging.

The server keeps its backend store in SQLite and serves artifacts from a local folder
(`--artifacts-destination`), so clients download through `mlflow-artifacts:/` over HTTP, like
RottenBot's deployment. Starting it is slow (tens of seconds on a loaded 2-core machine):
start one per test module. Its background job runner (huey consumers) is switched off.

"Registry down" is simulated with `TcpProxy`: the service talks to the proxy, and stopping
the proxy refuses connections at once, without paying for another server start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import (
    CLASS_COUNT,
    build_tiny_keras,
    class_map,
    free_port,
    require_import,
    stop_process,
)


class MlflowServer:
    """`mlflow server` with a SQLite store and a local artifact root in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "mlflow-server.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 300) -> None:
        self.launch()
        self.wait(timeout_s)

    def launch(self) -> None:
        """Start the process without waiting for it (tests can run meanwhile)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends all its children
            )

    def wait(self, timeout_s: float = 300) -> None:
        """Until /health answers (raises with the log's tail if the server dies or hangs)."""
        assert self._process is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server did not start: {self.log_tail()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target port; `stop()` cuts every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class ServiceProcess:
    """`python -m rottenbot_inference serve` on a free loopback port, with its pid (for RSS and
    SIGHUP) and its log."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, wait: bool = True, timeout_s: float = 300) -> str:
        from tests.helpers import wait_ready

        port = free_port()
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "LOG_FORMAT": "text",
               **self.env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rottenbot_inference", "serve"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        self.base_url = f"http://127.0.0.1:{port}"
        if wait:
            try:
                wait_ready(self.base_url, timeout_s=timeout_s, process=self.process)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}; log:\n{self.log_tail()}") from exc
        return self.base_url

    def stop(self, timeout_s: float = 60) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        stop_process(process, timeout_s)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]


# -- models, logged the way RottenBot's training pipeline logs them ---------------------------


def build_keras(folder: Path, seed: int, classes: int = CLASS_COUNT) -> Path:
    """A small mixed_float16 Keras model (224x224x3 -> `classes` softmax); seeds differ in
    their outputs."""
    return build_tiny_keras(folder, seed=seed, classes=classes)


def log_model(
    tracking_uri: str,
    model_path: Path,
    registered_name: str,
    flavor: str = "tensorflow",
    classes: dict[str, str] | None = None,
    classes_in_run: bool = True,
) -> tuple[str, str]:
    """Log a Keras model file as the training pipeline does and register it.

    `flavor`: "tensorflow" (the old pipeline: `mlflow.tensorflow.log_model` of the Keras
    model, plus `index_to_class.json` logged in the run), "keras" or "onnx" (converted here).
    pip_requirements are given only to skip MLflow's slow requirement inference; the model
    layout is the same. An `.onnx` file is logged as it is (flavor "onnx", no Keras import).
    Returns (registered version, run id).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    mlflow.set_experiment("rottenbot")
    if model_path.suffix == ".onnx":
        flavor, model = "onnx", None
    else:
        import keras

        model = keras.saving.load_model(model_path, compile=False)
    with mlflow.start_run() as run:
        if classes_in_run:
            mlflow.log_dict(classes or class_map(), "index_to_class.json")
        if flavor == "tensorflow":
            info = mlflow.tensorflow.log_model(
                model, name="model", registered_model_name=registered_name,
                pip_requirements=["tensorflow"],
            )
        elif flavor == "keras":
            info = mlflow.keras.log_model(
                model, name="model", registered_model_name=registered_name,
                pip_requirements=["keras", "tensorflow"],
            )
        elif flavor == "onnx":
            if model is None:
                import onnx

                proto = onnx.load(model_path)
            else:
                from rottenbot_inference.inference import conversion

                proto = conversion.convert(conversion.load_keras_float32(model_path))
            info = mlflow.onnx.log_model(
                proto, name="model", registered_model_name=registered_name,
                pip_requirements=["onnxruntime"],
            )
        else:
            raise ValueError(flavor)
    return str(info.registered_model_version), run.info.run_id


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(
        name, alias, version
    )


def model_artifact_file(server: MlflowServer, name: str, version: str, relative: str) -> Path:
    """The on-disk file behind a registered version's artifact (to damage it in tests)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    location = client.get_model_version_download_uri(name, version)  # mlflow-artifacts:/...
    path = location.split(":", 1)[1].lstrip("/")
    return server.folder / "artifacts" / path / relative


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """A sample's value from Prometheus text (labels must all match); None if absent."""
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{", 1)[0] != name:
            continue
        if all(f'{key}="{val}"' in head for key, val in labels.items()):
            return float(value)
    return None


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)


def launched_mlflow_server(folder: Path) -> Iterator[MlflowServer]:
    """A module fixture's body: an `mlflow server` launched now (not waited for), stopped after.

    Every test that uses it needs the full mlflow package (test extra): skipped without it,
    failed under CI=true.
    """
    require_import("mlflow.server", "the full mlflow package (test extra) is needed")
    server = MlflowServer(folder)
    server.launch()
    try:
        yield server
    finally:
        server.stop()
