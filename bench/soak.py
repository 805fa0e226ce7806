"""Soak: a steady open-loop rate for a long time; the server's memory and p99 per window.

    python bench/soak.py --url http://127.0.0.1:8000 --images 'bench/images/*_1024x768.jpg' \
        --rate 45 --duration 1200 --window 60 [--pid PID] [--save-fraction 0.5] \
        [--csv bench/results/soak.csv] [--markdown bench/results/soak.md]

The load is loadgen's open loop (latency from each request's intended send time). Every
`--window` seconds the serving process's RSS is read from /proc (`--pid`, or the process
listening on the URL's port); each window's row has the requests sent in it, their statuses
and p50/p99/max, and the RSS at its end. Pass criteria worth reading off the table: RSS flat
after the first windows (no growth with requests served), p99 stable from window to window.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil

from loadgen import Client, Results, load_images, open_loop
from rottenbot_inference.auth.tokens import mint_token
from rottenbot_inference.settings import Settings

COLUMNS = ["window", "end_s", "requests", "ok", "shed", "errors", "p50_ms", "p99_ms", "max_ms",
           "rss_mb"]


def server_pid(url: str) -> int:
    """The process listening on the URL's port (this machine)."""
    port = urlparse(url).port or 80
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise SystemExit(f"no process listens on port {port}; pass --pid")


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def sample_rss(pid: int, window: float, windows: int, out: list[float]) -> None:
    """RSS at the end of each window (the schedule starts 50 ms after the call)."""
    start = time.perf_counter() + 0.05
    for index in range(1, windows + 1):
        await asyncio.sleep(max(0.0, start + index * window - time.perf_counter()))
        out.append(rss_mb(pid))


def table(results: Results, window: float, rss: list[float]) -> list[dict]:
    rows = []
    for index, memory in enumerate(rss):
        low, high = index * window, (index + 1) * window
        picked = [
            (code, latency)
            for code, sent, latency in zip(
                results.codes, results.sent_s, results.latencies_ms, strict=True
            )
            if low <= sent < high
        ]
        ok = [latency for code, latency in picked if code == 200]
        rows.append({
            "window": index + 1,
            "end_s": round(high),
            "requests": len(picked),
            "ok": len(ok),
            "shed": sum(1 for code, _ in picked if code == 503),
            "errors": sum(1 for code, _ in picked if code not in (200, 503)),
            "p50_ms": round(float(np.percentile(ok, 50)), 1) if ok else "",
            "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok else "",
            "max_ms": round(max(ok), 1) if ok else "",
            "rss_mb": round(memory, 1),
        })
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


async def soak(client: Client, rate: float, duration: float, window: float, pid: int,
               poisson: bool) -> tuple[Results, list[float]]:
    rss: list[float] = []
    windows = int(duration // window)
    results, _ = await asyncio.gather(
        open_loop(client, rate, duration, poisson), sample_rss(pid, window, windows, rss)
    )
    return results, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--images", default="bench/images/*_1024x768.jpg")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=1200)
    parser.add_argument("--window", type=float, default=60)
    parser.add_argument("--pid", type=int, help="serving process; default: found by port")
    parser.add_argument("--poisson", action="store_true")
    parser.add_argument("--save-fraction", type=float, default=0.0)
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    pid = args.pid or server_pid(args.url)
    settings = Settings()
    token = mint_token(settings.jwt_secret.get_secret_value(), settings.jwt_algorithm,
                       uuid.uuid4(), ttl_s=int(args.duration + 600))
    client = Client(args.url, load_images(args.images), token, args.save_fraction, seed=0)
    before = rss_mb(pid)
    results, rss = asyncio.run(
        soak(client, args.rate, args.duration, args.window, pid, args.poisson)
    )
    rows = table(results, args.window, rss)
    summary = results.summary()
    header = (
        f"Soak: {args.rate:g} req/s for {args.duration:g} s against {args.url} "
        f"({args.images}, save fraction {args.save_fraction:g}); RSS before {before:.1f} MB; "
        f"overall p50 {summary['p50']} ms, p99 {summary['p99']} ms, statuses "
        f"{summary['statuses']}"
    )
    text = markdown(rows, header)
    print(text)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
