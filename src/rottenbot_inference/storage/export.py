"""`rottenbot-inference export-dataset`: saved predictions as a training-ready folder.

Layout (what `keras.utils.image_dataset_from_directory` reads, classes in the model's order):

    DIR/<class_name>/<prediction_uid>.<jpg|png>   one folder per class, empty ones included
    DIR/manifest.csv                             one line per exported image
    DIR/.export-*                                journal, salt, temporary files (hidden files
                                                 at the top: no reader takes them for a class)

- Rows stream from the database (server-side cursor); images download in `jobs` threads with
  at most `2 * jobs` in flight, each streamed chunk by chunk to a temporary file and renamed
  into place once complete and hashed: memory stays flat whatever the count, and an
  interrupted run (even `kill -9`) never leaves a truncated image where a reader looks.
- Resumable: every finished file is appended to a journal; a re-run re-hashes the file the
  journal names and skips it when the hash matches. Files of predictions that no longer
  qualify (deleted, erased, relabelled) are removed at the end: a deleted prediction is never
  in the output.
- Deduplicated by content: the same bytes are exported once (the oldest prediction wins; for
  rows of the previous service, which have no stored hash, the first one downloaded).
- The user is a salted hash (HMAC-SHA256), never the user id; the salt is kept in
  `DIR/.export-salt` (or given), so a resumed export hashes the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import csv
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rottenbot_inference.storage.images import ImageStore, ImageStoreError

log = logging.getLogger(__name__)

Labels = Literal["feedback", "predicted", "both"]
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = (
    "prediction_uid", "user_hash", "label", "label_source", "model_version", "confidence",
    "created_at", "sha256", "path",
)
STATE = ".export-"  # prefix of the state files at the top of the output folder
FETCH_ROWS = 500  # rows per round trip of the server-side cursor


class ExportError(Exception):
    """The export cannot go on (exit status `code`)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


DATABASE_UNREACHABLE = 3
IMAGE_STORE_UNREACHABLE = 4


@dataclass(frozen=True)
class ExportFilter:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    model_version: str | None = None
    labels: Labels = "both"
    min_confidence: float = 0.9


@dataclass(frozen=True)
class Row:
    """One prediction to export, with its label."""

    uid: uuid.UUID
    user_uid: uuid.UUID
    image_path: str
    label: str
    label_source: str  # feedback | predicted
    model_version: str | None
    confidence: float
    created_at: dt.datetime
    sha256: str | None  # as stored (None for the previous service's rows)


@dataclass
class Summary:
    exported: int = 0  # written by this run
    reused: int = 0  # already there, verified
    duplicates: int = 0
    missing: int = 0  # row without an image in the store
    unknown_class: int = 0  # label not among the model's classes
    removed: int = 0  # stale files of predictions that no longer qualify
    per_class: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.exported + self.reused


def label_of(feedback_class: str | None, predicted: str, confidence: float,
             labels: Labels, min_confidence: float) -> tuple[str, str] | None:
    """(label, source) under the labelling rule, or None when the row has no usable label."""
    if labels != "predicted" and feedback_class is not None:
        return feedback_class, "feedback"
    if labels != "feedback" and confidence >= min_confidence:
        return predicted, "predicted"
    return None


def user_hash(salt: bytes, user_uid: uuid.UUID) -> str:
    return hmac.new(salt, user_uid.bytes, hashlib.sha256).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _extension(head: bytes, image_path: str) -> str:
    from rottenbot_inference.inference.images import sniff_format

    found = sniff_format(head)
    if found is not None:
        return found.extension
    suffix = Path(image_path).suffix.lower().lstrip(".")
    return suffix if suffix in ("jpg", "jpeg", "png") else "bin"


# --- database --------------------------------------------------------------------------------


def build_query(selection: ExportFilter) -> Any:
    """The rows to export, oldest first, skipping users being erased."""
    from sqlalchemy import exists, or_, select

    from rottenbot_inference.storage.models import Feedback, Prediction, UserErasure

    p, f = Prediction.__table__.c, Feedback.__table__.c
    erased = exists().where(UserErasure.__table__.c.user_uid == p.user_uid)
    query = (
        select(
            p.uid, p.user_uid, p.image_path, p.predicted_class_name, p.confidence,
            p.model_version, p.created_at, p.image_sha256, f.correct_class_name,
        )
        .select_from(Prediction.__table__.outerjoin(Feedback.__table__, f.prediction_uid == p.uid))
        .where(~erased)
        .order_by(p.created_at, p.uid)
    )
    if selection.since is not None:
        query = query.where(p.created_at >= selection.since)
    if selection.until is not None:
        query = query.where(p.created_at < selection.until)
    if selection.model_version is not None:
        query = query.where(p.model_version == selection.model_version)
    confident = p.confidence >= selection.min_confidence
    if selection.labels == "feedback":
        return query.where(f.prediction_uid.is_not(None))
    if selection.labels == "predicted":
        return query.where(confident)
    return query.where(or_(f.prediction_uid.is_not(None), confident))


async def count_rows(engine: Any, selection: ExportFilter) -> int:
    from sqlalchemy import func, select

    query = select(func.count()).select_from(build_query(selection).order_by(None).subquery())
    async with engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def stream_rows(engine: Any, selection: ExportFilter) -> Any:
    """Async iterator of Row (see build_query), through a server-side cursor."""
    query = build_query(selection)
    async with engine.connect() as conn:
        result = await conn.stream(query.execution_options(yield_per=FETCH_ROWS))
        async for record in result:
            created = record.created_at
            if created.tzinfo is None:
                created = created.replace(tzinfo=dt.UTC)
            labelled = label_of(
                record.correct_class_name, record.predicted_class_name, record.confidence,
                selection.labels, selection.min_confidence,
            )
            if labelled is None:
                continue
            yield Row(
                uid=record.uid, user_uid=record.user_uid, image_path=record.image_path,
                label=labelled[0], label_source=labelled[1],
                model_version=record.model_version, confidence=record.confidence,
                created_at=created.astimezone(dt.UTC), sha256=record.image_sha256,
            )


# --- files -----------------------------------------------------------------------------------


class Journal:
    """uid -> (relative path, sha256) of files finished by earlier runs (append-only lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, tuple[str, str]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.done[entry["uid"]] = (entry["path"], entry["sha256"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill: that file is re-checked anyway
        self._handle = path.open("a")

    def add(self, uid: str, relative: str, sha256: str) -> None:
        self.done[uid] = (relative, sha256)
        self._handle.write(json.dumps({"uid": uid, "path": relative, "sha256": sha256}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


@dataclass(frozen=True)
class Fetched:
    row: Row
    relative: str | None  # None: no such object
    sha256: str | None
    reused: bool = False


def fetch(images: ImageStore, out: Path, tmp: Path, row: Row) -> Fetched:
    """Stream one image to a temporary file, hash it, rename it into its class folder."""
    image = images.get(row.image_path)
    if image is None:
        return Fetched(row, None, None)
    digest = hashlib.sha256()
    temporary = tmp / f"{STATE}{row.uid}.part"
    head = b""
    try:
        with temporary.open("wb") as handle:
            for chunk in image.chunks:
                if len(head) < 16:
                    head += chunk[:16]
                digest.update(chunk)
                handle.write(chunk)
        relative = f"{row.label}/{row.uid}.{_extension(head, row.image_path)}"
        os.replace(temporary, out / relative)
    finally:
        temporary.unlink(missing_ok=True)
    return Fetched(row, relative, digest.hexdigest())


def verified(out: Path, journal: Journal, row: Row) -> Fetched | None:
    """The file an earlier run finished for this row, if it is there, labelled the same way,
    and its bytes still hash to what the journal (and the database, if it knows) say."""
    entry = journal.done.get(str(row.uid))
    if entry is None:
        return None
    relative, sha256 = entry
    if relative.split("/", 1)[0] != row.label or (row.sha256 and row.sha256 != sha256):
        return None
    path = out / relative
    if not path.is_file() or file_sha256(path) != sha256:
        return None
    return Fetched(row, relative, sha256, reused=True)


# --- the export ------------------------------------------------------------------------------


@dataclass
class Exporter:
    out: Path
    classes: tuple[str, ...]
    images: ImageStore
    salt: bytes | None = None
    jobs: int = 8
    progress: Callable[[Summary], None] | None = None
    summary: Summary = field(default_factory=Summary)

    def prepare(self) -> tuple[Path, Journal, bytes]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._remove_temporaries()  # leftovers of an interrupted run
        for name in self.classes:
            (self.out / name).mkdir(exist_ok=True)
        salt_file = self.out / f"{STATE}salt"
        if self.salt is None:
            if not salt_file.exists():
                salt_file.write_text(secrets.token_hex(32))
                salt_file.chmod(0o600)
            self.salt = bytes.fromhex(salt_file.read_text().strip())
        return self.out, Journal(self.out / f"{STATE}journal.jsonl"), self.salt

    def _remove_temporaries(self) -> None:
        for path in self.out.glob(f"{STATE}*.part"):
            path.unlink(missing_ok=True)

    async def run(self, rows: Any) -> Summary:
        """Export every row of the async iterator `rows`; writes manifest.csv at the end."""
        tmp, journal, salt = self.prepare()
        loop = asyncio.get_running_loop()
        pool = concurrent.futures.ThreadPoolExecutor(self.jobs, thread_name_prefix="export")
        in_flight: set[asyncio.Future[Fetched]] = set()
        seen_hashes: set[str] = set()  # of the files exported
        claimed: set[str] = set()  # hashes the database gave, of rows taken (in row order)
        manifest_part = self.out / f"{STATE}{MANIFEST}.part"
        manifest_file = manifest_part.open("w", newline="")
        manifest = csv.writer(manifest_file)  # written as files finish, renamed at the end
        manifest.writerow(MANIFEST_COLUMNS)
        known = set(self.classes)
        keep: set[str] = set()
        try:
            async for row in rows:
                if row.label not in known:
                    self.summary.unknown_class += 1
                    continue
                if row.sha256 is not None:  # known bytes: the oldest row claims them
                    if row.sha256 in claimed:
                        self.summary.duplicates += 1
                        continue
                    claimed.add(row.sha256)
                if str(row.uid) in journal.done:
                    done = await loop.run_in_executor(pool, verified, self.out, journal, row)
                    if done is not None:
                        self._finish(done, journal, salt, seen_hashes, manifest, keep)
                        continue
                in_flight.add(
                    loop.run_in_executor(pool, fetch, self.images, self.out, tmp, row)
                )
                if len(in_flight) >= 2 * self.jobs:
                    finished, in_flight = await asyncio.wait(
                        in_flight, return_when=asyncio.FIRST_COMPLETED
                    )
                    for future in finished:
                        self._finish(future.result(), journal, salt, seen_hashes,
                                     manifest, keep)
            while in_flight:
                finished, in_flight = await asyncio.wait(
                    in_flight, return_when=asyncio.FIRST_COMPLETED
                )
                for future in finished:
                    self._finish(future.result(), journal, salt, seen_hashes, manifest, keep)
        except ImageStoreError as exc:
            raise ExportError(f"the image store cannot be reached: {exc}",
                              IMAGE_STORE_UNREACHABLE) from exc
        finally:
            for future in in_flight:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            journal.close()
            manifest_file.close()
        self._remove_stale(keep)
        os.replace(manifest_part, self.out / MANIFEST)
        return self.summary

    def _finish(self, fetched: Fetched, journal: Journal, salt: bytes, seen: set[str],
                manifest: Any, keep: set[str]) -> None:
        row = fetched.row
        if fetched.relative is None or fetched.sha256 is None:
            self.summary.missing += 1
            log.warning("prediction %s: no image at %s; skipped", row.uid, row.image_path)
            return
        if fetched.sha256 in seen:
            self.summary.duplicates += 1
            if not fetched.reused:
                (self.out / fetched.relative).unlink(missing_ok=True)
            return
        seen.add(fetched.sha256)
        if fetched.reused:
            self.summary.reused += 1
        else:
            journal.add(str(row.uid), fetched.relative, fetched.sha256)
            self.summary.exported += 1
        keep.add(fetched.relative)
        self.summary.per_class[row.label] = self.summary.per_class.get(row.label, 0) + 1
        manifest.writerow((
            str(row.uid), user_hash(salt, row.user_uid), row.label, row.label_source,
            row.model_version or "", f"{row.confidence:.6f}", row.created_at.isoformat(),
            fetched.sha256, fetched.relative,
        ))
        if self.progress is not None:
            self.progress(self.summary)

    def _remove_stale(self, keep: set[str]) -> None:
        """Delete images of earlier runs that this run did not export (deleted predictions)."""
        for path in self._image_files():
            relative = path.relative_to(self.out).as_posix()
            if relative not in keep:
                path.unlink(missing_ok=True)
                self.summary.removed += 1

    def _image_files(self) -> Iterator[Path]:
        for name in self.classes:
            yield from (path for path in (self.out / name).iterdir() if path.is_file())


def probe(images: ImageStore) -> None:
    """Fail fast (ExportError) when the image store cannot be reached; creates nothing."""
    client, bucket = getattr(images, "client", None), getattr(images, "bucket", None)
    try:
        if client is not None and bucket is not None:
            client.head_bucket(Bucket=bucket)
        elif not Path(getattr(images, "root", ".")).is_dir():
            raise OSError(f"{images.description} does not exist")
    except Exception as exc:
        raise ExportError(
            f"the image store ({images.description}) cannot be reached: {exc}",
            IMAGE_STORE_UNREACHABLE,
        ) from exc
