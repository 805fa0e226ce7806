"""Explanation requests at a steady rate, to run alongside bench/loadgen.py's predict load.

    python bench/explain_alongside.py --url http://127.0.0.1:8000 \
        --images 'bench/images/*_1024x768.jpg' --rate 1 --duration 30

Sends one `POST /api/v1/inference/explain` every 1/rate seconds (each on its own task, so a
slow one does not delay the next) and prints how many were answered 200 or refused (503), and
the answered ones' latency. Tokens are minted with JWT_SECRET, like loadgen.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np

from rottenbot_inference.auth.tokens import mint_token
from rottenbot_inference.settings import Settings

EXPLAIN = "/api/v1/inference/explain"


async def run(url: str, images: list[bytes], rate: float, duration: float) -> dict:
    settings = Settings()
    token = mint_token(settings.jwt_secret.get_secret_value(), settings.jwt_algorithm,
                       uuid.uuid4())
    headers = {"Authorization": f"Bearer {token}"}
    statuses: Counter[int | str] = Counter()
    latencies: list[float] = []

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        form = aiohttp.FormData()
        form.add_field("file", images[index % len(images)], filename="p.jpg",
                       content_type="image/jpeg")
        started = time.perf_counter()
        try:
            async with session.post(url.rstrip("/") + EXPLAIN, data=form,
                                    headers=headers) as response:
                await response.read()
                statuses[response.status] += 1
                if response.status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
        except aiohttp.ClientError as exc:
            statuses[type(exc).__name__] += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        tasks = []
        start = time.perf_counter()
        index = 0
        while (due := start + index / rate) < start + duration:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, index)))
            index += 1
        await asyncio.gather(*tasks)
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "sent": index,
        "statuses": {str(k): v for k, v in statuses.items()},
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p90_ms": round(float(np.percentile(lat, 90)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--images", default="bench/images/*_1024x768.jpg")
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=30.0)
    args = parser.parse_args()
    images = [Path(path).read_bytes() for path in sorted(glob.glob(args.images))]
    if not images:
        raise SystemExit(f"no images match {args.images}")
    print(json.dumps(asyncio.run(run(args.url, images, args.rate, args.duration)), indent=2))


if __name__ == "__main__":
    main()
