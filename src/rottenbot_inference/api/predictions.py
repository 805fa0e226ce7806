"""The caller's saved predictions: list, get, image, delete (scoped by the token's user).

Another user's prediction is a 404, never a 403: whether a uid exists is not revealed.
An image is served with the type its bytes have (JPEG/PNG magic), never the stored object's
metadata: the original service stored images without a content type.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from rottenbot_inference.api.deps import CurrentUser
from rottenbot_inference.api.errors import ServiceUnavailable
from rottenbot_inference.api.schemas import (
    ClassScoreOut,
    ErrorOut,
    FeedbackIn,
    FeedbackOut,
    PredictionPageOut,
    SavedPredictionOut,
)
from rottenbot_inference.api.state import AppState, get_state
from rottenbot_inference.inference.images import sniff_format
from rottenbot_inference.storage.images import ImageStoreError, read_head
from rottenbot_inference.storage.records import FeedbackRecord
from rottenbot_inference.storage.service import (
    MAX_PAGE_SIZE,
    InvalidCursor,
    PredictionPending,
    PredictionStore,
    SavedPrediction,
    StorageUnavailable,
)

PREFIX = "/api/v1/inference/predictions"
router = APIRouter(prefix=PREFIX, tags=["predictions"])

NOT_FOUND = "Prediction not found."
UNKNOWN_TYPE = "application/octet-stream"  # neither JPEG nor PNG: with nosniff, never rendered
_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "Missing, invalid, expired or revoked token"},
    404: {"model": ErrorOut, "description": "No such prediction for this user"},
    503: {"model": ErrorOut, "description": "Database or image store unavailable; Retry-After"},
}


async def _store(state: Annotated[AppState, Depends(get_state)]) -> PredictionStore:
    if state.predictions is None:
        raise ServiceUnavailable("Saved predictions are not available right now.")
    return state.predictions


Store = Annotated[PredictionStore, Depends(_store)]


def _out(saved: SavedPrediction) -> SavedPredictionOut:
    record = saved.record
    return SavedPredictionOut(
        uid=record.uid,
        created_at=record.created_at,
        predicted_class=record.predicted_class,
        predicted_class_name=record.predicted_class_name,
        confidence=record.confidence,
        model_name=record.model_name,
        model_version=record.model_version,
        content_type=record.content_type,
        image_width=record.image_width,
        image_height=record.image_height,
        image_bytes=record.image_bytes,
        top_k=None
        if record.top_k is None
        else [
            ClassScoreOut(
                class_index=item["class"],
                class_name=item["class_name"],
                confidence=item["confidence"],
            )
            for item in record.top_k
        ],
        image_url=f"{PREFIX}/{record.uid}/image",
        status="pending" if saved.pending else "stored",
        feedback=None if saved.feedback is None else _feedback_out(saved.feedback),
    )


def _feedback_out(feedback: FeedbackRecord) -> FeedbackOut:
    return FeedbackOut(
        correct_class=feedback.correct_class,
        correct_class_name=feedback.correct_class_name,
        agreed=feedback.agreed,
        model_version=feedback.model_version,
        updated_at=feedback.updated_at,
    )


@router.get(
    "",
    response_model=PredictionPageOut,
    response_model_exclude_none=True,
    responses={**_RESPONSES, 400: {"model": ErrorOut, "description": "Invalid cursor"}},
    summary="The caller's saved predictions, newest first",
)
async def list_predictions(
    user: CurrentUser,
    store: Store,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Page size")] = 20,
    cursor: Annotated[
        str | None, Query(max_length=512, description="`next_cursor` of the previous page")
    ] = None,
    class_name: Annotated[
        str | None, Query(max_length=200, description="Only this class, e.g. Apple__Rotten")
    ] = None,
) -> PredictionPageOut:
    try:
        page = await store.list(user.user_uid, limit=limit, cursor=cursor, class_name=class_name)
    except InvalidCursor as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    items = [_out(item) for item in page.items]
    return PredictionPageOut(items=items, next_cursor=page.next_cursor)


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={**_RESPONSES, 200: {"content": {"application/zip": {}},
                                   "description": "images/<uid>.<ext> and manifest.json"}},
    summary="All of the caller's saved predictions as a zip (streamed)",
)
async def export_predictions(user: CurrentUser, store: Store) -> Response:
    from rottenbot_inference.storage.user_zip import zip_stream

    await store.list(user.user_uid, limit=1)  # fail early (503) rather than mid-stream
    headers = {
        "Content-Disposition": 'attachment; filename="rottenbot-predictions.zip"',
        "Cache-Control": "no-store",
    }
    return StreamingResponse(
        zip_stream(store, user.user_uid, lambda saved: _out(saved).model_dump(
            mode="json", exclude_none=True)),
        media_type="application/zip", headers=headers,
    )


class ErasureOut(BaseModel):
    status: str = Field(description="pending: recorded, completed in the background")
    detail: str


@router.delete(
    "",
    status_code=204,
    response_class=Response,
    responses={
        **_RESPONSES,
        202: {"model": ErasureOut, "description": "Recorded; completes in the background"},
    },
    summary="Erase all of the caller's saved predictions, feedback and images",
)
async def erase_predictions(user: CurrentUser, store: Store) -> Response:
    if await store.erasures.request(user.user_uid):
        return Response(status_code=204)
    body = ErasureOut(
        status="pending",
        detail="The erasure is recorded and will complete as soon as the database and image "
        "store can be reached; repeat this request to see whether it has.",
    )
    return JSONResponse(body.model_dump(), status_code=202)


@router.get(
    "/{uid}",
    response_model=SavedPredictionOut,
    response_model_exclude_none=True,
    responses=_RESPONSES,
    summary="One saved prediction",
)
async def get_prediction(user: CurrentUser, store: Store, uid: uuid.UUID) -> SavedPredictionOut:
    saved = await store.get(user.user_uid, uid)
    if saved is None:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    return _out(saved)


@router.get(
    "/{uid}/image",
    response_class=StreamingResponse,
    responses={
        **_RESPONSES,
        200: {"content": {"image/jpeg": {}, "image/png": {}}, "description": "The image"},
    },
    summary="The saved image, as uploaded",
)
async def get_prediction_image(user: CurrentUser, store: Store, uid: uuid.UUID) -> Response:
    image = await store.open_image(user.user_uid, uid)
    if image is None:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    try:
        head, image = await run_in_threadpool(read_head, image)
    except ImageStoreError as exc:
        raise StorageUnavailable("The saved image cannot be read right now.") from exc
    image_format = sniff_format(head)
    media_type = image_format.content_type if image_format else UNKNOWN_TYPE
    headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
    if image.size is not None:
        headers["Content-Length"] = str(image.size)
    return StreamingResponse(image.chunks, media_type=media_type, headers=headers)


@router.delete(
    "/{uid}",
    status_code=204,
    response_class=Response,
    responses=_RESPONSES,
    summary="Delete a saved prediction and its image",
)
async def delete_prediction(user: CurrentUser, store: Store, uid: uuid.UUID) -> Response:
    found = await store.delete(user.user_uid, uid)
    if not found:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    return Response(status_code=204)


# --- feedback ------------------------------------------------------------------------------
PENDING_RETRY_S = 2


class FeedbackErrorOut(BaseModel):
    detail: str | list[dict[str, Any]] = Field(
        description="Unknown class: a sentence listing the valid classes; malformed body: "
        "the validation errors"
    )

_FEEDBACK_RESPONSES: dict[int | str, dict[str, object]] = {
    **_RESPONSES,
    409: {"model": ErrorOut, "description": "The save is still pending; see Retry-After"},
    422: {"model": FeedbackErrorOut,
          "description": "Unknown class (the valid ones are listed), or a malformed body"},
}


def _class_names(state: AppState) -> tuple[str, ...]:
    bundle = state.service.bundle
    if bundle is None:
        raise ServiceUnavailable("The model is not loaded yet; the classes are unknown.")
    return bundle.class_names


def resolve_class(value: str | int, names: tuple[str, ...]) -> tuple[int, str]:
    """(index, name) of a class given by name or index; HTTP 422 naming the valid ones."""
    if isinstance(value, int) and 0 <= value < len(names):
        return value, names[value]
    if isinstance(value, str) and value in names:
        return names.index(value), value
    if isinstance(value, str) and value.isdecimal() and int(value) < len(names):
        return int(value), names[int(value)]
    valid = ", ".join(f"{index}={name}" for index, name in enumerate(names))
    raise HTTPException(
        status_code=422, detail=f"Unknown class {value!r}; valid classes: {valid}."
    )


def _pending() -> HTTPException:
    return HTTPException(
        status_code=409,
        detail="This prediction is still being saved; retry in a few seconds.",
        headers={"Retry-After": str(PENDING_RETRY_S)},
    )


@router.put(
    "/{uid}/feedback",
    response_model=FeedbackOut,
    response_model_exclude_none=True,
    responses=_FEEDBACK_RESPONSES,
    summary="Say what the saved prediction really shows (idempotent)",
)
async def put_feedback(
    user: CurrentUser,
    store: Store,
    state: Annotated[AppState, Depends(get_state)],
    uid: uuid.UUID,
    body: FeedbackIn,
) -> FeedbackOut:
    index, name = resolve_class(body.correct_class, _class_names(state))
    try:
        feedback = await store.set_feedback(user.user_uid, uid, index, name)
    except PredictionPending:
        raise _pending() from None
    if feedback is None:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    return _feedback_out(feedback)


@router.delete(
    "/{uid}/feedback",
    status_code=204,
    response_class=Response,
    responses={**_RESPONSES, 409: _FEEDBACK_RESPONSES[409]},
    summary="Retract the feedback (idempotent)",
)
async def delete_feedback(user: CurrentUser, store: Store, uid: uuid.UUID) -> Response:
    try:
        found = await store.delete_feedback(user.user_uid, uid)
    except PredictionPending:
        raise _pending() from None
    if not found:
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    return Response(status_code=204)
