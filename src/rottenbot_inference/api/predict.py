"""POST /api/v1/inference/predict."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError

from rottenbot_inference.api.admission import request_deadline
from rottenbot_inference.api.deps import CurrentUser, ReadyState
from rottenbot_inference.api.errors import PREDICTION_FAILED, PayloadTooLarge, ServiceUnavailable
from rottenbot_inference.api.limits import upload_too_large
from rottenbot_inference.api.query import reject_unknown_query_params
from rottenbot_inference.api.ratelimit import RateLimited
from rottenbot_inference.api.schemas import ClassScoreOut, ErrorOut, PredictionOut
from rottenbot_inference.inference.batcher import BatcherClosed, DeadlineExceeded, QueueFull
from rottenbot_inference.inference.images import ImageError, check_declared_type
from rottenbot_inference.storage.records import STORED_TOP_K
from rottenbot_inference.storage.service import StorageUnavailable
from rottenbot_inference.telemetry import traced
from rottenbot_inference.telemetry.metrics import record_rejection

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/inference", tags=["inference"])

_EXPECTED = (ImageError, QueueFull, DeadlineExceeded, BatcherClosed, ServiceUnavailable)
_REJECTIONS = (
    (QueueFull, "queue_full"),
    (DeadlineExceeded, "deadline_exceeded"),
    (BatcherClosed, "shutting_down"),
    (ServiceUnavailable, "unavailable"),
)


@router.post(
    "/predict",
    response_model=PredictionOut,
    response_model_exclude_none=True,
    responses={
        400: {"model": ErrorOut, "description": "Not a JPEG/PNG, or a corrupt image"},
        401: {"model": ErrorOut, "description": "Missing, invalid, expired or revoked token"},
        403: {"model": ErrorOut, "description": "user_uid is not the token's user"},
        408: {"model": ErrorOut, "description": "The upload arrived too slowly; connection closed"},
        413: {"model": ErrorOut, "description": "Upload or image dimensions over the limit"},
        429: {"model": ErrorOut, "description": "Over the per-user rate limit; see Retry-After"},
        500: {"model": ErrorOut, "description": PREDICTION_FAILED},
        503: {"model": ErrorOut, "description": "Overloaded or not ready; see Retry-After"},
    },
    summary="Classify a photo of fruit or vegetables as healthy or rotten",
    dependencies=[RateLimited],  # after the token check; off unless RATE_LIMIT_PER_MINUTE
)
async def predict(
    request: Request,
    state: ReadyState,
    user: CurrentUser,
    _: Annotated[None, Depends(reject_unknown_query_params)],
    file: Annotated[UploadFile, File(description="JPEG or PNG image")],
    save_prediction: Annotated[
        bool, Query(description="Store the prediction and image for retraining")
    ] = False,
    user_uid: Annotated[
        uuid.UUID | None, Query(description="Deprecated: must equal the token's user if sent")
    ] = None,
    top_k: Annotated[
        int | None,
        Query(
            ge=1,
            le=1000,
            description="Also return the k most probable classes (at most the model's number "
            "of classes, 28 for RottenBot's model: more is a 422)",
        ),
    ] = None,
) -> PredictionOut:
    if user_uid is not None and user_uid != user.user_uid:
        raise HTTPException(status_code=403, detail="user_uid does not match the access token")
    _check_top_k(top_k, state)
    check_declared_type(file.content_type)
    limit = state.settings.max_upload_bytes
    if file.size is not None and file.size > limit:
        raise PayloadTooLarge(upload_too_large(limit))
    with traced("read_image_contents") as span:
        data = await file.read()
        if span.is_recording():
            span.set_attributes(
                {"image.bytes": len(data), "image.content_type": file.content_type or ""}
            )
    ranked_k = max(top_k or 1, STORED_TOP_K if save_prediction else 1)
    try:
        with traced("model_prediction") as span:
            result = await state.service.classify(
                data, top_k=ranked_k, deadline=request_deadline(request, state.settings)
            )
            if span.is_recording():
                span.set_attributes(
                    {
                        "model.version": result.model_version,
                        "prediction.class": result.best.index,
                        "prediction.class_name": result.best.name,
                        "prediction.confidence": result.best.confidence,
                    }
                )
    except _EXPECTED as exc:
        for kind, reason in _REJECTIONS:
            if isinstance(exc, kind):
                record_rejection(reason)
                break
        raise
    except Exception:
        log.exception("prediction failed for user %s", user.user_uid)
        raise HTTPException(status_code=500, detail=PREDICTION_FAILED) from None
    prediction_uid = None
    if save_prediction:
        # Saved under the token's user (never the query parameter). Returns once the save is
        # durable in the local outbox; S3 and the database are written in the background.
        if state.predictions is None:
            record_rejection("storage_unavailable")
            raise ServiceUnavailable("Saving predictions is not available right now.")
        try:
            prediction_uid = await state.predictions.save(user.user_uid, result, data)
        except StorageUnavailable as exc:
            record_rejection("storage_unavailable")
            raise ServiceUnavailable(exc.detail) from None
    if state.challenger is not None:  # shadow scoring: sampled, queued, never waited for
        state.challenger.offer(result, data, prediction_uid)
    best = result.best
    return PredictionOut(
        predicted_class=best.index,
        predicted_class_name=best.name,
        confidence=best.confidence,
        model_version=result.model_version,
        top_k=None
        if top_k is None
        else [
            ClassScoreOut(class_index=s.index, class_name=s.name, confidence=s.confidence)
            for s in result.ranked[:top_k]
        ],
        prediction_uid=prediction_uid,
    )


def _check_top_k(top_k: int | None, state: ReadyState) -> None:
    """422 for a top_k above the serving model's class count (it would be cut silently)."""
    bundle = state.service.bundle
    classes = len(bundle.class_names) if bundle is not None else None
    if top_k is not None and classes is not None and top_k > classes:
        raise RequestValidationError(
            [
                {
                    "type": "less_than_equal",
                    "loc": ("query", "top_k"),
                    "msg": f"Input should be less than or equal to {classes}, "
                    "the model's number of classes",
                    "input": str(top_k),
                    "ctx": {"le": classes},
                }
            ]
        )
