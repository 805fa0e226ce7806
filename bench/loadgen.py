"""HTTP load generator for the predict endpoint: open loop (no coordinated omission) or closed.

Open loop: requests are *scheduled* at a constant (or Poisson) rate and each latency is measured
from its intended send time, so time spent queueing - in the server or in the client - counts.
Closed loop: N workers send back to back (peak throughput).

    python bench/loadgen.py --url http://127.0.0.1:8000 --images 'bench/images/*_1024x768.jpg' \
        --rate 60 --duration 60 [--poisson] [--save-fraction 0.5] [--json out.json]
    python bench/loadgen.py --url ... --images ... --concurrency 8 --duration 30

Tokens are minted with JWT_SECRET (as the auth service does); a fresh user per run.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from rottenbot_inference.auth.tokens import mint_token
from rottenbot_inference.settings import Settings

PREDICT = "/api/v1/inference/predict"


@dataclass
class Results:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    # Per request, in the order answered: intended send time (s after start) and status.
    sent_s: list[float] = field(default_factory=list)
    codes: list[int | str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # per request: "<W>x<H>.<ext>" of its image
    started: float = 0.0
    finished: float = 0.0

    def summary(self) -> dict:
        elapsed = max(self.finished - self.started, 1e-9)
        ok = self.statuses.get(200, 0)
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        pct = {f"p{p}": float(np.percentile(lat, p)) for p in (50, 90, 99, 99.9)}
        return {
            "requests": sum(self.statuses.values()),
            "ok_per_s": ok / elapsed,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
            **{k: round(v, 2) for k, v in pct.items()},
            "max": round(float(np.max(lat)), 2),
            "elapsed_s": round(elapsed, 2),
            **({"by_image": self.by_kind()} if len(set(self.kinds)) > 1 else {}),
        }

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Latency percentiles per upload kind (size and format), for mixed-size runs."""
        groups: dict[str, list[float]] = {}
        for kind, latency in zip(self.kinds, self.latencies_ms, strict=True):
            groups.setdefault(kind, []).append(latency)
        return {
            kind: {"requests": len(values),
                   **{f"p{p}": round(float(np.percentile(values, p)), 2) for p in (50, 99)}}
            for kind, values in sorted(groups.items(), key=lambda item: _pixels(item[0]))
        }


def _pixels(kind: str) -> tuple[int, str]:
    """Sort key of "1024x768.jpg": pixel count, then format."""
    size, _, ext = kind.partition(".")
    width, _, height = size.partition("x")
    return (int(width) * int(height) if width.isdigit() and height.isdigit() else 0, ext)


class Client:
    def __init__(self, url: str, images: list[tuple[str, bytes]], token: str,
                 save_fraction: float, seed: int) -> None:
        self.url = url.rstrip("/") + PREDICT
        self.images = images
        self.headers = {"Authorization": f"Bearer {token}"}
        self.save_fraction = save_fraction
        self.random = random.Random(seed)
        self.results = Results()

    async def one(self, session: aiohttp.ClientSession, intended: float) -> None:
        name, data = self.images[self.random.randrange(len(self.images))]
        save = self.random.random() < self.save_fraction
        form = aiohttp.FormData()
        kind = "image/png" if name.endswith(".png") else "image/jpeg"
        form.add_field("file", data, filename=name, content_type=kind)
        try:
            async with session.post(
                self.url, data=form, headers=self.headers,
                params={"save_prediction": "True" if save else "False"},
            ) as response:
                await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            status = type(exc).__name__
        self.results.latencies_ms.append((time.perf_counter() - intended) * 1000)
        self.results.statuses[status] += 1
        self.results.sent_s.append(intended - self.results.started)
        self.results.codes.append(status)
        self.results.kinds.append(name.rpartition("_")[2])


async def open_loop(client: Client, rate: float, duration: float, poisson: bool) -> Results:
    connector = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        start = time.perf_counter() + 0.05
        client.results.started = start
        intended = start
        rng = np.random.default_rng(1)
        while intended < start + duration:
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(client.one(session, intended)))
            intended += rng.exponential(1 / rate) if poisson else 1 / rate
        await asyncio.gather(*tasks)
        client.results.finished = time.perf_counter()
    return client.results


async def closed_loop(client: Client, concurrency: int, duration: float) -> Results:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        client.results.started = time.perf_counter()
        end = client.results.started + duration

        async def worker() -> None:
            while time.perf_counter() < end:
                await client.one(session, time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        client.results.finished = time.perf_counter()
    return client.results


def load_images(pattern: str) -> list[tuple[str, bytes]]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"no images match {pattern!r} (make them: python bench/imageset.py)")
    return [(Path(p).name, Path(p).read_bytes()) for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--images", default="bench/images/*_1024x768.jpg")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: requests per second")
    mode.add_argument("--concurrency", type=int, help="closed loop: workers")
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--poisson", action="store_true")
    parser.add_argument("--save-fraction", type=float, default=0.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds, not counted")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    settings = Settings()
    token = mint_token(settings.jwt_secret.get_secret_value(), settings.jwt_algorithm,
                       uuid.uuid4(), ttl_s=int(args.duration + args.warmup + 600))
    images = load_images(args.images)

    def run(duration: float) -> Results:
        client = Client(args.url, images, token, args.save_fraction, seed=0)
        if args.rate:
            return asyncio.run(open_loop(client, args.rate, duration, args.poisson))
        return asyncio.run(closed_loop(client, args.concurrency, duration))

    if args.warmup > 0:
        run(args.warmup)
    summary = {"mode": "open" if args.rate else "closed", "offered_rate": args.rate,
               "concurrency": args.concurrency, "images": args.images,
               "save_fraction": args.save_fraction, **run(args.duration).summary()}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
