"""The deployment files, checked here without a Docker engine or a cluster, with real tools:

- Dockerfile: hadolint; its structure (slim runtime stage without TensorFlow, non-root user,
  readiness HEALTHCHECK); the runtime recipe rehearsed: the service started with the image's
  environment and TensorFlow made unimportable serves the bundled model, and the image's own
  HEALTHCHECK command follows readiness; the `with-model` recipe (`convert`, then serve).
- deploy/docker-compose.yaml: the compose-spec JSON schema (check-jsonschema's copy) and Docker
  Compose's own loader (`docker-compose config`), the files it mounts, the variables it needs.
- deploy/kubernetes: rendered by kustomize (kubectl's), validated against the Kubernetes JSON
  schemas (kubernetes-validate, strict), and the cross-references and shutdown arithmetic.
- Every variable handed to the service is a real setting, and the values parse.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy_files import (
    DEPLOY,
    KUBERNETES,
    REPO,
    SETTING_NAMES,
    compose_binary,
    dockerfile_stages,
    env_file,
    healthcheck_command,
    require,
    run,
    settings_from,
    stage_env,
    unknown_setting_names,
    venv_tool,
    yaml_documents,
)
from tests.helpers import TEST_SECRET, auth, free_port, jpeg_bytes, random_photo, running_server

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
OVERLAY = KUBERNETES / "overlays" / "example"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # oldest supported upstream here .. newest bundled
TELEMETRY_FLUSH_S = 5  # 2 s at app shutdown + 3 s at exit (docs/observability.md)
BLOCKED = ("tensorflow", "keras", "tf2onnx")


def _stage(name: str):
    return {stage.name: stage for stage in dockerfile_stages(DOCKERFILE)}[name]


def _blocker(folder: Path) -> Path:
    """A PYTHONPATH folder on which `import tensorflow` (keras, tf2onnx) fails: the slim image."""
    for module in BLOCKED:
        (folder / module).mkdir(parents=True)
        (folder / module / "__init__.py").write_text(
            f"raise ImportError('{module} is not in the runtime image')\n"
        )
    return folder


# -- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = venv_tool("hadolint")
    result = run([hadolint, "--format", "json", DOCKERFILE])
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout or "[]") == []
    # The linter is live: a careless Dockerfile does not pass.
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN apt-get install curl\nRUN cd /src\n")
    codes = {item["code"] for item in json.loads(run([hadolint, "-f", "json", careless]).stdout)}
    assert {"DL3006", "DL3008", "DL3003"} <= codes


def test_dockerfile_stages_keep_tensorflow_and_root_out_of_the_runtime() -> None:
    stages = dockerfile_stages(DOCKERFILE)
    by_name = {stage.name: stage for stage in stages}
    assert stages[-1].name == "runtime", "the default target must be the slim runtime"
    for name in ("runtime", "with-model", "keras"):
        assert by_name[name].base == "base"
    base = by_name["base"]
    (user,) = base.args("USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0  # numeric: runAsNonRoot
    assert "/health/ready" in " ".join(healthcheck_command(base))
    assert all("curl" not in rest and "wget" not in rest for _, rest in base.instructions)
    assert stage_env(base)["MODEL_RUNTIME"] == "openvino"
    # The slim images copy the builder's venv (the runtime lock only), cut by the `slim` stage.
    assert by_name["slim"].base == "builder"
    assert "slim_venv.py" in " ".join(by_name["slim"].args("RUN"))
    for name in ("runtime", "with-model"):
        assert "--from=slim /opt/venv /opt/venv" in by_name[name].args("COPY")
    assert (by_name["builder"].base, by_name["deps"].base) == ("deps", "${PYTHON_IMAGE}")
    builder = " ".join(rest for name in ("deps", "builder") for instruction in ("RUN", "COPY")
                       for rest in by_name[name].args(instruction))
    assert "requirements/runtime.txt" in builder and "test.txt" not in builder
    runtime_lock = (REPO / "requirements" / "runtime.txt").read_text()
    for package in ("tensorflow", "keras", "tf2onnx"):
        assert not re.search(rf"^{package}[-a-z]*==", runtime_lock, re.M), package
    # Only the converter path brings TensorFlow in, and `with-model` takes just its /model.
    assert by_name["builder-keras"].base == "deps-keras"
    assert by_name["deps-keras"].base == "deps"
    assert "tensorflow-cpu" in " ".join(by_name["deps-keras"].args("RUN"))
    assert "--from=converter /model /opt/model" in by_name["with-model"].args("COPY")
    # Everything the build COPYs from the context survives .dockerignore.
    kept = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.startswith("!")}
    for stage in stages:
        for rest in stage.args("COPY"):
            if "--from=" not in rest:
                for source in rest.split()[:-1]:
                    assert source.rstrip("/") in kept, f"{source} is excluded by .dockerignore"
                    assert (REPO / source).exists()


def test_runtime_recipe_serves_without_tensorflow_and_healthcheck_follows_readiness(
    tmp_path: Path,
) -> None:
    """The slim image's environment, TensorFlow unimportable: the bundled model still serves."""
    base = _stage("base")
    healthcheck = healthcheck_command(base)
    assert healthcheck[0] == "python"
    # HOST and PORT come from running_server (loopback, a free port).
    image_env = {k: v for k, v in stage_env(base).items()
                 if k in SETTING_NAMES and k not in ("HOST", "PORT")}
    port = free_port()
    env = {
        **image_env,
        "DATA_DIR": str(tmp_path / "data"),  # the image's /var/lib/rottenbot volume
        "PYTHONPATH": str(_blocker(tmp_path / "blocked")),
        "JWT_SECRET": TEST_SECRET,
    }

    def probe() -> subprocess.CompletedProcess[str]:
        return run([sys.executable, *healthcheck[1:]], env={**os.environ, "PORT": str(port)})

    down = probe()
    assert down.returncode != 0 and "not ready" in down.stderr
    # running_server picks its own port: give the healthcheck that one.
    with running_server(env, tmp_path / "server.log") as url:
        port = int(url.rsplit(":", 1)[1])
        assert probe().returncode == 0
        response = httpx.post(
            f"{url}/api/v1/inference/predict",
            headers=auth(),
            files={"file": ("photo.jpg", jpeg_bytes(random_photo()), "image/jpeg")},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        model = httpx.get(f"{url}/api/v1/inference/model", headers=auth(), timeout=10).json()
    assert model["runtime"]["name"] == "openvino"
    assert "is not in the runtime image" not in (tmp_path / "server.log").read_text()


def test_with_model_recipe_converts_at_build_and_serves_without_tensorflow(
    tmp_path: Path, tiny_model: Path
) -> None:
    """`docker build --target with-model`: convert in the build stage, serve without TF."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model.parent, model, ignore=shutil.ignore_patterns("onnx-cache"))
    cli = [sys.executable, "-m", "rottenbot_inference"]
    clean = {k: v for k, v in os.environ.items() if k not in ("MODEL_CACHE_DIR", "DATA_DIR")}
    converted = run([*cli, "convert", model], env={**clean, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert converted.returncode == 0, converted.stderr[-2000:]
    (entry,) = (model / "onnx-cache").glob("*.onnx")
    assert entry.stat().st_size > 0
    again = run([*cli, "convert", model], env={**clean, "PYTHONPATH": str(_blocker(
        tmp_path / "blocked"))})
    assert again.returncode == 0, again.stderr[-2000:]  # cached: TensorFlow not even imported
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes(random_photo()))
    served = run(
        [*cli, "predict", "--model", model, "--json", image],
        env={
            **clean,
            **stage_env(_stage("base")),
            "PATH": os.environ["PATH"],
            "DATA_DIR": str(tmp_path / "data"),
            "PYTHONPATH": str(tmp_path / "blocked"),
        },
    )
    assert served.returncode == 0, served.stderr[-2000:]
    assert json.loads(served.stdout)["predicted_class_name"]
    # Nothing converted at serve time (OpenVINO's compiled-model cache may be there).
    assert not list((tmp_path / "data").rglob("*.onnx"))


# -- docker-compose -------------------------------------------------------------------------


def _compose_config(env_path: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with nothing from this process's environment interpolated."""
    return run(
        [compose_binary(), "-f", COMPOSE, "--env-file", env_path, "config", "--format", "json"],
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(home)},
    )


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    result = _compose_config(ENV_EXAMPLE, tmp_path_factory.mktemp("home"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    checker = venv_tool("check-jsonschema")
    result = run([checker, "--builtin-schema", "vendor.compose-spec", COMPOSE])
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:"))
    assert run([checker, "--builtin-schema", "vendor.compose-spec", broken]).returncode != 0


def test_compose_stack_resolves_with_the_example_env(compose_config: dict) -> None:
    services = compose_config["services"]
    assert {"inference", "postgres", "redis", "minio", "minio-init", "mlflow", "otel-collector",
            "prometheus", "grafana"} <= set(services)
    settings = settings_from(services["inference"]["environment"])
    example = env_file(ENV_EXAMPLE)
    assert settings.jwt_secret.get_secret_value() == example["JWT_SECRET"]
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == (
        f"postgresql+asyncpg://{example['POSTGRES_USER']}:{example['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{example['POSTGRES_DB']}"
    )
    assert (settings.redis_host, settings.redis_port) == ("redis", 6379)
    assert settings.redis_password is not None
    assert settings.redis_password.get_secret_value() == example["REDIS_PASSWORD"]
    assert settings.local_s3_proxy_service_url == "http://minio:9000"
    assert settings.alloy_endpoint == "http://otel-collector:4317"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    assert settings.use_local is True and settings.model_uri is None
    # Redis and MinIO get the passwords the service uses.
    assert example["REDIS_PASSWORD"] in services["redis"]["command"]
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == example[
        "MINIO_ROOT_PASSWORD"]


def test_compose_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    partial = tmp_path / ".env"
    partial.write_text(
        "".join(line + "\n" for line in ENV_EXAMPLE.read_text().splitlines()
                if not line.startswith("JWT_SECRET="))
    )
    result = _compose_config(partial, tmp_path)
    assert result.returncode != 0
    assert "set JWT_SECRET in deploy/.env" in result.stderr


def test_compose_old_deployment_names_win(tmp_path: Path) -> None:
    """An old .env that sets DATABASE_URL, REDIS_HOST, ... directly keeps working."""
    old = tmp_path / ".env"
    old.write_text(
        ENV_EXAMPLE.read_text()
        + "DATABASE_URL=postgresql+asyncpg://admin:admin@db.internal:5432/db\n"
        "REDIS_HOST=cache.internal\nALLOY_ENDPOINT=http://alloy:4317\n"
        "USE_LOCAL=false\nMODEL_URI=models:/rottenbot@champion\nRUN_ID=abc123\n"
    )
    result = _compose_config(old, tmp_path)
    assert result.returncode == 0, result.stderr
    settings = settings_from(json.loads(result.stdout)["services"]["inference"]["environment"])
    assert settings.database_url is not None
    assert "db.internal" in settings.database_url.get_secret_value()
    assert settings.redis_host == "cache.internal"
    assert settings.alloy_endpoint == "http://alloy:4317"
    assert (settings.use_local, settings.model_uri, settings.run_id) == (
        False, "models:/rottenbot@champion", "abc123")


def test_compose_mounts_and_side_configs_fit_together(compose_config: dict) -> None:
    services = compose_config["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: {volume['source']}"
    # The image's HEALTHCHECK is inherited; the shutdown budget fits the stop grace period.
    inference = services["inference"]
    env = inference["environment"]
    budget = (float(env["SHUTDOWN_DELAY_S"]) + float(env["SHUTDOWN_TIMEOUT_S"])
              + float(env["OUTBOX_SHUTDOWN_GRACE_S"]) + TELEMETRY_FLUSH_S)
    grace = inference["stop_grace_period"]
    assert budget <= int(grace.rstrip("s")), (budget, grace)
    # Prometheus scrapes the service's port; the collector listens where ALLOY_ENDPOINT points.
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yaml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "inference_service"]
    assert job["dns_sd_configs"][0]["names"] == ["inference"]
    assert job["dns_sd_configs"][0]["port"] == 8000
    collector = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    assert env["ALLOY_ENDPOINT"].endswith(":4317")
    for pipeline in collector["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(collector[kind])
    # Grafana: the provisioned data source and the folder the dashboard is mounted into.
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "rottenbot.yaml").read_text())[
        "providers"]
    targets = [v["target"] for v in services["grafana"]["volumes"]]
    assert f"{provider['options']['path']}/inference-dashboard.json" in targets
    json.loads((DEPLOY / "grafana" / "inference-dashboard.json").read_text())


# -- Kubernetes -----------------------------------------------------------------------------


def _kustomize(folder: Path) -> list[dict]:
    result = run([venv_tool("kubectl"), "kustomize", folder])
    assert result.returncode == 0, result.stderr
    return yaml_documents(result.stdout)


@pytest.fixture(scope="module", params=["base", "overlays/example"])
def rendered(request: pytest.FixtureRequest) -> list[dict]:
    return _kustomize(KUBERNETES / request.param)


def _one(documents: list[dict], kind: str) -> dict:
    (found,) = [doc for doc in documents if doc["kind"] == kind]
    return found


def test_manifests_match_the_kubernetes_schemas(rendered: list[dict]) -> None:
    validator = require_validator()
    kinds = {doc["kind"] for doc in rendered}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "ServiceAccount"} <= kinds
    for version in KUBERNETES_VERSIONS:
        for document in rendered:
            validator.validate(document, version, strict=True)
    # Strict validation is live: a misspelt field is refused.
    deployment = json.loads(json.dumps(_one(rendered, "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(validator.ValidationError):
        validator.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def require_validator():
    try:
        import kubernetes_validate
    except ImportError:
        require(None, "kubernetes-validate")
    return kubernetes_validate


def test_deployment_probes_resources_and_references(rendered: list[dict]) -> None:
    deployment = _one(rendered, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    config_map = _one(rendered, "ConfigMap")
    config = config_map["data"]
    # Probes: startup and liveness on /health/live, readiness on /health/ready, on the port.
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == int(config["PORT"])
    for probe, path in (("startupProbe", "/health/live"), ("livenessProbe", "/health/live"),
                        ("readinessProbe", "/health/ready")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    # Resources: Guaranteed QoS, whole CPUs, and thread pools sized from the CPU limit.
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    assert float(resources["limits"]["cpu"]).is_integer()
    env = {item["name"]: item for item in container.get("env", [])}
    for name in ("INFERENCE_WORKERS", "PREPROCESS_THREADS"):
        field = env[name]["valueFrom"]["resourceFieldRef"]
        assert (field["resource"], field["containerName"]) == ("limits.cpu", container["name"])
    # Config and secret by reference; the ConfigMap name carries kustomize's hash suffix.
    sources = {next(iter(s)): next(iter(s.values()))["name"] for s in container["envFrom"]}
    assert sources["configMapRef"] == config_map["metadata"]["name"]
    assert sources["secretRef"] == "rottenbot-inference-secrets"
    # The outbox (DATA_DIR) on a volume; the root filesystem read-only, the user not root.
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[config["DATA_DIR"]]]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (user,) = _stage("base").args("USER")
    assert pod["spec"]["securityContext"]["runAsUser"] == int(user.split(":")[0])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # Service, PDB and HPA point at these pods / this Deployment.
    service = _one(rendered, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = _one(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one(rendered, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["maxUnavailable"] < hpa["spec"][
        "minReplicas"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the count


def test_termination_grace_covers_the_drain(rendered: list[dict]) -> None:
    """preStop + SHUTDOWN_DELAY_S + SHUTDOWN_TIMEOUT_S + OUTBOX_SHUTDOWN_GRACE_S + flush."""
    pod = _one(rendered, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = settings_from(_one(rendered, "ConfigMap")["data"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    budget = (float(command[1]) + config.shutdown_delay_s + config.shutdown_timeout_s
              + config.outbox_shutdown_grace_s + TELEMETRY_FLUSH_S)
    assert budget <= pod["terminationGracePeriodSeconds"], budget
    # In-flight requests can finish: a queued one gives up after REQUEST_TIMEOUT_S.
    assert config.request_timeout_s <= config.shutdown_timeout_s


def test_statefulset_overlay_keeps_each_outbox_on_a_claim_and_the_pod_unchanged() -> None:
    """overlays/statefulset: schema-valid, no Deployment, the base pod template but for `data`
    (a volumeClaimTemplate instead of an emptyDir), and Services/HPA/PDB pointing at it."""
    validator = require_validator()
    rendered = _kustomize(KUBERNETES / "overlays" / "statefulset")
    for version in KUBERNETES_VERSIONS:
        for document in rendered:
            validator.validate(document, version, strict=True)
    kinds = [doc["kind"] for doc in rendered]
    assert "Deployment" not in kinds and kinds.count("StatefulSet") == 1
    statefulset = _one(rendered, "StatefulSet")
    base = _one(_kustomize(KUBERNETES / "base"), "Deployment")
    pod, base_pod = statefulset["spec"]["template"], base["spec"]["template"]
    # Same pod: containers, security, grace, labels; only the data volume differs.
    assert pod["metadata"] == base_pod["metadata"]
    assert {k: v for k, v in pod["spec"].items() if k != "volumes"} == {
        k: v for k, v in base_pod["spec"].items() if k != "volumes"}
    config = _one(rendered, "ConfigMap")["data"]
    (container,) = pod["spec"]["containers"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    data = mounts[config["DATA_DIR"]]
    assert data not in {volume["name"] for volume in pod["spec"]["volumes"]}
    (claim,) = [c for c in statefulset["spec"]["volumeClaimTemplates"]
                if c["metadata"]["name"] == data]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert statefulset["spec"]["selector"] == base["spec"]["selector"]
    assert "replicas" not in statefulset["spec"]  # the HPA owns the count
    # The governing Service is headless; both Services, the PDB and the HPA find these pods.
    services = {doc["metadata"]["name"]: doc for doc in rendered if doc["kind"] == "Service"}
    headless = services[statefulset["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    labels = pod["metadata"]["labels"]
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
    assert _one(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() \
        <= labels.items()
    target = _one(rendered, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", statefulset["metadata"]["name"])


# -- variable names -------------------------------------------------------------------------


def test_every_variable_handed_to_the_service_is_a_setting(rendered: list[dict]) -> None:
    config = _one(rendered, "ConfigMap")["data"]
    assert not unknown_setting_names(config)
    settings_from(config)  # the values parse (types, ranges)
    (container,) = _one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert not unknown_setting_names(item["name"] for item in container.get("env", []))
    secret_keys = env_file(OVERLAY / "secret.example.env")
    assert not unknown_setting_names(secret_keys)
    assert {"JWT_SECRET", "REDIS_PASSWORD", "DATABASE_URL"} <= set(secret_keys)


def test_compose_and_env_example_names_are_real(compose_config: dict) -> None:
    inference_env = compose_config["services"]["inference"]["environment"]
    assert not unknown_setting_names(inference_env)
    # .env.example: each variable (also the commented options) is a setting or used by compose.
    interpolated = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text()))
    for name in env_file(ENV_EXAMPLE, commented=True):
        assert name in SETTING_NAMES or name in interpolated, name
    assert not [name for name in interpolated if name not in env_file(ENV_EXAMPLE, True)
                and name not in inference_env], "every compose variable is in .env.example"


def test_alert_rules_load_and_use_only_metrics_the_service_exports() -> None:
    """deploy/prometheus-alerts.yaml: well-formed rules, mounted where prometheus.yaml reads
    them, over metric names the service really exports (a renamed metric would silence an
    alert without anyone noticing)."""
    rules_file = DEPLOY / "prometheus-alerts.yaml"
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yaml").read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yaml"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    assert "./prometheus-alerts.yaml:/etc/prometheus/alerts.yaml:ro" in (
        compose["services"]["prometheus"]["volumes"]
    )
    exported = set(re.findall(
        r'"(inference_[a-z_]+)"',
        (Path(__file__).parents[1] / "src/rottenbot_inference/telemetry/metrics.py").read_text(),
    ))
    alerts = [rule for group in groups for rule in group["rules"]]
    assert {"InferenceOutboxRefusingSaves", "InferenceOutboxVolumeLow"} <= {
        rule["alert"] for rule in alerts
    }
    for rule in alerts:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule
        assert rule["labels"]["severity"] in {"warning", "critical"}
        names = set(re.findall(r"\binference_[a-z_]+", rule["expr"]))
        assert names and names <= exported, (rule["alert"], names - exported)
    promtool = shutil.which("promtool")  # Debian's prometheus package, where installed
    if promtool is not None:
        checked = subprocess.run([promtool, "check", "rules", str(rules_file)],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
