"""Uploads through obstore against a real S3 server (moto on loopback): the bytes and type
arrive, and every failure is told apart the way the drainer needs (park a refusal, retry an
outage), with no secret in the message."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

from rottenbot_inference.storage.failures import classify
from rottenbot_inference.storage.images import ImageStoreError, S3ImageStore
from rottenbot_inference.storage.s3_writer import _s3_code
from tests.helpers import free_port
from tests.servers_storage import MotoS3Server, moto_s3_fixture  # noqa: F401


def store_for(moto_s3: MotoS3Server, bucket: str, url: str | None = None) -> S3ImageStore:
    return S3ImageStore(
        bucket,
        endpoint_url=url or moto_s3.url,
        access_key=moto_s3.access_key,
        secret_key=moto_s3.secret_key,
        timeout_s=1.0,
        max_attempts=2,
    )


def failure_of(store: S3ImageStore, key: str = "u/2026/12/02/x.jpg") -> ImageStoreError:
    with pytest.raises(ImageStoreError) as caught:
        store.put(key, b"\xff\xd8 not really a jpeg", "image/jpeg")
    assert caught.value.__cause__ is not None
    return caught.value


def test_put_stores_the_exact_bytes_and_type(moto_s3: MotoS3Server) -> None:
    store = store_for(moto_s3, f"ok-{uuid.uuid4().hex[:8]}")
    store.ensure_ready()
    data = bytes(range(256)) * 700  # 175 KB, about a 1024x768 JPEG
    store.put("u/2026/12/02/a.jpg", data, "image/jpeg")
    store.put("u/2026/12/02/a.jpg", data, "image/jpeg")  # idempotent: the drainer may retry
    head = moto_s3.client().head_object(Bucket=store.bucket, Key="u/2026/12/02/a.jpg")
    assert head["ContentType"] == "image/jpeg" and head["ContentLength"] == len(data)
    stored = store.get("u/2026/12/02/a.jpg")
    assert stored is not None
    assert hashlib.sha256(b"".join(stored.chunks)).digest() == hashlib.sha256(data).digest()


def test_a_missing_bucket_is_a_permanent_refusal(moto_s3: MotoS3Server) -> None:
    error = failure_of(store_for(moto_s3, f"never-created-{uuid.uuid4().hex[:8]}"))
    assert error.s3_code == "NoSuchBucket"
    failure = classify("image_store", error)
    assert (failure.reason, failure.permanent) == ("image_store_no_bucket", True)


def test_a_server_down_or_hung_is_transient_and_bounded(moto_s3: MotoS3Server) -> None:
    refused = failure_of(store_for(moto_s3, "any", url=f"http://127.0.0.1:{free_port()}"))
    assert (classify("image_store", refused).reason, refused.s3_code) == (
        "image_store_unreachable", None)
    store = store_for(moto_s3, f"hung-{uuid.uuid4().hex[:8]}")
    store.ensure_ready()
    moto_s3.pause()
    try:
        hung = failure_of(store)  # 1 s x 2 attempts (obstore's default would retry for 3 min)
    finally:
        moto_s3.resume()
    failure = classify("image_store", hung)
    assert (failure.reason, failure.permanent) == ("image_store_unreachable", False)


def test_messages_are_short_and_carry_no_secret(moto_s3: MotoS3Server) -> None:
    error = failure_of(store_for(moto_s3, f"never-created-{uuid.uuid4().hex[:8]}"))
    text = str(error)
    assert moto_s3.secret_key not in text and "\n" not in text and len(text) < 700


def test_refusals_without_a_code_in_the_body_are_still_refusals() -> None:
    assert _s3_code(PermissionDeniedError("403 Forbidden")) == "AccessDenied"
    assert _s3_code(UnauthenticatedError("401")) == "AccessDenied"
    assert _s3_code(RuntimeError("<Error><Code>SlowDown</Code></Error>")) == "SlowDown"
    assert _s3_code(RuntimeError("connection reset")) is None
    denied = ImageStoreError("cannot upload", s3_code="AccessDenied")
    assert classify("image_store", denied).reason == "image_store_denied"
