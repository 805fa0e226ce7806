"""create_app(settings): wiring and lifecycle of one service process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from rottenbot_inference import __version__
from rottenbot_inference.api import (
    admin,
    challenger_admin,
    comparison,
    explain,
    health,
    model,
    predict,
    predictions,
)
from rottenbot_inference.api.admission import PREDICT_PATH, AdmissionMiddleware
from rottenbot_inference.api.disconnect import CancelOnDisconnect
from rottenbot_inference.api.docs import DOCS_CSP, install_docs
from rottenbot_inference.api.draining import DrainingMiddleware
from rottenbot_inference.api.errors import install_error_handlers
from rottenbot_inference.api.explain_admission import EXPLAIN_PATH, ExplainAdmissionMiddleware
from rottenbot_inference.api.headers import SecurityHeadersMiddleware
from rottenbot_inference.api.limits import (
    MULTIPART_OVERHEAD,
    BodyReadTimeoutMiddleware,
    BodySizeLimitMiddleware,
)
from rottenbot_inference.api.state import AppState, Phase
from rottenbot_inference.auth.blocklist import start_blocklist
from rottenbot_inference.auth.ratelimit import build_rate_limiter
from rottenbot_inference.auth.tokens import build_verifier
from rottenbot_inference.heap import freeze_startup_objects
from rottenbot_inference.inference.explainer import Explainer
from rottenbot_inference.inference.loader import ModelLoadError
from rottenbot_inference.inference.reloader import ModelManager
from rottenbot_inference.inference.service import InferenceService
from rottenbot_inference.settings import Settings
from rottenbot_inference.shutdown import GracefulShutdown
from rottenbot_inference.storage.service import PredictionStore
from rottenbot_inference.telemetry import TelemetryMiddleware, setup_telemetry, traced
from rottenbot_inference.telemetry import metrics as telemetry_metrics
from rottenbot_inference.telemetry.middleware import fastapi_options

log = logging.getLogger(__name__)


def _sync_detail(state: AppState) -> None:
    """Readiness detail follows the model manager (cached model served, version refused)."""
    if state.phase is Phase.READY and state.models is not None:
        state.detail = state.models.warning


async def load_model(state: AppState) -> None:
    """Load, warm up and install the configured model; readiness follows. Then watch it.

    An unreachable registry is retried with backoff until MODEL_LOAD_DEADLINE_S (readiness
    says so meanwhile); see inference/reloader.py.
    """
    try:
        if state.models is None:
            state.models = ModelManager(state.settings, state.service)
        manager = state.models
        manager.on_status = lambda: _sync_detail(state)

        def progress(detail: str) -> None:
            if state.phase is Phase.LOADING:
                state.detail = detail

        with traced("load_model") as span:
            bundle = await asyncio.to_thread(manager.load_initial, progress)
            span.set_attributes({"model.name": bundle.name, "model.version": bundle.version})
    except Exception as exc:
        if isinstance(exc, ModelLoadError):
            log.error("the model could not be loaded: %s", exc)
        else:
            log.exception("the model could not be loaded")
        telemetry_metrics.record_model_load("failure")
        if state.phase is Phase.LOADING:
            state.phase, state.detail = Phase.FAILED, f"{type(exc).__name__}: {exc}"
        raise
    if state.phase is not Phase.LOADING:  # a shutdown signal came during the load
        return
    freeze_startup_objects("model load", state.settings.gc_freeze)  # before traffic
    state.phase, state.detail = Phase.READY, manager.warning
    log.info("ready: model %s version %s", bundle.name, bundle.version)
    manager.start_watching()
    if state.challenger is not None:  # after readiness: it never delays the champion
        state.challenger.start(manager)


def create_app(
    settings: Settings | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The ASGI app. `on_fatal` is called if the model cannot be loaded (the CLI exits)."""
    settings = settings or Settings()
    telemetry = setup_telemetry(settings)  # once per process; later apps share it

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.uses_dev_secret:
            log.warning("JWT_SECRET is not set: using the development secret; never in production")
        service = InferenceService(settings)
        verifier = build_verifier(settings)
        await verifier.start()
        blocklist = await start_blocklist(settings)
        rate_limiter = build_rate_limiter(settings)
        store = PredictionStore(settings)
        state = AppState(
            settings=settings, service=service, verifier=verifier, blocklist=blocklist,
            rate_limiter=rate_limiter,
            predictions=store,
            explainer=Explainer(settings, service),
        )
        if settings.challenger_uri:  # a malformed URI fails the start, like MODEL_URI's
            from rottenbot_inference.inference.challenger import Challenger

            state.challenger = Challenger(state)
        app.state.rottenbot = state
        telemetry_metrics.bind_state(state)
        service.start()
        loading = asyncio.create_task(load_model(state))
        loading.add_done_callback(lambda task: _report(task, on_fatal))
        # The durable outbox opens now (saves are safe from the first request); the database and
        # image store clients are built once the model is ready, off the readiness path.
        await store.start(after=loading)
        hangup = _on_sighup(state)
        # SIGTERM/SIGINT: drain first, then let the server close (shutdown.py).
        unchain = GracefulShutdown(state, settings.shutdown_delay_s).install()
        try:
            yield
        finally:
            state.phase, state.detail = Phase.SHUTTING_DOWN, "shutting down"
            hangup()
            loading.cancel()
            if state.models is not None:
                await asyncio.to_thread(state.models.stop)
            if state.challenger is not None:
                await state.challenger.stop()
            state.explainer.stop()
            await service.stop()
            await store.stop()  # drains for OUTBOX_SHUTDOWN_GRACE_S; the rest stays durable
            await blocklist.close()
            if rate_limiter is not None:
                await rate_limiter.close()
            telemetry_metrics.unbind_state(state)
            await asyncio.to_thread(telemetry.flush)  # bounded, even if the collector is down
            unchain()  # last: a repeated signal hurries the drain above

    app = FastAPI(
        title="RottenBot inference service",
        version=__version__,
        description="Classifies photos of fruit and vegetables as healthy or rotten.",
        docs_url=None,  # served by install_docs, with Swagger UI's files from this process
        redoc_url=None,
        openapi_url="/api/v1/openapi.json",
        lifespan=lifespan,
        **fastapi_options(),  # our middleware traces and measures requests, not FastAPI's own
    )
    app.add_middleware(BodySizeLimitMiddleware, max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(
        BodyReadTimeoutMiddleware,
        idle_timeout_s=settings.body_read_timeout_s,
        total_timeout_s=settings.request_read_timeout_s,
    )
    install_error_handlers(app)
    # Predict only: cancel the work of a client that went away (outside the body limits, so
    # it listens on the raw connection), and shed load before a body is read (admission.py).
    app.add_middleware(CancelOnDisconnect, paths=(PREDICT_PATH, EXPLAIN_PATH))
    app.add_middleware(AdmissionMiddleware, settings=settings)
    # Explanations are shed first: refused while predictions are busy (explain_admission.py).
    app.add_middleware(ExplainAdmissionMiddleware, retry_after_s=settings.retry_after_s)
    # Inside the telemetry middleware (refusals are counted and logged like any answer),
    # outside everything else: while draining, a new API request is refused before any other
    # work (its body is read and discarded, bounded here).
    app.add_middleware(
        DrainingMiddleware, max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD
    )
    # Security headers on every answer, the early refusals of the middleware above included.
    app.add_middleware(
        SecurityHeadersMiddleware, docs_paths=install_docs(app), docs_csp=DOCS_CSP
    )
    # Added last: outermost, so it also times and counts the body-size limit's early 413s.
    app.add_middleware(TelemetryMiddleware, access_log_enabled=settings.access_log)
    app.include_router(predict.router)
    app.include_router(explain.router)
    app.include_router(model.router)
    app.include_router(predictions.router)
    app.include_router(health.router)
    if settings.admin_api_key is not None:  # unset: the admin endpoints do not exist (404)
        app.include_router(admin.router)
        app.include_router(comparison.router)
        app.include_router(challenger_admin.router)
    app.include_router(telemetry_metrics.router)
    return app


def _on_sighup(state: AppState) -> Callable[[], None]:
    """SIGHUP asks for a model reload (main-thread event loops only); returns the undo."""
    loop = asyncio.get_running_loop()

    def reload() -> None:
        if state.models is None or state.models.current is None:
            log.warning("SIGHUP ignored: no model is loaded yet")
            return
        log.info("SIGHUP: checking the model source")
        state.models.request_reload("signal")
        if state.challenger is not None:
            state.challenger.manager.request_reload("signal")

    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        return lambda: None  # not the main thread (tests, some servers) or no SIGHUP here

    def undo() -> None:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGHUP)

    return undo


def _report(task: asyncio.Task[None], on_fatal: Callable[[BaseException], None] | None) -> None:
    if task.cancelled() or task.exception() is None:
        return
    if on_fatal is not None:
        on_fatal(task.exception())  # type: ignore[arg-type]
