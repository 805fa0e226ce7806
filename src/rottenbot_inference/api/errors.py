"""Maps domain errors to HTTP answers: client faults are 4xx, overload and outages 503."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from rottenbot_inference.inference.batcher import BatcherClosed, DeadlineExceeded, QueueFull
from rottenbot_inference.inference.images import ImageError, ImageTooLarge
from rottenbot_inference.storage.service import StorageUnavailable

log = logging.getLogger(__name__)

PREDICTION_FAILED = "Ooops! Something went wrong during prediction."


class ServiceUnavailable(Exception):
    """A 503 with Retry-After: overloaded, not ready, or a dependency is down."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class PayloadTooLarge(HTTPException):
    """A 413; the connection is closed after it (the rest of the body is not read)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail, headers={"Connection": "close"})


class RequestTimeout(HTTPException):
    """A 408: the request body came in too slowly; the connection is closed after it."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=408, detail=detail, headers={"Connection": "close"})


def _unavailable(request: Request, detail: str) -> JSONResponse:
    retry_after = request.app.state.rottenbot.settings.retry_after_s
    return JSONResponse(
        {"detail": detail}, status_code=503, headers={"Retry-After": str(retry_after)}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ImageError)
    async def image_error(_: Request, exc: ImageError) -> JSONResponse:
        status = 413 if isinstance(exc, ImageTooLarge) else 400
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, _: QueueFull) -> JSONResponse:
        return _unavailable(request, "The service is overloaded; retry shortly.")

    @app.exception_handler(DeadlineExceeded)
    async def deadline(request: Request, _: DeadlineExceeded) -> JSONResponse:
        return _unavailable(request, "The request waited too long for the model; retry shortly.")

    @app.exception_handler(BatcherClosed)
    async def closing(request: Request, _: BatcherClosed) -> JSONResponse:
        return _unavailable(request, "The service is shutting down; retry on another replica.")

    @app.exception_handler(ServiceUnavailable)
    async def unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        return _unavailable(request, exc.detail)

    @app.exception_handler(StorageUnavailable)
    async def storage_down(request: Request, exc: StorageUnavailable) -> JSONResponse:
        return _unavailable(request, exc.detail)
