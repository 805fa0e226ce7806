"""Explanation heatmaps: POST /explain and GET /predictions/{uid}/explanation.png.

Thin routes: admission (api/explain_admission.py) has already let the request in; the work
is `Explainer.explain` (inference/explainer.py), the picture `overlay_png`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from rottenbot_inference.api.admission import request_deadline
from rottenbot_inference.api.deps import CurrentUser, ReadyState
from rottenbot_inference.api.errors import PREDICTION_FAILED, PayloadTooLarge, ServiceUnavailable
from rottenbot_inference.api.limits import upload_too_large
from rottenbot_inference.api.predictions import NOT_FOUND
from rottenbot_inference.api.query import reject_unknown_query_params
from rottenbot_inference.api.ratelimit import RateLimited
from rottenbot_inference.api.schemas import ErrorOut, ExplanationOut
from rottenbot_inference.inference.batcher import DeadlineExceeded
from rottenbot_inference.inference.explain import Heatmap
from rottenbot_inference.inference.explainer import Explainer, Explanation, UnknownClass
from rottenbot_inference.inference.images import ImageError, check_declared_type
from rottenbot_inference.inference.overlay import overlay_png
from rottenbot_inference.storage.images import ImageStoreError, StoredImage
from rottenbot_inference.storage.service import StorageUnavailable
from rottenbot_inference.telemetry.explain_metrics import record_outcome
from rottenbot_inference.telemetry.metrics import record_rejection

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/inference", tags=["explanations"])

PNG = "image/png"
_COMMON: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "Missing, invalid, expired or revoked token"},
    503: {
        "model": ErrorOut,
        "description": "Busy with predictions, too many explanations, or not ready; Retry-After",
    },
}
ClassName = Annotated[
    str | None,
    Query(max_length=200, description="Class to explain, e.g. Banana__Rotten (default: top)"),
]
Versus = Annotated[
    str | None,
    Query(
        max_length=200,
        description="Contrast class: the heatmap shows why class_name rather than this one. "
        "Default: the same produce's other state (Banana__Rotten <-> Banana__Healthy), so a "
        "rotten class's heatmap shows where the rot is; 'none': no contrast",
    ),
]
Format = Annotated[
    Literal["json", "png"] | None,
    Query(
        alias="format",
        description="png: the picture with the heatmap over it (same as Accept: image/png)",
    ),
]


def _explainer(state: ReadyState) -> Explainer:
    if state.explainer is None:
        raise ServiceUnavailable("Explanations are not available right now.")
    return state.explainer


def _wants_png(request: Request, output: str | None) -> bool:
    if output is not None:
        return output == "png"
    accept = request.headers.get("accept", "").lower()
    return PNG in accept and "application/json" not in accept


def _unknown_class(
    parameter: str, name: str, classes: tuple[str, ...]
) -> RequestValidationError:
    return RequestValidationError(
        [
            {
                "type": "enum",
                "loc": ("query", parameter),
                "msg": f"Unknown class '{name}'; the model's classes: {', '.join(classes)}",
                "input": name,
            }
        ]
    )


async def _explain(
    request: Request, state: ReadyState, data: bytes, class_name: str | None, versus: str | None
) -> Explanation:
    """Run the explanation; map its failures to the API's errors."""
    explainer = _explainer(state)
    settings = state.settings  # arrival + EXPLAIN_TIMEOUT_S (request_deadline adds the other)
    deadline = request_deadline(request, settings) - settings.request_timeout_s
    deadline += settings.explain_timeout_s
    try:
        return await explainer.explain(data, class_name, versus, deadline)
    except UnknownClass as exc:
        bundle = state.service.bundle
        classes = bundle.class_names if bundle else ()
        raise _unknown_class(exc.parameter, exc.name, classes) from None
    except ImageError:
        record_outcome("bad_input")
        raise
    except DeadlineExceeded:
        record_rejection("explain_deadline")
        raise
    except Exception:
        log.exception("explanation failed")
        raise HTTPException(status_code=500, detail=PREDICTION_FAILED) from None


def _answer(explanation: Explanation, png: bool) -> ExplanationOut | Response:
    heatmap = explanation.heatmap
    if png:
        image = explanation.image
        body = overlay_png(image.pixels, heatmap, image.width, image.height)
        return Response(
            body, media_type=PNG, headers=_png_headers(heatmap)
        )
    probabilities = heatmap.probabilities
    best = int(probabilities.argmax())
    return ExplanationOut(
        predicted_class=best,
        predicted_class_name=explanation.class_names[best],
        confidence=float(probabilities[best]),
        model_version=explanation.model_version,
        class_name=heatmap.class_name,
        class_confidence=float(probabilities[heatmap.class_index]),
        versus=heatmap.versus_name,
        method=heatmap.method,
        rows=heatmap.rows,
        cols=heatmap.cols,
        grid=[[round(float(v), 4) for v in row] for row in heatmap.grid],
        passes=heatmap.passes,
    )


def _png_headers(heatmap: Heatmap) -> dict[str, str]:
    headers = {"X-Explained-Class": heatmap.class_name}
    if heatmap.versus_name is not None:
        headers["X-Explained-Versus"] = heatmap.versus_name
    return headers


@router.post(
    "/explain",
    response_model=ExplanationOut,
    responses={
        **_COMMON,
        200: {"content": {PNG: {}}, "description": "JSON, or the overlay PNG"},
        400: {"model": ErrorOut, "description": "Not a JPEG/PNG, or a corrupt image"},
        413: {"model": ErrorOut, "description": "Upload or image dimensions over the limit"},
        429: {"model": ErrorOut, "description": "Over the per-user rate limit; see Retry-After"},
    },
    summary="Classify a photo and show which parts of it the answer relies on",
    dependencies=[RateLimited],
)
async def explain(
    request: Request,
    state: ReadyState,
    user: CurrentUser,
    _: Annotated[None, Depends(reject_unknown_query_params)],
    file: Annotated[UploadFile, File(description="JPEG or PNG image")],
    class_name: ClassName = None,
    versus: Versus = None,
    output: Format = None,
) -> ExplanationOut | Response:
    check_declared_type(file.content_type)
    limit = state.settings.max_upload_bytes
    if file.size is not None and file.size > limit:
        raise PayloadTooLarge(upload_too_large(limit))
    data = await file.read()
    explanation = await _explain(request, state, data, class_name, versus)
    return _answer(explanation, _wants_png(request, output))


@router.get(
    "/predictions/{uid}/explanation.png",
    response_class=Response,
    responses={
        **_COMMON,
        200: {"content": {PNG: {}}, "description": "The saved picture with the heatmap"},
        404: {"model": ErrorOut, "description": "No such prediction for this user"},
    },
    summary="The heatmap of a saved prediction over its picture (owner only)",
    tags=["predictions"],
)
async def saved_explanation(
    request: Request,
    state: ReadyState,
    user: CurrentUser,
    _: Annotated[None, Depends(reject_unknown_query_params)],
    uid: uuid.UUID,
    class_name: ClassName = None,
    versus: Versus = None,
) -> Response:
    store = state.predictions
    if store is None:
        raise ServiceUnavailable("Saved predictions are not available right now.")
    saved = await store.get(user.user_uid, uid)
    image = None if saved is None else await store.open_image(user.user_uid, uid)
    if saved is None or image is None:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    try:
        data = await run_in_threadpool(_read_all, image, state.settings.max_upload_bytes)
    except ImageStoreError as exc:
        raise StorageUnavailable("The saved image cannot be read right now.") from exc
    bundle = state.service.bundle
    if class_name is None and bundle is not None:
        saved_class = saved.record.predicted_class_name
        class_name = saved_class if saved_class in bundle.class_names else None
    explanation = await _explain(request, state, data, class_name, versus)
    answer = _answer(explanation, png=True)
    assert isinstance(answer, Response)
    answer.headers["Cache-Control"] = "private, no-store"
    return answer


def _read_all(image: StoredImage, limit: int) -> bytes:
    """The whole saved image (blocking); more than `limit` bytes is not an upload we took."""
    blocks: list[bytes] = []
    size = 0
    for block in image.chunks:
        blocks.append(block)
        size += len(block)
        if size > limit:
            raise PayloadTooLarge(upload_too_large(limit))
    return b"".join(blocks)
