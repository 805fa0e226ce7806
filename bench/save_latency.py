"""Added latency of save_prediction=true versus false, through a real server on loopback.

    python bench/save_latency.py                       # embedded (SQLite + local folder)
    python bench/save_latency.py --backend postgres    # PostgreSQL + moto S3 (started here)
    python bench/save_latency.py --backend both --requests 200

Sequential requests on one keep-alive connection, the two modes interleaved in blocks (this VM's
speed drifts over minutes; interleaving keeps the comparison fair). Reports medians and p90 of
each and their difference: the cost of the durable outbox commit (fsync) on the request path.
The tiny test model is used unless --model is given (inference time is not what is measured).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import TEST_SECRET, auth, build_tiny_keras, jpeg_bytes, random_photo  # noqa: E402
from tests.servers_storage import ServiceProcess, start_moto, start_postgres  # noqa: E402

PREDICT = "/api/v1/inference/predict"


def measure(base_url: str, requests: int, block: int = 20) -> dict[str, list[float]]:
    photo = jpeg_bytes(random_photo(480, 640, seed=1))
    headers = auth(uuid.uuid4())
    timings: dict[str, list[float]] = {"False": [], "True": []}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:

        def call(flag: str) -> float:
            started = time.perf_counter()
            response = client.post(
                f"{PREDICT}?save_prediction={flag}", files={"file": ("a.jpg", photo, "image/jpeg")}
            )
            elapsed = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            return elapsed

        for flag in ("False", "True"):  # warm-up: connections, pools, first outbox commit
            for _ in range(10):
                call(flag)
        while min(len(v) for v in timings.values()) < requests:
            for flag in ("False", "True"):
                timings[flag] += [call(flag) for _ in range(block)]
    return {flag: values[:requests] for flag, values in timings.items()}


def report(name: str, timings: dict[str, list[float]]) -> None:
    def q(values: list[float], p: float) -> float:
        return statistics.quantiles(values, n=100)[int(p) - 1]

    off, on = timings["False"], timings["True"]
    med_off, med_on = statistics.median(off), statistics.median(on)
    print(f"\n{name}: {len(off)} + {len(on)} sequential requests, interleaved blocks of 20")
    print(f"  save_prediction=false  median {med_off:7.2f} ms  p90 {q(off, 90):7.2f}")
    print(f"  save_prediction=true   median {med_on:7.2f} ms  p90 {q(on, 90):7.2f}")
    print(f"  added by saving        median {med_on - med_off:+7.2f} ms")


def run(name: str, env: dict[str, str], folder: Path, requests: int) -> None:
    service = ServiceProcess(env, folder / f"{name}.log")
    try:
        report(name, measure(service.start(), requests))
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["embedded", "postgres", "both"], default="both")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--model", type=Path, help="model file/folder (default: tiny test model)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="save-latency-") as temp:
        folder = Path(temp)
        model = args.model or build_tiny_keras(folder / "model")
        base = {
            "MODEL_PATH": str(model),
            "MODEL_CACHE_DIR": str(folder / "cache"),
            "JWT_SECRET": TEST_SECRET,
            "LOG_LEVEL": "warning",
        }
        if args.backend in ("embedded", "both"):
            run("embedded (SQLite + local folder)", {**base, "DATA_DIR": str(folder / "d1")},
                folder, args.requests)
        if args.backend in ("postgres", "both"):
            postgres = start_postgres()
            moto = start_moto(folder / "moto.log")
            try:
                env = {
                    **base,
                    "DATA_DIR": str(folder / "d2"),
                    "DATABASE_URL": postgres.url(postgres.create_database("bench")),
                    **moto.env("images"),
                }
                run("PostgreSQL + S3 (moto)", env, folder, args.requests)
            finally:
                moto.stop()
                postgres.destroy()


if __name__ == "__main__":
    main()
