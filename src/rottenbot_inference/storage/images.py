"""Image stores: S3/MinIO in production, a local folder by default. Blocking: call from threads.

Keys are ours (`records.object_key`), never derived from the client's filename. `put` is
idempotent (same key, same bytes), which the drainer's at-least-once retries rely on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from rottenbot_inference.settings import Settings
from rottenbot_inference.storage.s3_writer import S3Writer, UploadError

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
_CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png"}


class ImageStoreError(Exception):
    """The image store cannot be reached or refused the operation (retry later).

    `s3_code` is S3's error code when one is known (the drainer tells a refusal from an outage).
    """

    def __init__(self, message: str, s3_code: str | None = None) -> None:
        super().__init__(message)
        self.s3_code = s3_code


@dataclass
class StoredImage:
    """An image being read: iterate `chunks` once (it closes the source at the end; a failed
    read raises ImageStoreError).

    `content_type` is what the store says (S3 metadata, or the key's extension); objects written
    by the original service carry none, so the API decides the served type from the bytes.
    """

    content_type: str
    size: int | None
    chunks: Iterator[bytes]


class ImageStore(Protocol):
    """Where saved images live. Every method blocks; call them from a thread."""

    description: str

    def ensure_ready(self) -> None:
        """Create the bucket/folder if missing (idempotent)."""

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> StoredImage | None:
        """The image, or None if there is no such key."""

    def delete(self, key: str) -> None:
        """Remove the key; a missing key is not an error."""


def read_head(image: StoredImage, size: int = 16) -> tuple[bytes, StoredImage]:
    """The first `size` bytes of `image` (all of it if shorter) and the image again, whole.

    Blocking (it reads from the store): call from a thread. Raises ImageStoreError if the first
    read fails, before anything has been sent.
    """
    blocks: list[bytes] = []
    read = 0
    while read < size and (block := next(image.chunks, None)) is not None:
        blocks.append(block)
        read += len(block)

    def whole() -> Iterator[bytes]:
        yield from blocks
        yield from image.chunks

    return b"".join(blocks)[:size], replace(image, chunks=whole())


def content_type_for(key: str) -> str:
    extension = PurePosixPath(key).suffix.lstrip(".").lower()
    return _CONTENT_TYPES.get(extension, "application/octet-stream")


def _check_key(key: str) -> PurePosixPath:
    path = PurePosixPath(key)
    if not key or path.is_absolute() or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return path


class LocalImageStore:
    """A folder (embedded default). Writes are atomic (temp file + rename) and fsynced."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.description = f"folder {self.root}"

    def ensure_ready(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).parts)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        target = self.path_for(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                raise
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise ImageStoreError(f"cannot write {key}: {exc}") from exc

    def get(self, key: str) -> StoredImage | None:
        path = self.path_for(key)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ImageStoreError(f"cannot read {key}: {exc}") from exc
        size = os.fstat(handle.fileno()).st_size

        def chunks() -> Iterator[bytes]:
            with handle:
                try:
                    while block := handle.read(CHUNK_BYTES):
                        yield block
                except OSError as exc:
                    raise ImageStoreError(f"cannot read {key}: {exc}") from exc

        return StoredImage(content_type_for(key), size, chunks())

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise ImageStoreError(f"cannot delete {key}: {exc}") from exc


class S3ImageStore:
    """S3 or MinIO, with short timeouts and few retries (the outbox retries).

    Uploads go through obstore (storage/s3_writer.py: a tenth of boto3's CPU per image, payload
    signed); reads, deletes and bucket creation through boto3. Path-style addressing (MinIO,
    local endpoints). botocore computes its own checksums only when an operation requires them,
    which keeps S3-compatible servers that lack the newer trailing checksums working.
    """

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        timeout_s: float = 5.0,
        max_attempts: int = 2,
        max_connections: int = 16,
    ) -> None:
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=region,
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            max_pool_connections=max_connections,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        self.client: Any = session.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )
        self.bucket = bucket
        self.region = region
        self._writer = S3Writer(
            bucket, endpoint_url, access_key, secret_key, region, timeout_s, max_attempts
        )
        self.description = f"s3 bucket {bucket!r} at {endpoint_url or 'AWS'}"

    @staticmethod
    def _errors() -> tuple[type[BaseException], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError, OSError)

    def ensure_ready(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _status(exc) not in (404, 400) and _code(exc) not in ("404", "NoSuchBucket"):
                raise ImageStoreError(f"cannot check bucket {self.bucket}: {exc}") from exc
        except self._errors() as exc:
            raise ImageStoreError(f"cannot reach the image store: {exc}") from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**kwargs)
            log.info("created bucket %s", self.bucket)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise ImageStoreError(f"cannot create bucket {self.bucket}: {exc}") from exc
        except self._errors() as exc:
            raise ImageStoreError(f"cannot reach the image store: {exc}") from exc

    def put(self, key: str, data: bytes, content_type: str) -> None:
        _check_key(key)
        try:
            self._writer.put(key, data, content_type)
        except UploadError as exc:
            raise ImageStoreError(f"cannot upload {key}: {exc}", s3_code=exc.s3_code) from exc

    def get(self, key: str) -> StoredImage | None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NoSuchBucket") or _status(exc) == 404:
                return None
            raise ImageStoreError(f"cannot read {key}: {exc}") from exc
        except self._errors() as exc:
            raise ImageStoreError(f"cannot read {key}: {exc}") from exc
        body = response["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK_BYTES)
            except self._errors() as exc:
                raise ImageStoreError(f"cannot read {key}: {exc}") from exc
            finally:
                body.close()

        return StoredImage(
            response.get("ContentType") or content_type_for(key),
            response.get("ContentLength"),
            chunks(),
        )

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except self._errors() as exc:
            raise ImageStoreError(f"cannot delete {key}: {exc}") from exc


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: Any) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def build_image_store(settings: Settings) -> ImageStore:
    """S3 (IMAGE_STORE=s3, or auto with LOCAL_S3_PROXY_SERVICE_URL set), else a folder."""
    kind = settings.image_store
    if kind == "auto":
        kind = "s3" if settings.local_s3_proxy_service_url else "local"
    if kind == "local":
        return LocalImageStore(settings.images_dir or settings.data_dir / "images")
    secret = settings.minio_root_password
    return S3ImageStore(
        bucket=settings.s3_bucket,
        endpoint_url=settings.local_s3_proxy_service_url,
        access_key=settings.minio_root_user,
        secret_key=secret.get_secret_value() if secret else None,
        region=settings.s3_region,
        timeout_s=settings.s3_timeout_s,
        max_attempts=settings.s3_max_attempts,
        max_connections=settings.outbox_upload_concurrency + 8,
    )
