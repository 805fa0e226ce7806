"""Service configuration, read from environment variables (and an optional `.env` file).

The names of the original deployment (`DATABASE_URL`, `REDIS_HOST`, `JWT_SECRET`, `USE_LOCAL`,
`MODEL_URI`, ...) keep working; every setting has an embedded default so that the service starts
with nothing configured.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rottenbot_inference.resources import cpu_quota

BUNDLED_MODEL_DIR = Path(__file__).parent / "models" / "demo"
DEV_JWT_SECRET = "rottenbot-development-secret-not-for-production"


class Settings(BaseSettings):
    """All configuration of one service process."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    # --- model source -------------------------------------------------------------------
    use_local: bool = Field(True, description="true: model from MODEL_PATH; false: MODEL_URI")
    model_path: Path = Field(
        BUNDLED_MODEL_DIR,
        description="Local model: a .keras file, an .onnx file or an MLflow model directory",
    )
    classes_path: Path | None = Field(
        None, description="index_to_class.json; default: found beside the model"
    )
    model_uri: str | None = Field(None, description="MLflow model URI (USE_LOCAL=false)")
    mlflow_tracking_uri: str | None = None
    run_id: str | None = Field(None, description="MLflow run holding index_to_class.json")
    model_runtime: Literal["auto", "onnxruntime", "openvino", "keras"] = Field(
        "auto",
        description="auto: OpenVINO when it loads and agrees with ONNX Runtime, else ONNX "
        "Runtime; Keras only if conversion fails (see docs/models.md)",
    )
    model_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="OpenVINO precision; auto: bf16 on CPUs with native bf16 (AMX, AVX512-BF16) "
        "when it passes the agreement check at load, else fp32",
    )
    model_agreement_tolerance: float = Field(
        0.05, gt=0, le=1,
        description="Max abs softmax difference from fp32 ONNX Runtime on the probe images for "
        "an OpenVINO model to serve (top-1 must also be identical)",
    )
    verify_tolerance: float = Field(
        1e-4, description="Max abs softmax difference allowed between Keras and ONNX"
    )
    data_dir: Path = Field(Path("data"), description="Writable folder for caches and spools")
    model_cache_dir: Path | None = Field(None, description="Default: DATA_DIR/model-cache")

    # --- MLflow / model registry (see docs/models.md) -----------------------------------
    model_poll_interval_s: float = Field(
        30.0, ge=0, description="How often an alias MODEL_URI is re-resolved (0: never poll)"
    )
    model_load_deadline_s: float = Field(
        300.0, ge=0,
        description="At start, retry an unreachable registry (with backoff) this long, then fail",
    )
    model_load_retry_max_s: float = Field(
        30.0, gt=0, description="Longest wait between two start attempts"
    )
    mlflow_cache_dir: Path | None = Field(
        None, description="Downloaded MLflow models; default DATA_DIR/mlflow-cache"
    )
    mlflow_cache_keep: int = Field(
        3, ge=1, description="Downloaded versions kept besides the ones serving or last good"
    )
    mlflow_http_timeout_s: float = Field(
        30.0, gt=0, description="Timeout of one MLflow HTTP request (MLFLOW_HTTP_REQUEST_TIMEOUT)"
    )
    mlflow_http_retries: int = Field(
        1, ge=0, description="MLflow client retries per request (MLFLOW_HTTP_REQUEST_MAX_RETRIES)"
    )
    model_convert_isolated: bool = Field(
        True, description="Convert Keras models in a child process (TensorFlow never loads here)"
    )
    model_convert_timeout_s: float = Field(
        900.0, gt=0, description="A conversion child running longer than this is killed"
    )
    model_reload_nice: int = Field(
        10, ge=0, le=19, description="Niceness of background conversions (serving keeps the CPU)"
    )
    admin_api_key: SecretStr | None = Field(
        None, description="Credential of /api/v1/admin/*; unset: the admin endpoints are off (404)"
    )

    @model_validator(mode="after")
    def _precision_needs_openvino(self) -> Settings:
        if self.model_precision == "bf16" and self.model_runtime in ("onnxruntime", "keras"):
            raise ValueError(
                f"MODEL_PRECISION=bf16 needs MODEL_RUNTIME=openvino or auto "
                f"(MODEL_RUNTIME={self.model_runtime} computes in fp32 only)"
            )
        return self

    @property
    def keras_fallback(self) -> bool:
        """May an unfaithful or failed ONNX conversion be served by Keras (MODEL_RUNTIME=auto)?"""
        return self.model_runtime == "auto"

    @field_validator("model_uri", "mlflow_tracking_uri", "run_id", "admin_api_key", mode="before")
    @classmethod
    def _empty_registry_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    # --- shadow challenger (see docs/challenger.md) ---------------------------------------
    challenger_uri: str | None = Field(
        None,
        description="A second model scored in the shadow of the serving one (any MODEL_URI "
        "form, or a local path); unset: no challenger, no cost",
    )
    shadow_fraction: float = Field(
        0.1, ge=0, le=1, description="Share of predictions also scored by the challenger"
    )
    shadow_nice: int = Field(
        19, ge=0, le=19,
        description="Niceness of the thread computing the challenger's scores (predictions win)",
    )

    @field_validator("challenger_uri", mode="before")
    @classmethod
    def _empty_challenger_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def mlflow_cache(self) -> Path:
        """Where downloaded MLflow models are kept (by registry version / run / URI)."""
        return self.mlflow_cache_dir or self.data_dir / "mlflow-cache"

    # --- runtime and batching -----------------------------------------------------------
    inference_workers: int | None = Field(
        None, ge=1, le=64,
        description="Threads running batches concurrently on the one model; default: the CPU quota",
    )
    inference_threads: int | None = Field(
        None, ge=1,
        description="ONNX Runtime intra-op threads per run; default: CPU quota / INFERENCE_WORKERS",
    )
    preprocess_threads: int | None = Field(
        None, description="Image decode threads; default: the CPU quota"
    )
    gc_freeze: bool = Field(
        True, description="Exempt start-up objects from garbage collection (no 100 ms GC pauses)"
    )
    max_batch_size: int = Field(8, ge=1, le=256)
    max_batch_delay_ms: float = Field(
        0.0, ge=0,
        description="How long a batch waits for more requests (0: takes what is queued; with one "
        "single-threaded worker per CPU, batching saves little CPU and waiting only adds latency)",
    )
    queue_capacity: int = Field(64, ge=1, description="Queued images beyond which requests get 503")
    request_timeout_s: float = Field(
        10.0, gt=0, description="A request still queued after this is dropped with 503"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 responses")
    max_inflight_requests: int | None = Field(
        None, ge=1,
        description="Predict requests admitted at once (reading, decoding, queued or computing); "
        "more get 503 before their body is read. Default: QUEUE_CAPACITY + MAX_BATCH_SIZE",
    )
    max_queue_wait_ms: float = Field(
        500.0, ge=0,
        description="503 at once when the estimated wait (admitted requests x recent time "
        "between two answers while busy) exceeds this; 0: off",
    )

    @property
    def effective_max_inflight(self) -> int:
        """MAX_INFLIGHT_REQUESTS, or everything the batcher can hold: queue + one batch."""
        return self.max_inflight_requests or self.queue_capacity + self.max_batch_size

    # --- explanations (heatmaps; see docs/explanations.md) -----------------------------
    explain_max_concurrent: int = Field(
        1, ge=1, le=64, description="Explanations computed at once; more get 503 at once"
    )
    explain_grid: int = Field(
        7, ge=2, le=16,
        description="Heatmap cells per side; one explanation costs EXPLAIN_GRID² + 1 model passes",
    )
    explain_batch_size: int = Field(
        8, ge=1, le=256,
        description="Occluded pictures per model run; between runs, queued predictions go first",
    )
    explain_timeout_s: float = Field(
        10.0, gt=0, description="An explanation not finished this long after arrival gets 503"
    )
    explain_shed_at: int | None = Field(
        None, ge=1,
        description="Explanations get 503 while this many predict images are being decoded, "
        "queued or computed. Default: MAX_BATCH_SIZE",
    )
    explain_nice: int = Field(
        10, ge=0, le=19,
        description="Niceness of the explanation threads (predictions keep the CPU)",
    )

    @property
    def effective_explain_shed_at(self) -> int:
        return self.explain_shed_at or self.max_batch_size

    # --- input limits -------------------------------------------------------------------
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Larger uploads get 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Larger images get 413")
    body_read_timeout_s: float = Field(
        15.0, gt=0,
        description="Longest wait for the next piece of a request body; then 408 (slow uploads)",
    )
    request_read_timeout_s: float = Field(
        120.0, gt=0, description="Longest time to receive a whole request body; then 408"
    )
    header_read_timeout_s: float = Field(
        10.0, gt=0,
        description="A connection must finish sending its request headers within this (serve)",
    )
    jpeg_dct_scaling: bool = Field(
        True, description="Let libjpeg-turbo decode large JPEGs at a reduced scale (faster)"
    )

    # --- auth ---------------------------------------------------------------------------
    jwt_secret: SecretStr = SecretStr(DEV_JWT_SECRET)
    jwt_algorithm: str = Field(
        "HS256", description="The only algorithm accepted (HS256/384/512, RS*, PS*, ES*, EdDSA)"
    )
    jwt_leeway_s: float = Field(10.0, ge=0, description="Clock skew allowed on exp (seconds)")
    jwt_public_key_file: Path | None = Field(
        None, description="PEM public key for asymmetric JWT_ALGORITHM (RS256, ES256, ...)"
    )
    jwt_jwks_url: str | None = Field(
        None, description="JWKS for asymmetric JWT_ALGORITHM: an http(s) URL or a file path"
    )
    jwt_jwks_cache_s: float = Field(
        300.0, gt=0, description="How long fetched JWKS keys are used before refetching"
    )
    jwt_audience: str | None = Field(None, description="Required 'aud' claim when set")
    jwt_issuer: str | None = Field(None, description="Required 'iss' claim when set")
    redis_host: str | None = Field(
        None, description="Revocation store (auth service logout); unset: in-process blocklist"
    )
    redis_port: int = 6379
    redis_password: SecretStr | None = None
    redis_timeout_s: float = Field(
        0.5, gt=0, description="Connect/read timeout of one revocation check"
    )
    auth_fail_open: bool = Field(
        False, description="Accept tokens unchecked while Redis is down (default: 503)"
    )
    rate_limit_per_minute: float | None = Field(
        None, gt=0,
        description="Per-user predict requests per minute (token bucket in Redis, shared by "
        "replicas; in-process without REDIS_HOST); unset: no limit",
    )
    rate_limit_burst: int | None = Field(
        None, ge=1,
        description="Bucket size: requests a user may send at once; default RATE_LIMIT_PER_MINUTE",
    )

    @field_validator("max_inflight_requests", "rate_limit_per_minute", "rate_limit_burst",
                     "explain_shed_at", mode="before")
    @classmethod
    def _empty_limit_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def effective_rate_limit_burst(self) -> int:
        """The bucket's size (at least one request)."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1, int(self.rate_limit_per_minute or 1))

    @field_validator(
        "jwt_public_key_file", "jwt_jwks_url", "jwt_audience", "jwt_issuer", "redis_host",
        "redis_password", mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`REDIS_HOST=` (as compose files often write) means unset, not an empty host."""
        return None if isinstance(value, str) and not value.strip() else value

    # --- persistence (saved predictions: outbox -> image store + database) ---------------
    database_url: SecretStr | None = Field(
        None,
        description="postgresql+asyncpg://user:pass@host:5432/db; unset: SQLite in DATA_DIR",
    )
    database_timeout_s: float = Field(5.0, gt=0, description="Connect/statement timeout")
    database_pool_size: int = Field(5, ge=1)
    migrate_on_start: bool = Field(True, description="Run Alembic migrations on start")
    image_store: Literal["auto", "local", "s3"] = Field(
        "auto", description="auto: S3 when LOCAL_S3_PROXY_SERVICE_URL is set, else a folder"
    )
    images_dir: Path | None = Field(None, description="Local image store; default DATA_DIR/images")
    local_s3_proxy_service_url: str | None = Field(None, description="S3/MinIO endpoint URL")
    minio_root_user: str | None = Field(None, description="S3 access key")
    minio_root_password: SecretStr | None = Field(None, description="S3 secret key")
    s3_bucket: str = Field("images", description="Bucket for images (created if missing)")
    s3_region: str = "us-east-1"
    s3_timeout_s: float = Field(5.0, gt=0, description="S3 connect/read timeout")
    s3_max_attempts: int = Field(2, ge=1, description="botocore attempts per S3 call")
    outbox_dir: Path | None = Field(None, description="Durable save spool; default DATA_DIR/outbox")
    outbox_max_items: int = Field(10_000, ge=1, description="Pending saves beyond which: 503")
    outbox_max_bytes: int = Field(
        512 * 1024**2, ge=1, description="Pending image bytes beyond which saves get 503"
    )
    outbox_min_free_bytes: int = Field(
        64 * 1024**2, ge=0, description="Saves get 503 when the outbox volume would keep less free"
    )
    outbox_min_free_percent: float = Field(
        5.0, ge=0, lt=100, description="Same, as a share of the volume (the larger reserve wins)"
    )
    outbox_ballast_bytes: int = Field(
        8 * 1024**2, ge=0, description="Space held back to drain from a volume others filled"
    )
    outbox_park_retry_s: float = Field(
        300.0, gt=0, description="Retry delay of items that failed permanently (access denied, "
        "a row the database rejects)"
    )
    outbox_batch_size: int = Field(16, ge=1, description="Items drained per database insert")
    outbox_upload_concurrency: int = Field(4, ge=1, description="Parallel image uploads")
    outbox_retry_base_s: float = Field(0.5, gt=0, description="First retry delay")
    outbox_retry_max_s: float = Field(30.0, gt=0, description="Longest retry delay")
    outbox_shutdown_grace_s: float = Field(
        10.0, ge=0, description="On shutdown, keep draining this long; the rest stays durable"
    )

    @field_validator(
        "database_url", "local_s3_proxy_service_url", "minio_root_user", "minio_root_password",
        mode="before",
    )
    @classmethod
    def _empty_storage_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    # --- HTTP server --------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(1, ge=1)
    log_level: str = "info"
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        description="After SIGTERM/SIGINT: report not ready and refuse new API requests (503) "
        "this long before closing the listener, so load balancers stop sending traffic",
    )
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Once the listener is closed: how long in-flight requests may take to "
        "finish before they are cancelled",
    )

    # --- telemetry (traces, metrics, logs; see docs/observability.md) --------------------
    alloy_endpoint: str | None = Field(
        None, description="OTLP gRPC endpoint of the collector, e.g. http://alloy:4317"
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        None, description="Standard OTLP endpoint (wins over ALLOY_ENDPOINT); unset: no export"
    )
    otel_exporter_otlp_protocol: Literal["grpc", "http/protobuf", "http/json"] | None = Field(
        None, description="grpc (default) or http/protobuf"
    )
    otel_service_name: str = Field(
        "inference_service", description="service.name resource and service_name metric label"
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto: JSON unless stderr is a terminal"
    )
    access_log: bool = Field(True, description="One log line per HTTP request")

    @field_validator(
        "alloy_endpoint", "otel_exporter_otlp_endpoint", "otel_exporter_otlp_protocol",
        mode="before",
    )
    @classmethod
    def _empty_telemetry_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def cache_dir(self) -> Path:
        """Where converted models are cached."""
        return self.model_cache_dir or self.data_dir / "model-cache"

    @cached_property
    def cpu_count(self) -> int:
        """CPUs this process may use (cgroup quota and affinity)."""
        return cpu_quota()

    @property
    def effective_inference_workers(self) -> int:
        return self.inference_workers or self.cpu_count

    @property
    def effective_inference_threads(self) -> int:
        return self.inference_threads or max(1, self.cpu_count // self.effective_inference_workers)

    @property
    def effective_preprocess_threads(self) -> int:
        return self.preprocess_threads or self.cpu_count

    @property
    def uses_dev_secret(self) -> bool:
        symmetric = self.jwt_algorithm.upper().startswith("HS")
        return symmetric and self.jwt_secret.get_secret_value() == DEV_JWT_SECRET
