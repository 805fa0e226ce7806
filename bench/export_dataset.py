"""Throughput and memory of `rottenbot-inference export-dataset` over N saved predictions.

    python bench/export_dataset.py                  # 10,000 images, --jobs 8
    python bench/export_dataset.py --images 2000 --jobs 4

Starts PostgreSQL and moto's S3 server on loopback (tests/servers_storage.py), seeds N rows
and N distinct JPEGs (96x96, about 3-4 kB each), then runs the export command as a subprocess,
sampling its RSS (VmRSS) every 50 ms. Reports images/s of the whole run (count query, streaming,
downloads, hashing, renames, manifest) and RSS a quarter of the way through the run and at its
peak: flat memory means the two are close. A second run into the same folder measures the
resume path (every file re-hashed, nothing downloaded). moto is a single Python process: it, not the
exporter, is likely the bottleneck, so the figure is a floor for a real S3/MinIO.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy.engine import make_url  # noqa: E402
from tests.helpers import class_map, jpeg_bytes, random_photo  # noqa: E402
from tests.servers_storage import start_moto, start_postgres  # noqa: E402

from rottenbot_inference.storage.db import PredictionRepository, create_engine, migrate  # noqa: E402
from rottenbot_inference.storage.records import PredictionRecord  # noqa: E402

CLASSES = list(class_map().values())


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def insert(url: str, records: list[PredictionRecord]) -> None:
    await migrate(make_url(url))
    engine = create_engine(make_url(url))
    try:
        repository = PredictionRepository(engine)
        for start in range(0, len(records), 1000):
            await repository.insert_many(records[start:start + 1000])
    finally:
        await engine.dispose()


def seed(count: int, database_url: str, s3, bucket: str) -> None:
    s3.create_bucket(Bucket=bucket)
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    users = [uuid.uuid4() for _ in range(50)]

    def one(index: int) -> PredictionRecord:
        image = jpeg_bytes(random_photo(96, 96, seed=index))
        uid, user = uuid.uuid4(), users[index % len(users)]
        created = start + dt.timedelta(seconds=index)
        key = f"{user}/{created:%Y/%m/%d}/{uid}.jpg"
        s3.put_object(Bucket=bucket, Key=key, Body=image)
        return PredictionRecord(
            uid=uid, user_uid=user, created_at=created, image_path=key,
            predicted_class=index % len(CLASSES),
            predicted_class_name=CLASSES[index % len(CLASSES)],
            confidence=0.95, model_version="bench", image_sha256=hashlib.sha256(image).hexdigest(),
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        records = list(pool.map(one, range(count)))
    asyncio.run(insert(database_url, records))


def run(command: list[str], env: dict[str, str], count: int) -> dict[str, float]:
    began = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples: list[float] = []
    while process.poll() is None:
        value = rss_mb(process.pid)
        if value is not None:
            samples.append(value)
        time.sleep(0.05)
    out, err = process.communicate()
    seconds = time.perf_counter() - began
    if process.returncode != 0:
        raise SystemExit(f"export failed ({process.returncode}): {err.decode()[-2000:]}")
    print(out.decode().strip())
    quarter = samples[len(samples) // 4] if samples else 0.0
    return {"seconds": round(seconds, 2), "images_per_s": round(count / seconds, 1),
            "rss_mb_at_25pct_of_run": round(quarter, 1), "rss_mb_peak": round(max(samples), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        postgres = start_postgres()
        moto = start_moto(work / "moto.log")
        try:
            database = postgres.create_database("bench")
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            url = postgres.url(database)
            began = time.perf_counter()
            seed(args.images, url, moto.client(), bucket)
            print(f"seeded {args.images} images in {time.perf_counter() - began:.1f} s")
            classes = work / "classes.json"
            classes.write_text(json.dumps(class_map()))
            env = {**os.environ, **moto.env(bucket), "DATABASE_URL": url}
            command = [sys.executable, "-m", "rottenbot_inference", "export-dataset",
                       "--out", str(work / "out"), "--classes", str(classes),
                       "--jobs", str(args.jobs), "--labels", "predicted"]
            fresh = run(command, env, args.images)
            resumed = run(command, env, args.images)
            print(json.dumps({"images": args.images, "jobs": args.jobs, "cpus": os.cpu_count(),
                              "fresh": fresh, "resume": resumed}, indent=1))
        finally:
            moto.stop()
            postgres.destroy()


if __name__ == "__main__":
    main()
