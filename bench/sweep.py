"""The whole performance sweep in one command: every target as a pass/fail row in docs/.

    python bench/sweep.py --model /tmp/prod                  # ~14 minutes on 2 cores
    python bench/sweep.py --model /tmp/prod --quick          # ~5 minutes, shorter runs

Starts the production-like stack on loopback (PostgreSQL, an S3 stand-in - rclone's S3 server
by default, `--s3 moto` for moto's - and redis-server holding revoked token ids), then the
service with the given model, and measures in this order:

1. runtimes alone: ONNX Runtime fp32, OpenVINO fp32 and bf16 (`bench/runtime_bench.py`);
2. cold start: process start -> /health/ready 200 with the full stack configured (cached model);
3. the target run: `--target-rate` (100) req/s constant for `--run-s` (40) s, 50 % saves;
   then 60 req/s the same way (the reference for the OTLP run);
4. closed-loop peak throughput (50 % saves, 4, 8 and 16 clients);
5. three times that peak offered open loop (goodput under shedding);
6. open-loop sweep of offered rates, 50 % saves;
7. mixed upload sizes (224x224 .. 4032x3024 JPEG and PNG): p99 per kind, and where the time
   goes (decode vs model), from the server's own stage histograms (/metrics);
8. a fresh service exporting traces, metrics and logs over OTLP to a local sink
   (`bench/otlp_sink.py`) at 60 req/s;
9. RSS of the serving process after each phase.

Before each phase it waits until the outbox is empty, so saves left over from an overloaded
phase are not drained on the next phase's time.

Writes `docs/benchmark-results.md` (bench/sweep_report.py), `docs/img/latency-vs-rate.png` and
the raw figures as `docs/benchmark-results.json`. Every load run uses `bench/loadgen.py` in its
own process (open loop: latency from the intended send time, so queueing is counted).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import TEST_SECRET, auth  # noqa: E402
from tests.servers import RedisServer  # noqa: E402
from tests.servers_mlflow import rss_mb  # noqa: E402
from tests.servers_storage import ServiceProcess, start_postgres, start_s3  # noqa: E402

from sweep_report import markdown, plot, targets_text  # noqa: E402

SIZES = ["224x224", "640x480", "1024x768", "1600x1200", "4032x3024"]
STAGES = {
    "decode": "inference_image_decode_duration_milliseconds",
    "queue": "inference_queue_duration_milliseconds",
    "compute": "inference_compute_duration_milliseconds",
    "batch": "inference_batch_size",
    "api": "inference_api_duration_milliseconds",
}


def loadgen(url: str, images: str, out: Path, *args: str) -> dict[str, Any]:
    """One bench/loadgen.py run in its own process (its CPU is the client's, as in production)."""
    command = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--url", url,
               "--images", images, "--json", str(out), *args]
    subprocess.run(command, check=True, env={**os.environ, "JWT_SECRET": TEST_SECRET},
                   stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    print(f"  {' '.join(args)}: {result['ok_per_s']:.1f} ok/s p50 {result['p50']} "
          f"p99 {result['p99']} statuses {result['statuses']}", flush=True)
    return result


def scrape(base_url: str) -> list[Any]:
    """The service's /metrics, parsed into metric families."""
    return list(text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=30).text))


def metric(base_url: str, name: str) -> float:
    """The sum over labels of one gauge or counter from /metrics."""
    return sum(sample.value for family in scrape(base_url)
               for sample in family.samples if sample.name == name)


def wait_for_empty_outbox(base_url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(base_url, "inference_outbox_backlog") > 0:
        if time.monotonic() > deadline:
            raise SystemExit("the outbox did not drain")
        time.sleep(0.5)


def stage_totals(base_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each stage histogram, summed over labels, from /metrics."""
    totals: dict[str, tuple[float, float]] = {}
    wanted = {name: stage for stage, name in STAGES.items()}
    for family in scrape(base_url):
        stage = wanted.get(family.name)
        if stage is None:
            continue
        total, count = totals.get(stage, (0.0, 0.0))
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
        totals[stage] = (total, count)
    return totals


def stage_means(before: dict, after: dict) -> dict[str, float]:
    """Mean per observation of each stage between two /metrics scrapes."""
    means = {}
    for stage in STAGES:
        total = after.get(stage, (0, 0))[0] - before.get(stage, (0, 0))[0]
        count = after.get(stage, (0, 0))[1] - before.get(stage, (0, 0))[1]
        means[stage] = round(total / count, 2) if count else float("nan")
    return means


class Stack:
    """PostgreSQL + an S3 stand-in + redis-server on loopback, and the service configured for
    them (Redis holds the revoked token ids: every request's token is checked against it)."""

    def __init__(self, folder: Path, model: Path, s3: str = "rclone") -> None:
        self.folder = folder
        self.postgres = start_postgres()
        self.s3 = start_s3(folder / f"{s3}.log", s3)
        self.redis = RedisServer(folder / "redis")
        self.redis.start()
        self.env = {
            "MODEL_PATH": str(model),
            "DATA_DIR": str(folder / "data"),
            "JWT_SECRET": TEST_SECRET,
            "LOG_LEVEL": "warning",
            "DATABASE_URL": self.postgres.url(self.postgres.create_database("bench")),
            **self.s3.env("images"),
            **self.redis.env,
        }

    def service(self, name: str, **extra: str) -> ServiceProcess:
        return ServiceProcess({**self.env, **extra}, self.folder / f"{name}.log")

    def close(self) -> None:
        self.redis.stop()
        self.s3.stop()
        self.postgres.destroy()


class OtlpSink:
    """bench/otlp_sink.py in its own process: a collector stand-in that drops what it gets."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "otlp_sink.py")], stdout=subprocess.PIPE,
            text=True)
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def timed_start(service: ServiceProcess) -> float:
    started = time.perf_counter()
    service.start()
    return time.perf_counter() - started


def run_sweep(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"date": dt.date.today().isoformat(), "model": str(args.model),
                               "cpus": os.cpu_count(), "s3": args.s3,
                               "target_rate": args.target_rate,
                               "run_s": 10 if args.quick else args.run_s}
    short = args.quick
    print("runtime only ...", flush=True)
    runtime_json = folder / "runtime.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "runtime_bench.py"), "--model",
                    str(args.model), "--rounds", "2" if short else "3", "--calls", "10",
                    "--compare-runtimes", "--json", str(runtime_json)],
                   check=True, env={**os.environ, "DATA_DIR": str(folder / "runtime")},
                   stdout=subprocess.DEVNULL)
    runtime = json.loads(runtime_json.read_text())
    results["runtime"], results["runtime_streams"] = runtime["rows"], runtime["streams"]
    results["runtime_threads"] = runtime["threads"]
    results["runtimes"] = runtime.get("runtimes") or []
    results["serving_runtime"] = runtime.get("runtime")

    stack = Stack(folder, args.model, args.s3)
    try:
        print("cold start ...", flush=True)
        first = stack.service("first")
        timed_start(first)  # fills the conversion cache (and migrates the database)
        first.stop()
        starts = []
        for attempt in range(3):
            service = stack.service(f"cold-{attempt}")
            starts.append(timed_start(service))
            results.setdefault("rss_ready_mb", rss_mb(service.process.pid))
            service.stop()
        results["cold_start_s"] = {"median": round(statistics.median(starts), 2),
                                   "runs": [round(s, 2) for s in starts]}

        service = stack.service("serve")
        url = service.start()
        pid = service.process.pid
        results["model_endpoint"] = httpx.get(
            f"{url}/api/v1/inference/model", timeout=30,
            headers=auth()).json()
        rss: dict[str, float] = {"ready": rss_mb(pid)}
        images = str(ROOT / "bench" / "images" / "*_1024x768.jpg")
        run_s = str(10 if short else args.run_s)
        step_s = "8" if short else "15"

        def load(name: str, *load_args: str, pattern: str = images, at: str = url,
                 process: int = pid) -> dict[str, Any]:
            wait_for_empty_outbox(at)
            result = loadgen(at, pattern, folder / f"{name}.json", *load_args)
            rss[name] = rss_mb(process)
            return result

        print(f"target run: {args.target_rate:g} req/s ...", flush=True)
        results["target"] = load("target", "--rate", str(args.target_rate), "--duration",
                                 run_s, "--save-fraction", "0.5")
        results["reference60"] = load("rate-60", "--rate", "60", "--duration", run_s,
                                      "--save-fraction", "0.5")
        print("closed loop (50 % saves) ...", flush=True)
        results["closed"] = [
            {"save_fraction": 0.5, "concurrency": c,
             **load(f"closed-{c}", "--concurrency", str(c), "--duration", step_s,
                    "--save-fraction", "0.5")}
            for c in (4, 8, 16)
        ]
        peak = max(row["ok_per_s"] for row in results["closed"])
        print(f"3x the peak ({3 * peak:.0f} req/s offered) ...", flush=True)
        results["overload"] = load("overload", "--rate", f"{3 * peak:.0f}", "--duration",
                                   run_s, "--save-fraction", "0.5")
        print("open-loop sweep (50 % saves) ...", flush=True)
        results["sweep"] = [
            load(f"open-{rate}", "--rate", str(rate), "--duration", step_s,
                 "--save-fraction", "0.5")
            for rate in args.rates
        ]
        print("mixed sizes ...", flush=True)
        everything = str(ROOT / "bench" / "images" / "*")
        results["mixed"] = load("mixed", "--rate", str(args.mixed_rate), "--duration",
                                step_s, "--save-fraction", "0.5", pattern=everything)
        results["stages"] = {}
        for size in SIZES:
            pattern = str(ROOT / "bench" / "images" / f"*_{size}.jpg")
            before = stage_totals(url)
            client = load(f"stage-{size}", "--rate", "10", "--duration", "5" if short else "8",
                          "--warmup", "0", pattern=pattern)
            results["stages"][size] = {**stage_means(before, stage_totals(url)),
                                       "client_p50": client["p50"], "client_p99": client["p99"]}
        service.stop()

        print("with OTLP export on: 60 req/s ...", flush=True)
        sink = OtlpSink()
        try:
            traced = stack.service("otlp", OTEL_EXPORTER_OTLP_ENDPOINT=(
                f"http://127.0.0.1:{sink.port}"))
            traced_url = traced.start()
            results["otlp60"] = load("otlp-60", "--rate", "60", "--duration", run_s,
                                     "--save-fraction", "0.5", at=traced_url,
                                     process=traced.process.pid)
            traced.stop()
        finally:
            sink.stop()
        results["rss_mb"] = {name: round(value, 1) for name, value in rss.items()}
    finally:
        stack.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="e.g. /tmp/prod")
    parser.add_argument("--rates", default="40,60,80,100,120,140",
                        help="offered rates of the open-loop sweep")
    parser.add_argument("--target-rate", type=float, default=100)
    parser.add_argument("--run-s", type=int, default=40, help="length of each target run")
    parser.add_argument("--mixed-rate", type=float, default=30)
    parser.add_argument("--s3", choices=["rclone", "moto"], default="rclone",
                        help="S3 stand-in: rclone's S3 server (Go, like MinIO) or moto (Python)")
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.rates = [float(rate) for rate in args.rates.split(",")]
    if not list((ROOT / "bench" / "images").glob("*_1024x768.jpg")):
        raise SystemExit("no bench images: python bench/imageset.py --out bench/images")
    command = "python bench/sweep.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="sweep-") as temp:
        results = run_sweep(args, Path(temp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark-results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "img" / "latency-vs-rate.png")
    (args.out / "benchmark-results.md").write_text(markdown(results, command))
    print(targets_text(results))
    print(f"wrote {args.out / 'benchmark-results.md'}")


if __name__ == "__main__":
    main()
