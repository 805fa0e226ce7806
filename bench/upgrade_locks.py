"""What our migrations cost a running deployment of the original service (docs/upgrading.md).

    python bench/upgrade_locks.py                   # 1,000,000 original rows
    python bench/upgrade_locks.py --rows 200000

Starts a throwaway PostgreSQL on loopback (tests/servers_storage.py), fills the original
service's table (naive `timestamp`, no Alembic) and runs our migrations on it while two clients
keep working, as replicas would during a rolling upgrade: one inserts rows shaped like the
original service's (its columns only, one per 20 ms), one reads a user's newest predictions the
way the history endpoint does. Reports the migration's duration and the longest either client
waited while it ran.

Then, on fresh copies, the two ways of turning `created_at` into `timestamptz`: with
`USING created_at AT TIME ZONE 'UTC'` (rewrites the table under an exclusive lock) and through
the session time zone (what migration 0001 does: a catalog change on PostgreSQL 12+).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from tests.servers_storage import PostgresServer, start_postgres  # noqa: E402

from rottenbot_inference.storage.db import migrate  # noqa: E402

ORIGINAL_TABLE = (
    "CREATE TABLE predictions (uid uuid NOT NULL PRIMARY KEY, image_path varchar NOT NULL UNIQUE, "
    "predicted_class integer NOT NULL, predicted_class_name varchar NOT NULL, "
    "confidence float NOT NULL, user_uid uuid NOT NULL, created_at timestamp NOT NULL)"
)
# 1,000 users, one prediction a minute going back in time (flat keys, shortened).
FILL = (
    "INSERT INTO predictions SELECT gen_random_uuid(), i || '.jpg', i % 28, 'Class__' || (i % 28), "
    "0.9, ('00000000-0000-0000-0000-' || lpad((i % 1000)::text, 12, '0'))::uuid, "
    "TIMESTAMP '2025-01-01' - i * interval '1 minute' FROM generate_series({first}, {last}) i"
)
FILL_BATCH = 200_000  # rows per statement (psql calls time out after 60 s)
ORIGINAL_INSERT = (
    "INSERT INTO predictions (uid, image_path, predicted_class, predicted_class_name, "
    "confidence, user_uid, created_at) VALUES (gen_random_uuid(), $1, 3, 'Class__3', 0.9, "
    "'00000000-0000-0000-0000-000000000001', (now() AT TIME ZONE 'UTC')::timestamp)"
)
HISTORY = (
    "SELECT uid, created_at FROM predictions WHERE user_uid = "
    "'00000000-0000-0000-0000-000000000001' ORDER BY created_at DESC, uid DESC LIMIT 20"
)
ALTERS = {
    "USING created_at AT TIME ZONE 'UTC'": (
        "ALTER TABLE predictions ALTER COLUMN created_at TYPE timestamptz "
        "USING created_at AT TIME ZONE 'UTC'"
    ),
    "SET LOCAL TIME ZONE 'UTC', no USING": (
        "SET LOCAL TIME ZONE 'UTC'; "
        "ALTER TABLE predictions ALTER COLUMN created_at TYPE timestamptz"
    ),
}


def original_database(postgres: PostgresServer, rows: int) -> str:
    database = postgres.create_database("upgrade")
    postgres.psql(ORIGINAL_TABLE, database)
    for first in range(1, rows + 1, FILL_BATCH):
        last = min(rows, first + FILL_BATCH - 1)
        postgres.psql(FILL.format(first=first, last=last), database)
    postgres.psql("VACUUM ANALYZE predictions", database)
    return database


async def client_loop(dsn: str, statement: str, stop: asyncio.Event, waits: list[float],
                      with_key: bool) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        count = 0
        while not stop.is_set():
            count += 1
            started = time.perf_counter()
            args = (f"bench_{id(waits)}_{count}.jpg",) if with_key else ()
            await connection.execute(statement, *args)
            waits.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)
    finally:
        await connection.close()


async def migrate_under_traffic(postgres: PostgresServer, database: str) -> dict[str, float]:
    dsn = postgres.url(database, driver="postgresql")
    stop = asyncio.Event()
    inserts: list[float] = []
    reads: list[float] = []
    clients = [
        asyncio.create_task(client_loop(dsn, ORIGINAL_INSERT, stop, inserts, True)),
        asyncio.create_task(client_loop(dsn, HISTORY, stop, reads, False)),
    ]
    await asyncio.sleep(1.0)
    inserts.clear()
    reads.clear()
    started = time.perf_counter()
    await migrate(make_url(postgres.url(database)))
    took = time.perf_counter() - started
    stop.set()
    await asyncio.gather(*clients)
    return {
        "migration_s": took,
        "longest_insert_s": max(inserts),
        "longest_read_s": max(reads),
        "inserts": len(inserts),
        "reads": len(reads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    postgres = start_postgres()
    try:
        version = postgres.psql("SHOW server_version")
        database = original_database(postgres, args.rows)
        size = postgres.psql("SELECT pg_size_pretty(pg_total_relation_size('predictions'))",
                             database)
        print(f"PostgreSQL {version}, {args.rows:,} original rows ({size})")
        result = asyncio.run(migrate_under_traffic(postgres, database))
        print(
            f"our migrations under traffic: {result['migration_s']:.2f} s; while they ran, the "
            f"longest original-style insert took {result['longest_insert_s']:.2f} s "
            f"({result['inserts']} inserts), the longest history read "
            f"{result['longest_read_s']:.2f} s ({result['reads']} reads)"
        )
        for name, alter in ALTERS.items():
            database = original_database(postgres, args.rows)
            before = postgres.psql("SELECT pg_relation_filenode('predictions')", database)
            started = time.perf_counter()
            postgres.psql(f"BEGIN; {alter}; COMMIT;", database)
            took = time.perf_counter() - started
            after = postgres.psql("SELECT pg_relation_filenode('predictions')", database)
            rewritten = "rewrote the table" if before != after else "no rewrite"
            print(f"created_at -> timestamptz, {name}: {took:.2f} s, {rewritten}")
    finally:
        postgres.destroy()


if __name__ == "__main__":
    main()
