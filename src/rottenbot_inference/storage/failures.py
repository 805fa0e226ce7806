"""Why storing a saved prediction failed, and whether retrying soon can help.

The drainer logs and counts failures by these reasons. Transient ones (a server down or hung,
a full or read-only local volume) are retried with backoff; permanent ones (credentials the
image store refuses, a bucket that is missing and cannot be created, a row the database rejects)
park the items concerned: they stay durable in the outbox, are retried only rarely, and never
hold up the items behind them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from rottenbot_inference.storage.outbox_disk import is_disk_full, is_read_only

# S3 error codes that retrying will not fix until an operator acts.
_S3_DENIED = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "AccountProblem", "InvalidToken", "ExpiredToken", "403",
}
_S3_NO_BUCKET = {"NoSuchBucket", "404"}
_DB_REJECTED = ("IntegrityError", "DataError", "ProgrammingError", "NotSupportedError")


# Every reason `classify` (and the drainer) can give: metrics report each from zero.
REASONS = (
    "image_store_unreachable", "image_store_denied", "image_store_no_bucket",
    "database_unreachable", "database_rejected", "disk_full", "read_only", "outbox_error",
    "unexpected",
)


@dataclass(frozen=True)
class Failure:
    reason: str  # a metric label: image_store_unreachable, database_rejected, disk_full, ...
    permanent: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _s3_code(exc: BaseException) -> str | None:
    """S3's error code: an upload error's own, or botocore's (in its parsed response)."""
    code = getattr(exc, "s3_code", None)
    if code is not None:
        return str(code)
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def classify(stage: str, exc: BaseException) -> Failure:
    """`stage` is where it failed: "outbox", "image_store" or "database"."""
    detail = str(exc) or type(exc).__name__
    for cause in _chain(exc):
        if is_disk_full(cause):
            return Failure("disk_full", False, detail)
        if is_read_only(cause) and stage == "outbox":
            return Failure("read_only", False, detail)
        code = _s3_code(cause)
        if code in _S3_DENIED:
            return Failure("image_store_denied", True, detail)
        if code in _S3_NO_BUCKET:
            return Failure("image_store_no_bucket", True, detail)
        if stage == "database" and type(cause).__name__ in _DB_REJECTED:
            return Failure("database_rejected", True, detail)
    return Failure(f"{stage}_unreachable" if stage != "outbox" else "outbox_error", False, detail)
