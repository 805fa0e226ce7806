"""The drainer on its own (storage/drainer.py, storage/failures.py), with no server: a real
SQLite database and a local image folder stand in for PostgreSQL and S3, which
test_persistence.py and test_outbox_disk.py use for the same behaviour end to end. Fast: these
are the tests scripts/mutation.sh runs against the drainer."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import logging
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from rottenbot_inference.storage import drainer as drainer_module
from rottenbot_inference.storage.db import PredictionRepository, create_engine, migrate
from rottenbot_inference.storage.drainer import Drainer, backoff_s
from rottenbot_inference.storage.failures import REASONS, Failure, _chain, classify
from rottenbot_inference.storage.images import ImageStoreError, LocalImageStore
from rottenbot_inference.storage.outbox import Entry, Outbox
from tests.test_outbox import record


def s3_error(code: str) -> ImageStoreError:
    """What the S3 image store raises for an S3 error code (the client error is its cause)."""
    try:
        raise ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")
    except ClientError as cause:
        try:
            raise ImageStoreError(f"cannot upload: {cause}") from cause
        except ImageStoreError as error:
            return error
    raise AssertionError("unreachable")


def test_failures_are_classified_by_cause() -> None:
    assert classify("image_store", s3_error("AccessDenied")) == Failure(
        "image_store_denied", True, str(s3_error("AccessDenied"))
    )
    for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        assert classify("image_store", s3_error(code)).reason == "image_store_denied"
    for code in ("NoSuchBucket", "404"):
        missing = s3_error(code)
        assert classify("image_store", missing) == Failure(
            "image_store_no_bucket", True, str(missing)
        )
    # The obstore upload path: the store's error carries S3's code itself (no botocore cause).
    for code, reason in (("AccessDenied", "image_store_denied"),
                         ("NoSuchBucket", "image_store_no_bucket"),
                         ("SlowDown", "image_store_unreachable"),
                         (None, "image_store_unreachable")):
        own = ImageStoreError("cannot upload", s3_code=code)
        assert classify("image_store", own) == Failure(reason, code in ("AccessDenied",
                                                                         "NoSuchBucket"),
                                                       "cannot upload")
    no_code = ImageStoreError("cannot upload")
    no_code.response = {"ResponseMetadata": {"HTTPStatusCode": 500}}  # type: ignore[attr-defined]
    assert classify("image_store", no_code).reason == "image_store_unreachable"
    slow = classify("image_store", s3_error("SlowDown"))
    assert slow.reason == "image_store_unreachable" and not slow.permanent
    down = ImageStoreError("cannot reach")
    down.__cause__ = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert classify("image_store", down).reason == "image_store_unreachable"
    rejected = IntegrityError("INSERT", {}, Exception("check constraint"))
    assert classify("database", rejected) == Failure("database_rejected", True, str(rejected))
    lost = OperationalError("SELECT", {}, Exception("connection refused"))
    assert classify("database", lost).reason == "database_unreachable"
    assert not classify("database", lost).permanent
    # An integrity error while talking to the image store is not the database's verdict.
    assert classify("image_store", rejected).reason == "image_store_unreachable"
    full = classify("outbox", OSError(errno.ENOSPC, "No space left on device"))
    assert full == Failure("disk_full", False, "[Errno 28] No space left on device")
    assert classify("database", OSError(errno.ENOSPC, "full")).reason == "disk_full"
    # A read-only volume is transient (parking would retry it only every park_retry_s).
    assert classify("outbox", OSError(errno.EROFS, "ro")) == Failure(
        "read_only", False, "[Errno 30] ro"
    )
    assert classify("image_store", OSError(errno.EROFS, "ro")).reason == "image_store_unreachable"
    assert classify("outbox", RuntimeError("?")) == Failure("outbox_error", False, "?")
    assert classify("outbox", RuntimeError()).detail == "RuntimeError"
    assert str(Failure("disk_full", False, "no room")) == "disk_full: no room"
    # Metrics report each known reason from zero: every reason given is among them.
    given = {
        classify(stage, exc).reason
        for stage in ("outbox", "image_store", "database")
        for exc in (
            s3_error("AccessDenied"),
            s3_error("NoSuchBucket"),
            rejected,
            lost,
            OSError(errno.ENOSPC, "full"),
            OSError(errno.EROFS, "ro"),
            down,
        )
    }
    assert given | {"unexpected"} <= set(REASONS)


def test_the_cause_is_found_however_the_error_was_chained() -> None:
    """A refusal wrapped by `raise ... from` (cause only), by raising inside `except` (context
    only) or in a chain that loops back on itself is still found, and the walk ends."""
    denied = s3_error("AccessDenied").__cause__
    assert isinstance(denied, ClientError)
    by_cause = ImageStoreError("cannot upload")
    by_cause.__cause__ = denied
    assert classify("image_store", by_cause).reason == "image_store_denied"
    try:
        try:
            raise denied
        except ClientError:
            raise ImageStoreError("cannot upload") from None  # context kept, cause None
    except ImageStoreError as error:
        by_context = error
    assert by_context.__cause__ is None and by_context.__context__ is denied
    by_context.__suppress_context__ = False
    assert classify("image_store", by_context).reason == "image_store_denied"
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert list(itertools.islice(_chain(first), 5)) == [first, second]
    assert classify("database", first).reason == "database_unreachable"


def test_backoff_is_exponential_jittered_and_capped() -> None:
    rng = random.Random(1)
    for attempts in range(1, 30):
        delay = backoff_s(attempts, 0.5, 30.0, rng)
        ceiling = min(30.0, 0.5 * 2 ** (attempts - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(backoff_s(8, 0.5, 30.0, rng), 6) for _ in range(20)}) > 1
    assert backoff_s(0, 1.0, 30.0, rng) <= 1.0  # the first attempt never waits longer


class FlakyStore(LocalImageStore):
    """Fails uploads with `error` while `failing(key)` says so."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls = 0
        self.fail_first = 0
        self.error: ImageStoreError = ImageStoreError("store down")
        self.refuse_keys: set[str] = set()
        self.ready_threads: list[str] = []  # the thread of each `ensure_ready` call
        self.puts: list[tuple[str, str, str]] = []  # (key, content type, thread) per upload
        self.ready_error: ImageStoreError | None = None  # raised once by `ensure_ready`

    def ensure_ready(self) -> None:
        self.ready_threads.append(threading.current_thread().name)
        error, self.ready_error = self.ready_error, None
        if error is not None:
            raise error
        super().ensure_ready()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.calls += 1
        self.puts.append((key, content_type, threading.current_thread().name))
        if self.calls <= self.fail_first or key in self.refuse_keys:
            raise self.error
        super().put(key, data, content_type)


@dataclass
class Rig:
    outbox: Outbox
    store: FlakyStore
    repository: PredictionRepository
    drainer: Drainer
    database: Path

    async def add(self, count: int, name: str = "Class01__Rotten") -> list[uuid.UUID]:
        records = [record(name=name) for _ in range(count)]
        for r in records:
            await self.outbox.add(r, r.uid.bytes)
        return [r.uid for r in records]

    async def until(self, condition, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
        for _ in range(int(timeout_s / 0.02)):
            if condition():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("timed out")

    def stored(self) -> set[uuid.UUID]:
        with sqlite3.connect(self.database) as conn:
            return {uuid.UUID(uid) for (uid,) in conn.execute("SELECT uid FROM predictions")}


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, **drainer_options: float) -> AsyncIterator[Rig]:
    database = tmp_path / "p.db"
    url = make_url(f"sqlite+aiosqlite:///{database}")
    await migrate(url)
    engine = create_engine(url)
    repository = PredictionRepository(engine)
    outbox = Outbox(tmp_path / "outbox", 1000, 10**8)
    await outbox.open()
    store = FlakyStore(tmp_path / "images")
    executor = ThreadPoolExecutor(4, thread_name_prefix="drainer-test")
    options = {"batch_size": 4, "retry_base_s": 0.01, "retry_max_s": 0.05, **drainer_options}
    drainer = Drainer(outbox, executor, **options)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"^Drainer\.start before attach$"):
        drainer.start()  # not before attach
    drainer.images = store  # half attached is not attached
    with pytest.raises(RuntimeError, match=r"^Drainer\.start before attach$"):
        drainer.start()
    drainer.attach(store, repository)
    drainer.start()
    assert drainer._task is not None and drainer._task.get_name() == "outbox-drainer"
    try:
        yield Rig(outbox, store, repository, drainer, database)
    finally:
        await drainer.stop(1)
        await outbox.close()
        await engine.dispose()
        executor.shutdown()


def test_the_drainer_retries_with_backoff_until_the_store_recovers(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path) as r:
            r.store.fail_first = 5
            records = [record() for _ in range(10)]
            for saved in records:
                await r.outbox.add(saved, saved.uid.bytes)
            # (An item leaves the index when its removal starts, and counts as drained once
            # the removal is committed: wait for both.)
            await r.until(lambda: r.outbox.backlog == 0 and r.drainer.drained == 10)
            assert r.drainer.failures >= 5
            assert r.drainer.failures_by_reason["image_store_unreachable"] == r.drainer.failures
            assert r.drainer.healthy and r.drainer.last_error is not None
            assert await r.repository.count() == 10
            for saved in records:
                assert (tmp_path / "images" / saved.image_path).read_bytes() == saved.uid.bytes
            # Re-draining the same items (a crash between insert and outbox delete) adds none.
            assert await r.repository.insert_many(records) == 0

    asyncio.run(scenario())


def test_a_failing_store_is_probed_one_item_at_a_time_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, retry_base_s=0.005, retry_max_s=0.01) as r:
            r.store.fail_first = 10**6
            attempts: list[int] = []  # items per failed attempt
            real_failed = r.drainer._failed

            def failed(entries, failure):  # type: ignore[no-untyped-def]
                attempts.append(len(entries))
                real_failed(entries, failure)

            r.drainer._failed = failed  # type: ignore[method-assign]
            with caplog.at_level(logging.DEBUG, "rottenbot_inference.storage.drainer"):
                await r.add(12)
                await r.until(lambda: r.store.calls >= 20)
                assert not r.drainer.healthy
                # While failing, each attempt is a single item (probing), not a batch of 4.
                assert len(attempts) > 5 and set(attempts[1:]) == {1}
                r.store.fail_first = 0
                await r.until(lambda: r.outbox.backlog == 0 and r.drainer.healthy)
            warnings = [
                m for m in caplog.messages if "not stored yet" in m and "retrying with backoff" in m
            ]
            assert len(warnings) == 1  # once per change of state, not once per attempt
            recovered = [m for m in caplog.messages if "reachable again" in m]
            assert len(recovered) == 1
            assert recovered[0].startswith(
                "drainer: storage reachable again after image_store_unreachable; "
            )
            assert r.drainer.healthy

    asyncio.run(scenario())


def test_a_permanent_failure_parks_its_items_and_the_rest_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, park_retry_s=0.5) as r:
            (denied,) = await r.add(1)
            r.store.error = s3_error("AccessDenied")
            r.store.refuse_keys = {r.outbox.get(denied).record.image_path}  # type: ignore[union-attr]
            with caplog.at_level(logging.WARNING, "rottenbot_inference.storage.drainer"):
                others = await r.add(9)
                await r.until(lambda: r.stored() == set(others))
                await r.until(lambda: r.outbox.parked == 1)
            entry = r.outbox.get(denied)
            assert entry is not None and entry.parked and entry.attempts >= 1
            assert "image_store_denied" in (entry.last_error or "")
            assert r.drainer.failures_by_reason["image_store_denied"] >= 1
            assert r.drainer.healthy  # a parked item is no outage
            parked = [m for m in caplog.messages if "parked" in m]
            assert parked and "retried every 0.5 s" in parked[0]
            r.store.refuse_keys = set()  # fixed: the next park retry stores it
            await r.until(lambda: r.outbox.backlog == 0, timeout_s=10)
            assert denied in r.stored()

    asyncio.run(scenario())


def test_a_row_the_database_rejects_is_isolated_from_its_batch(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, park_retry_s=60, batch_size=8) as r:
            async with r.repository.engine.begin() as conn:  # type: ignore[attr-defined]
                await conn.execute(
                    text(
                        "CREATE TRIGGER reject BEFORE INSERT ON predictions "
                        "WHEN NEW.predicted_class_name = 'Poison' "
                        "BEGIN SELECT RAISE(ABORT, 'rejected'); END"
                    )
                )
            await r.drainer.stop(0)  # add the whole batch first, then drain it at once
            r.drainer._task = None
            r.drainer._closing = False
            good = await r.add(3)
            (poison,) = await r.add(1, name="Poison")
            good += await r.add(3)
            r.drainer.start()
            await r.until(lambda: r.stored() == set(good))
            await r.until(lambda: r.outbox.parked == 1)
            assert r.outbox.get(poison) is not None and r.outbox.backlog == 1
            assert r.drainer.failures_by_reason == {"database_rejected": 1}

    asyncio.run(scenario())


def test_the_store_is_made_ready_once_before_the_first_upload(tmp_path: Path) -> None:
    """`ensure_ready` (S3: create the bucket if missing) runs on the drainer's executor before
    any upload, is retried while it fails, and once it succeeded is not called again."""

    async def scenario() -> None:
        async with rig(tmp_path) as r:
            await r.drainer.stop(0)  # add first, then let the drainer start on them
            r.drainer._task = None
            r.drainer._closing = False
            r.store.ready_error = ImageStoreError("cannot check bucket")
            await r.add(2)
            r.drainer.start()
            await r.until(lambda: r.drainer.drained == 2)
            assert r.drainer.failures_by_reason == {"image_store_unreachable": 2}
            assert r.drainer.last_error == "image_store_unreachable: cannot check bucket"
            await r.add(6)  # later batches do not ask again
            await r.until(lambda: r.drainer.drained == 8)
            assert len(r.store.ready_threads) == 2 and r.store.calls == 8
            assert all(name.startswith("drainer-test") for name in r.store.ready_threads)

    asyncio.run(scenario())


def test_an_upload_is_not_repeated_when_the_insert_fails(tmp_path: Path) -> None:
    """Uploads run on the drainer's executor with the record's content type (or a generic
    one); an image uploaded before its insert failed is not uploaded again on the retry; the
    row records the size and hash of the bytes actually stored."""

    async def scenario() -> None:
        async with rig(tmp_path) as r:
            real_insert = r.repository.insert_many
            down = [OperationalError("INSERT", {}, Exception("connection refused"))]

            async def insert_many(records):  # type: ignore[no-untyped-def]
                if down:
                    raise down.pop()
                return await real_insert(records)

            r.repository.insert_many = insert_many  # type: ignore[method-assign]
            typed, untyped = record(), record()
            untyped.content_type = None
            images = {typed.uid: b"typed image", untyped.uid: b"untyped"}
            for saved in (typed, untyped):
                await r.outbox.add(saved, images[saved.uid])
            await r.until(lambda: r.drainer.drained == 2)
            assert r.drainer.failures_by_reason["database_unreachable"] >= 1
            assert sorted((key, kind) for key, kind, _ in r.store.puts) == sorted(
                [(typed.image_path, "image/jpeg"), (untyped.image_path, "application/octet-stream")]
            )
            assert all(thread.startswith("drainer-test") for _, _, thread in r.store.puts)
            assert r.drainer._uploaded == set()
            with sqlite3.connect(r.database) as conn:
                rows = conn.execute("SELECT uid, image_bytes, image_sha256 FROM predictions")
                stored = {uuid.UUID(uid): (size, digest) for uid, size, digest in rows}
            assert stored == {
                uid: (len(data), hashlib.sha256(data).hexdigest()) for uid, data in images.items()
            }

    asyncio.run(scenario())


def test_an_outbox_that_fails_to_read_or_remove_is_retried(tmp_path: Path) -> None:
    """Reading an image back or removing drained items can fail (the volume): the items are
    retried with backoff under that reason, and none is lost or stored twice."""

    async def scenario() -> None:
        async with rig(tmp_path) as r:
            real_load, real_remove = r.outbox.load_images, r.outbox.remove
            # (popped from the end) a full volume, then an error only the outbox's stage names
            errors = {
                "load": [RuntimeError("unreadable"), OSError(errno.ENOSPC, "full")],
                "remove": [RuntimeError("?")],
            }

            async def load_images(uids):  # type: ignore[no-untyped-def]
                if errors["load"]:
                    raise errors["load"].pop()
                return await real_load(uids)

            async def remove(uids):  # type: ignore[no-untyped-def]
                if errors["remove"]:
                    raise errors["remove"].pop()
                return await real_remove(uids)

            r.outbox.load_images = load_images  # type: ignore[method-assign]
            r.outbox.remove = remove  # type: ignore[method-assign]
            uids = await r.add(1)
            await r.until(lambda: r.drainer.drained == 1)
            assert r.drainer.failures_by_reason == {"disk_full": 1, "outbox_error": 2}
            assert r.stored() == set(uids) and r.outbox.backlog == 0
            assert r.drainer.healthy and r.drainer.last_error == "outbox_error: ?"

    asyncio.run(scenario())


def test_a_batch_that_partly_failed_does_not_end_the_backoff(tmp_path: Path) -> None:
    """Only a batch that fully succeeded ends an outage: one whose uploads partly failed
    drains the rest but keeps the drainer backing off (unhealthy)."""

    async def scenario() -> None:
        async with rig(tmp_path, retry_base_s=60, retry_max_s=60) as r:
            await r.drainer.stop(0)  # drive `_drain` by hand
            uids = await r.add(4)
            r.store.refuse_keys = {r.outbox.get(uids[1]).record.image_path}  # type: ignore[union-attr]
            await r.drainer._drain(list(r.outbox.entries()))
            assert r.drainer.drained == 3 and r.outbox.backlog == 1
            assert not r.drainer.healthy and r.drainer._resume_at > 0

    asyncio.run(scenario())


def test_a_rejected_batch_returns_every_row_stored_one_by_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, park_retry_s=60) as r:
            async with r.repository.engine.begin() as conn:  # type: ignore[attr-defined]
                await conn.execute(
                    text(
                        "CREATE TRIGGER reject BEFORE INSERT ON predictions "
                        "WHEN NEW.predicted_class_name = 'Poison' "
                        "BEGIN SELECT RAISE(ABORT, 'rejected'); END"
                    )
                )
            await r.drainer.stop(0)
            good = [Entry(record(), 1, 0.0) for _ in range(3)]
            poison = Entry(record(name="Poison"), 1, 0.0)
            batch = [good[0], poison, good[1], good[2]]
            assert await r.drainer._insert(batch) == good
            assert r.stored() == {e.uid for e in good}
            assert poison.parked and not any(e.attempts for e in good)

    asyncio.run(scenario())


def test_stop_drains_within_the_grace_period_and_leaves_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with rig(tmp_path) as r:
            r.store.fail_first = 10**6
            await r.add(3)
            await r.until(lambda: r.drainer.failures >= 1)
            with caplog.at_level(logging.WARNING, "rottenbot_inference.storage.drainer"):
                await r.drainer.stop(0.2)
            assert r.drainer.closing and r.outbox.backlog == 3  # kept for the next start
            assert caplog.messages[-1] == (
                "stopping with 3 saves still in the outbox; they are drained at the next start"
            )
        async with rig(tmp_path) as r:
            await r.until(lambda: r.outbox.backlog == 0)  # resumed and drained
            assert len(r.stored()) == 3

    asyncio.run(scenario())


def test_stop_keeps_draining_what_is_due_then_returns(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path) as r:
            await r.drainer.stop(0)
            r.drainer._task = None
            r.drainer._closing = False
            await r.add(6)
            r.drainer.start()
            await r.drainer.stop(30)  # returns once everything due is drained, not after 30 s
            assert r.outbox.backlog == 0 and len(r.stored()) == 6

    asyncio.run(scenario())


def test_stop_waits_for_a_retry_due_within_the_grace_period(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, retry_base_s=1, retry_max_s=1) as r:
            r.store.fail_first = 1
            await r.add(2)
            await r.until(lambda: r.drainer.failures >= 1)
            await r.drainer.stop(30)  # the retry is due within 1 s: worth waiting for
            assert r.outbox.backlog == 0 and len(r.stored()) == 2
        never_started = Drainer(r.outbox, ThreadPoolExecutor(1))
        await never_started.stop(1)  # nothing to stop
        assert not never_started.closing

    asyncio.run(scenario())


def test_stop_gives_up_on_a_hung_upload_after_the_grace_period(tmp_path: Path) -> None:
    """An upload that never returns does not hold up the shutdown beyond its grace period;
    the item stays in the outbox."""
    hung = threading.Event()

    class HungStore(FlakyStore):
        def put(self, key: str, data: bytes, content_type: str) -> None:
            hung.wait(60)

    async def scenario() -> None:
        async with rig(tmp_path) as r:
            r.drainer.images = HungStore(tmp_path / "hung")
            try:
                await r.add(1)
                await asyncio.sleep(0.1)  # the upload has started
                # Only a hang reaches this bound: stop returns after its 0.2 s grace.
                await asyncio.wait_for(r.drainer.stop(0.2), 10)
                assert r.outbox.backlog == 1
            finally:
                hung.set()

    asyncio.run(scenario())


def test_the_drainer_sleeps_while_idle_and_wakes_when_the_backoff_ends(tmp_path: Path) -> None:
    """Nothing due: the loop waits (for an add, or the next item's due time) instead of
    spinning. Items due during a global backoff are tried once it ends, with no add to wake
    the drainer."""

    async def scenario() -> None:
        async with rig(tmp_path, park_retry_s=300) as r:
            turns: list[int] = []
            real_due = r.drainer._due

            def due(now, limit):  # type: ignore[no-untyped-def]
                turns.append(1)
                return real_due(now, limit)

            r.drainer._due = due  # type: ignore[method-assign]

            async def restart() -> None:
                await r.drainer.stop(0)
                r.drainer._task = None
                r.drainer._closing = False

            await restart()
            (waiting,) = await r.add(1)
            r.outbox.get(waiting).due = time.monotonic() + 300  # type: ignore[union-attr]
            r.drainer.start()
            await asyncio.sleep(0.3)
            assert 1 <= len(turns) < 20  # a spinning loop turns thousands of times
            await restart()
            r.outbox.get(waiting).due = 0.0  # type: ignore[union-attr]
            r.drainer._resume_at = time.monotonic() + 0.2  # backing off: due, not tried yet
            r.drainer.start()
            await r.until(lambda: r.drainer.drained == 1, timeout_s=10)

    asyncio.run(scenario())


def test_the_schema_is_ensured_before_each_insert(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With `ensure_schema` (migrations still running at start) the drainer waits for it
    before inserting; a drain with no failure before it logs no recovery."""
    steps: list[str] = []

    async def ensure_schema() -> None:
        steps.append("schema")

    async def scenario() -> None:
        async with rig(tmp_path, ensure_schema=ensure_schema) as r:  # type: ignore[arg-type]
            real_insert = r.repository.insert_many

            async def insert_many(records):  # type: ignore[no-untyped-def]
                steps.append("insert")
                return await real_insert(records)

            r.repository.insert_many = insert_many  # type: ignore[method-assign]
            with caplog.at_level(logging.INFO, "rottenbot_inference.storage.drainer"):
                await r.add(1)
                await r.until(lambda: r.drainer.drained == 1)
            assert steps == ["schema", "insert"]
            assert caplog.messages == []

    asyncio.run(scenario())


def test_an_unexpected_error_is_logged_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a drain (not an outage) does not end the drainer: it is logged with its
    traceback, counted as "unexpected", and the items are retried."""

    async def scenario() -> None:
        async with rig(tmp_path) as r:
            real_insert = r.drainer._insert
            bugs = [TypeError("a bug")]

            async def insert(entries):  # type: ignore[no-untyped-def]
                if bugs:
                    raise bugs.pop()
                return await real_insert(entries)

            r.drainer._insert = insert  # type: ignore[method-assign]
            with caplog.at_level(logging.ERROR, "rottenbot_inference.storage.drainer"):
                await r.add(1)
                await r.until(lambda: r.drainer.drained == 1)
            assert r.drainer.failures_by_reason == {"unexpected": 1}
            assert r.drainer.last_error == "unexpected: a bug"
            (logged,) = [x for x in caplog.records if x.levelno == logging.ERROR]
            assert logged.getMessage() == "drainer: unexpected error" and logged.exc_info

    asyncio.run(scenario())


def test_due_takes_the_oldest_free_items_up_to_the_limit(tmp_path: Path) -> None:
    drainer = Drainer(Outbox(tmp_path, 10, 10), ThreadPoolExecutor(1))
    entries = [Entry(record(), 1, 0.0, due=due) for due in (50.0, 100.0, 30.0, 150.0, 120.0)]
    entries[2].claim()  # busy (a delete, or a drain): not offered
    drainer.outbox._index = {e.uid: e for e in entries}
    assert drainer._due(100.0, 5) == (entries[:2], 120.0)  # due <= now; the next at 120
    assert drainer._due(100.0, 1) == (entries[:1], 100.0)  # more are due now
    assert drainer._due(10.0, 5) == ([], 50.0)
    entries[2].release()
    assert drainer._due(40.0, 5) == ([entries[2]], 50.0)


def test_cut_short_abandons_the_grace_period(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path, retry_base_s=5, retry_max_s=5) as r:
            r.store.fail_first = 1
            await r.add(2)
            await r.until(lambda: r.drainer.failures >= 1)
            stopping = asyncio.ensure_future(r.drainer.stop(60))
            await asyncio.sleep(0.05)
            assert not stopping.done()
            r.drainer.cut_short()
            await asyncio.wait_for(stopping, 10)
            assert r.outbox.backlog == 2

    asyncio.run(scenario())


def test_request_spans_are_remembered_and_forgotten(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path) as r:
            uid = uuid.uuid4()
            r.drainer.remember_request(uid, None)  # no span: nothing kept
            assert uid not in r.drainer._request_spans
            r.drainer.remember_request(uid, "span")  # type: ignore[arg-type]
            assert r.drainer._request_spans[uid] == "span"
            r.drainer._uploaded.add(uid)
            r.drainer.forget(uid)
            assert uid not in r.drainer._request_spans
            assert uid not in r.drainer._uploaded
            r.drainer.forget(uuid.uuid4())  # a delete of an item never remembered is fine

    asyncio.run(scenario())


def test_drain_spans_link_to_the_request_that_saved_the_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload's and the insert's spans link to the saving request's span (the save
    outlives the request); what was remembered is forgotten once the item is drained."""
    spans: list[tuple[str, dict[str, object], list[object]]] = []

    @contextlib.contextmanager
    def spy(name: str, attributes: dict[str, object] | None = None, links: object = ()):  # type: ignore[no-untyped-def]
        spans.append((name, attributes, list(links or ())))  # type: ignore[call-overload]
        yield

    monkeypatch.setattr(drainer_module, "traced", spy)
    linked, plain = record(), record()

    async def scenario() -> None:
        async with rig(tmp_path) as r:
            r.drainer.remember_request(linked.uid, "request span")  # type: ignore[arg-type]
            for saved in (linked, plain):
                await r.outbox.add(saved, saved.uid.bytes)
            await r.until(lambda: r.drainer.drained == 2)
            assert r.drainer._request_spans == {}

    asyncio.run(scenario())
    uploads = {
        attrs["prediction.uid"]: (attrs, links)
        for name, attrs, links in spans
        if name == "save_image_s3"
    }
    assert uploads == {
        str(saved.uid): ({"prediction.uid": str(saved.uid), "image.bytes": 16}, links)
        for saved, links in ((linked, ["request span"]), (plain, []))
    }
    inserts = [
        (attrs["db.rows"], links) for name, attrs, links in spans if name == "save_prediction_db"
    ]
    assert sum(rows for rows, _ in inserts) == 2  # type: ignore[misc]
    assert [link for _, links in inserts for link in links] == ["request span"]


def test_a_failure_schedules_the_item_and_the_drainer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`_failed` alone (no loop running): the item's retry state, the whole drainer's backoff
    (exponential in the consecutive failures), the counts and one log line per change."""
    drainer = Drainer(
        Outbox(tmp_path, 10, 10),
        ThreadPoolExecutor(1),
        retry_base_s=1,
        retry_max_s=1000,
        park_retry_s=300,
    )
    entry = Entry(record(), 1, 0.0)
    down = Failure("image_store_unreachable", False, "store down")
    with caplog.at_level(logging.DEBUG, "rottenbot_inference.storage.drainer"):
        for attempts in range(1, 5):
            before = time.monotonic()
            drainer._failed([entry], down)
            after = time.monotonic()
            ceiling = 2 ** (attempts - 1)  # base 1 s, doubled per attempt; jitter in [d/2, d]
            assert entry.attempts == attempts and not entry.parked
            assert before + ceiling / 2 <= entry.due <= after + ceiling
            assert before + ceiling / 2 <= drainer._resume_at <= after + ceiling
            assert not drainer.healthy
        assert entry.last_error == drainer.last_error == "image_store_unreachable: store down"
        assert drainer.failures == 4 and drainer.failures_by_reason == {down.reason: 4}
        resume_at = drainer._resume_at
        denied = Failure("image_store_denied", True, "access denied")
        before = time.monotonic()
        drainer._failed([entry], denied)
        after = time.monotonic()
        assert entry.parked and entry.attempts == 5
        assert before + 300 <= entry.due <= after + 300  # retried every park_retry_s
        assert drainer._resume_at == resume_at  # a parked item holds up nobody
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "drainer: saves not stored yet (image_store_unreachable: store down); "
        "retrying with backoff, 0 pending",
        "drainer: saves parked (image_store_denied: access denied): they stay in the outbox, "
        "retried every 300 s; 0 pending",
    ]
    repeats = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert repeats == ["drainer: 1 saves not stored yet (image_store_unreachable: store down)"] * 3
