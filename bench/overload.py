"""Overload: offer N x capacity for D seconds, then drop to a calm rate and watch recovery.

    python bench/overload.py --url http://127.0.0.1:8000 --images 'bench/images/*_1024x768.jpg' \
        [--capacity 95 | --measure-s 10 --concurrency 4] --factor 3 --duration 60 \
        --calm-factor 0.5 --after 15 [--json bench/results/overload.json]

1. Capacity: `--capacity` req/s, or measured first with loadgen's closed loop (peak 200/s).
2. Overload: loadgen's open loop at factor x capacity for `--duration` s (latency counted
   from each request's intended send time, so waiting anywhere counts).
3. Recovery: from the moment the overload schedule ends, a second open loop at
   calm-factor x capacity for `--after` s, while the overload's last requests finish.

Reports for the overload phase: accepted (200) rate and p50/p99/max latency, the share of
503s and their latency, anything else (timeouts, resets); for the recovery phase: the same,
per second after the drop. JWT_SECRET must be the server's (tokens are minted like loadgen's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from loadgen import Client, Results, closed_loop, load_images, open_loop
from rottenbot_inference.auth.tokens import mint_token
from rottenbot_inference.settings import Settings


def percentiles(values: list[float], *points: float) -> dict[str, float | None]:
    if not values:
        return {f"p{p:g}": None for p in points}
    array = np.asarray(values)
    return {f"p{p:g}": round(float(np.percentile(array, p)), 1) for p in points}


def phase_summary(results: Results, seconds: float) -> dict:
    """Accepted vs shed vs failed, with latencies, for one open-loop phase."""
    by_status: dict[str, list[float]] = {}
    for code, latency in zip(results.codes, results.latencies_ms, strict=True):
        by_status.setdefault(str(code), []).append(latency)
    total = len(results.codes)
    accepted = by_status.get("200", [])
    shed = by_status.get("503", [])
    return {
        "requests": total,
        "offered_per_s": round(total / seconds, 1),
        "accepted_per_s": round(len(accepted) / seconds, 1),
        "accepted_ms": {**percentiles(accepted, 50, 90, 99, 99.9),
                        "max": round(max(accepted), 1) if accepted else None},
        "shed_share": round(len(shed) / total, 3) if total else None,
        "shed_ms": percentiles(shed, 50, 99),
        "statuses": dict(Counter(str(code) for code in results.codes)),
    }


def per_second(results: Results, seconds: int) -> list[dict]:
    """Recovery, second by second after the drop: requests, 200s, 503s, p50/p99 of the 200s."""
    rows = []
    for second in range(seconds):
        window = [
            (code, latency)
            for code, sent, latency in zip(
                results.codes, results.sent_s, results.latencies_ms, strict=True
            )
            if second <= sent < second + 1
        ]
        ok = [latency for code, latency in window if code == 200]
        rows.append({
            "second": second + 1,
            "requests": len(window),
            "ok": len(ok),
            "shed": sum(1 for code, _ in window if code == 503),
            **percentiles(ok, 50, 99),
        })
    return rows


async def overload_then_calm(
    overload: Client, calm: Client, rate: float, calm_rate: float, duration: float,
    after: float, poisson: bool,
) -> tuple[Results, Results]:
    async def later() -> Results:
        await asyncio.sleep(duration + 0.05)  # open_loop starts its schedule 50 ms in
        return await open_loop(calm, calm_rate, after, poisson)

    return tuple(await asyncio.gather(  # type: ignore[return-value]
        open_loop(overload, rate, duration, poisson), later()
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--images", default="bench/images/*_1024x768.jpg")
    parser.add_argument("--capacity", type=float, help="req/s; default: measure it first")
    parser.add_argument("--measure-s", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=4, help="closed loop for measuring")
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--calm-factor", type=float, default=0.5)
    parser.add_argument("--after", type=float, default=15)
    parser.add_argument("--poisson", action="store_true")
    parser.add_argument("--save-fraction", type=float, default=0.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    settings = Settings()
    total_s = args.measure_s + args.duration + args.after + 600
    token = mint_token(settings.jwt_secret.get_secret_value(), settings.jwt_algorithm,
                       uuid.uuid4(), ttl_s=int(total_s))
    images = load_images(args.images)

    def client(seed: int) -> Client:
        return Client(args.url, images, token, args.save_fraction, seed=seed)

    capacity = args.capacity
    if capacity is None:
        measured = asyncio.run(closed_loop(client(0), args.concurrency, args.measure_s))
        capacity = measured.summary()["ok_per_s"]
        print(f"measured capacity: {capacity:.1f} req/s (closed loop, {args.concurrency} workers)")
    rate, calm_rate = capacity * args.factor, capacity * args.calm_factor
    print(f"offering {rate:.1f} req/s for {args.duration:g} s, then {calm_rate:.1f} req/s "
          f"for {args.after:g} s")
    over, calm = asyncio.run(overload_then_calm(
        client(1), client(2), rate, calm_rate, args.duration, args.after, args.poisson
    ))
    report = {
        "url": args.url,
        "images": args.images,
        "capacity_per_s": round(capacity, 1),
        "factor": args.factor,
        "overload": phase_summary(over, args.duration),
        "recovery": phase_summary(calm, args.after),
        "recovery_per_second": per_second(calm, int(args.after)),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
