"""Cold start: process start -> /health/ready 200, and the serving process's RSS.

    python bench/cold_start.py [--model PATH] [--runs 3] [--runtime openvino] [--no-openvino-cache]

Starts `rottenbot-inference serve` on a free loopback port with a warm conversion cache (a first
run fills it and is not counted) and reports the median time to ready. `--runtime` sets
MODEL_RUNTIME; `--no-openvino-cache` empties OpenVINO's compiled-model cache
(MODEL_CACHE_DIR/openvino) before every start, to measure what the cache saves.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (steadier than wall time on a busy host)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_once(env: dict[str, str]) -> tuple[float, float, float]:
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "rottenbot_inference", "serve", "--port", str(port)],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                    elapsed = time.perf_counter() - started
                    return elapsed, rss_mb(process.pid), cpu_s(process.pid)
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="MODEL_PATH (default: the demo model)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtime", default=None, help="MODEL_RUNTIME (default: as configured)")
    parser.add_argument("--no-openvino-cache", action="store_true",
                        help="empty MODEL_CACHE_DIR/openvino before every start")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {"DATA_DIR": data_dir, "LOG_FORMAT": "text"}
        if args.model:
            env["MODEL_PATH"] = args.model
        if args.runtime:
            env["MODEL_RUNTIME"] = args.runtime
        cache = Path(os.environ.get("MODEL_CACHE_DIR") or Path(data_dir) / "model-cache")

        def start() -> tuple[float, float, float]:
            if args.no_openvino_cache:
                shutil.rmtree(cache / "openvino", ignore_errors=True)
            return start_once(env)

        first, _, _ = start()
        print(f"first start (fills the conversion cache if needed): {first:.2f} s")
        runs = [start() for _ in range(args.runs)]
        times = [t for t, _, _ in runs]
        print(f"cold start to ready, cached: median {statistics.median(times):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in times)}); RSS at ready "
              f"{statistics.median(r for _, r, _ in runs):.0f} MB; CPU used by then "
              f"{statistics.median(c for _, _, c in runs):.2f} s")


if __name__ == "__main__":
    main()
