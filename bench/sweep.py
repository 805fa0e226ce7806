"""The whole performance sweep in one command: results table + latency-vs-rate plot in docs/.

    python bench/sweep.py --model /tmp/prod                  # ~12 minutes on 2 cores
    python bench/sweep.py --model /tmp/prod --quick          # ~3 minutes, shorter runs

Starts the production-like stack on loopback (PostgreSQL, the moto S3 server, redis-server),
then the service with the given model, and measures in this order:

1. runtime only: ONNX Runtime images/s at batch 1..16 (`bench/runtime_bench.py`);
2. cold start: process start -> /health/ready 200 with the full stack configured (cached model);
3. the target run: 60 req/s for 60 s with 50 % saves (constant, then Poisson arrivals);
4. closed-loop peak throughput (1024x768 JPEG, with and without saves);
5. open-loop sweep of offered rates, save_prediction on half of the requests;
6. mixed upload sizes (224x224 .. 4032x3024 JPEG and PNG): p99 per kind, and where the time
   goes (decode vs model), from the server's own stage histograms (/metrics);
7. RSS of the serving process after each phase.

Before each phase it waits until the outbox is empty, so saves left over from an overloaded
phase are not drained on the next phase's time.

Writes `docs/benchmark-results.md`, `docs/img/latency-vs-rate.png` and the raw figures as
`docs/benchmark-results.json`. Every load run uses `bench/loadgen.py` (open loop: latency from
the intended send time, so queueing is counted).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import TEST_SECRET  # noqa: E402
from tests.servers import RedisServer  # noqa: E402
from tests.servers_mlflow import rss_mb  # noqa: E402
from tests.servers_storage import ServiceProcess, start_moto, start_postgres  # noqa: E402

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
    """PostgreSQL + moto S3 + redis-server on loopback, and the service configured for them."""

    def __init__(self, folder: Path, model: Path) -> None:
        self.folder = folder
        self.postgres = start_postgres()
        self.moto = start_moto(folder / "moto.log")
        self.redis = RedisServer(folder / "redis")
        self.redis.start()
        self.env = {
            "MODEL_PATH": str(model),
            "DATA_DIR": str(folder / "data"),
            "JWT_SECRET": TEST_SECRET,
            "LOG_LEVEL": "warning",
            "DATABASE_URL": self.postgres.url(self.postgres.create_database("bench")),
            **self.moto.env("images"),
            **self.redis.env,
        }

    def service(self, name: str) -> ServiceProcess:
        return ServiceProcess(self.env, self.folder / f"{name}.log")

    def close(self) -> None:
        self.redis.stop()
        self.moto.stop()
        self.postgres.destroy()


def timed_start(service: ServiceProcess) -> float:
    started = time.perf_counter()
    service.start()
    return time.perf_counter() - started


def run_sweep(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"date": dt.date.today().isoformat(), "model": str(args.model),
                               "cpus": os.cpu_count()}
    short = args.quick
    print("runtime only ...", flush=True)
    runtime_json = folder / "runtime.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "runtime_bench.py"), "--model",
                    str(args.model), "--rounds", "2" if short else "5", "--calls", "10",
                    "--compare-runtimes", "--json", str(runtime_json)],
                   check=True, env={**os.environ, "DATA_DIR": str(folder / "runtime")},
                   stdout=subprocess.DEVNULL)
    runtime = json.loads(runtime_json.read_text())
    results["runtime"], results["runtime_streams"] = runtime["rows"], runtime["streams"]
    results["runtime_threads"] = runtime["threads"]
    results["runtimes"] = runtime.get("runtimes") or []
    results["serving_runtime"] = runtime.get("runtime")

    stack = Stack(folder, args.model)
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
        rss: dict[str, float] = {"ready": rss_mb(pid)}
        images = str(ROOT / "bench" / "images" / "*_1024x768.jpg")
        run_s = "10" if short else "20"

        def load(name: str, *load_args: str, pattern: str = images) -> dict[str, Any]:
            wait_for_empty_outbox(url)
            result = loadgen(url, pattern, folder / f"{name}.json", *load_args)
            rss[name] = rss_mb(pid)
            return result

        print("target run ...", flush=True)
        results["target"] = load("target", "--rate", str(args.target_rate), "--duration",
                                 "20" if short else "60", "--save-fraction", "0.5")
        results["target_poisson"] = load(
            "target-poisson", "--rate", str(args.target_rate), "--poisson",
            "--duration", "20" if short else "60", "--save-fraction", "0.5")

        print("closed loop ...", flush=True)
        results["closed"] = [
            {"save_fraction": save, "concurrency": c,
             **load(f"closed-{c}-{save}", "--concurrency", str(c), "--duration", run_s,
                    "--save-fraction", str(save))}
            for save in (0.0, 0.5) for c in (4, 8)
        ]
        print("open-loop sweep (50 % saves) ...", flush=True)
        results["sweep"] = [
            load(f"open-{rate}", "--rate", str(rate), "--duration", run_s,
                 "--save-fraction", "0.5")
            for rate in args.rates
        ]
        print("mixed sizes ...", flush=True)
        everything = str(ROOT / "bench" / "images" / "*")
        results["mixed"] = load("mixed", "--rate", str(args.mixed_rate), "--duration",
                                run_s, "--save-fraction", "0.5", pattern=everything)
        results["stages"] = {}
        for size in SIZES:
            pattern = str(ROOT / "bench" / "images" / f"*_{size}.jpg")
            before = stage_totals(url)
            client = load(f"stage-{size}", "--rate", "10", "--duration", "5" if short else "10",
                          "--warmup", "0", pattern=pattern)
            results["stages"][size] = {**stage_means(before, stage_totals(url)),
                                       "client_p50": client["p50"], "client_p99": client["p99"]}
        results["rss_mb"] = {name: round(value, 1) for name, value in rss.items()}
        service.stop()
    finally:
        stack.close()
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [row["offered_rate"] for row in results["sweep"]]
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, label in (("p50", "p50"), ("p99", "p99"), ("p99.9", "p99.9")):
        axis.plot(rates, [row[key] for row in results["sweep"]], marker="o", label=label)
    axis.axhline(100, color="grey", linestyle="--", linewidth=1, label="p99 target 100 ms")
    axis.set_yscale("log")
    axis.set_xlabel("offered rate (requests/s, open loop, 50 % saves)")
    axis.set_ylabel("latency from intended send (ms)")
    axis.set_title("RottenBot inference, MobileNetV3Large-28, 1024x768 JPEG, 2 cores")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def errors(result: dict[str, Any]) -> int:
    return sum(count for status, count in result["statuses"].items() if status != "200")


def markdown(results: dict[str, Any], command: str) -> str:
    batch1 = next(row for row in results["runtime"] if row["batch"] == 1)["images_per_s"]
    peak = max(row["ok_per_s"] for row in results["closed"])

    def load_row(result: dict[str, Any], label: Callable[[dict[str, Any]], str]) -> list[Any]:
        return [label(result), f"{result['ok_per_s']:.1f}", result["p50"], result["p90"],
                result["p99"], result["p99.9"], result["max"], errors(result)]

    load_header = ["load", "ok/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors"]
    target, poisson = results["target"], results["target_poisson"]
    parts = [
        "# Benchmark results (generated)",
        "",
        f"Written by `{command}` on {results['date']} ({results['cpus']} CPUs, server, stack "
        "and load generator on the same machine). Do not edit by hand: rerun the command. "
        "Method and older figures: [benchmarks.md](benchmarks.md).",
        "",
        "Stack: PostgreSQL 15 (fsync off), moto's S3 server and redis-server on loopback; every "
        "request's token is checked against Redis; `save_prediction=true` on half of the "
        "requests where stated (durable outbox fsync on the request path, upload and row "
        "insert in the background).",
        "",
        "## Targets",
        "",
        table(["target", "measured", "met"], [
            [f"≥ 60 req/s, p99 ≤ 100 ms, no errors, 60 s (50 % saves, {target['offered_rate']:.0f}"
             " req/s constant)", f"{target['ok_per_s']:.1f} req/s, p99 {target['p99']} ms, "
             f"{errors(target)} errors", _yes(target["p99"] <= 100 and errors(target) == 0
                                             and target["ok_per_s"] >= 59)],
            ["same, Poisson arrivals", f"{poisson['ok_per_s']:.1f} req/s, p99 {poisson['p99']} "
             f"ms, {errors(poisson)} errors", _yes(poisson["p99"] <= 100 and errors(poisson) == 0)],
            ["peak closed loop ≥ 70 % of runtime batch-1 images/s",
             f"{peak:.1f} req/s = {100 * peak / batch1:.0f} % of {batch1:.1f}",
             _yes(peak >= 0.7 * batch1)],
            ["cold start ≤ 5 s (cached model)",
             f"{results['cold_start_s']['median']} s (runs {results['cold_start_s']['runs']})",
             _yes(results["cold_start_s"]["median"] <= 5)],
            ["RSS ≤ 600 MB", f"max {max(results['rss_mb'].values()):.0f} MB",
             _yes(max(results["rss_mb"].values()) <= 600)],
        ]),
        "",
        "## Runtimes compared (bench/runtime_compare.py)",
        "",
        runtime_table(results.get("runtimes") or []),
        "",
        "## Runtime only (the serving runtime: "
        f"{_serving(results.get('serving_runtime'))})",
        "",
        f"One stream of calls, {results['runtime_threads']} intra-op threads (best single-image "
        "latency):",
        "",
        table(["batch", "median ms", "images/s"],
              [[r["batch"], f"{r['median_ms']:.1f}", f"{r['images_per_s']:.0f}"]
               for r in results["runtime"]]),
        "",
        f"As the service runs it ({results['runtime_streams']['count']} inference workers, one "
        f"intra-op thread each, batch 1): **{results['runtime_streams']['images_per_s']:.0f} "
        "images/s**. The peak-throughput target above is stated against the single-stream "
        "batch-1 figure, as the issue defines it.",
        "",
        "## Closed loop (1024x768 JPEG)",
        "",
        table(load_header, [load_row(r, lambda r: f"c={r['concurrency']}, saves "
                                     f"{r['save_fraction']:.0%}") for r in results["closed"]]),
        "",
        "## Open loop, offered rate sweep (1024x768 JPEG, 50 % saves)",
        "",
        "![latency vs offered rate](img/latency-vs-rate.png)",
        "",
        table(load_header, [load_row(r, lambda r: f"{r['offered_rate']:.0f} req/s")
                            for r in results["sweep"]]),
        "",
        "## Target run",
        "",
        table(load_header, [load_row(target, lambda r: f"{r['offered_rate']:.0f} req/s constant"),
                            load_row(poisson, lambda r: f"{r['offered_rate']:.0f} req/s Poisson")]),
        "",
        "## Mixed upload sizes (all of bench/images: JPEG 224x224 .. 4032x3024 and PNG)",
        "",
        table(load_header, [load_row(results["mixed"], lambda r: f"{r['offered_rate']:.0f} "
                                     "req/s mixed")]),
        "",
        table(["upload", "requests", "p50 ms", "p99 ms"],
              [[kind, v["requests"], v["p50"], v["p99"]]
               for kind, v in results["mixed"].get("by_image", {}).items()]),
        "",
        "Where the time goes, per JPEG size (10 req/s, server stage histograms; means):",
        "",
        table(["JPEG", "decode+resize ms", "queue ms", "model ms / batch", "images / batch",
               "server total ms", "client p50 ms", "client p99 ms"],
              [[size, s["decode"], s["queue"], s["compute"], s["batch"], s["api"],
                s["client_p50"], s["client_p99"]] for size, s in results["stages"].items()]),
        "",
        "## Memory (RSS of the serving process, MB, after each phase)",
        "",
        table(["phase", "RSS MB"], [[name, value] for name, value in results["rss_mb"].items()]),
        "",
    ]
    return "\n".join(parts)


def _serving(described: dict[str, Any] | None) -> str:
    if not described:
        return "ONNX Runtime fp32"
    return f"{described['name']} {described.get('precision', 'fp32')}"


def runtime_table(rows: list[dict[str, Any]]) -> str:
    """ORT fp32 / OpenVINO fp32 / OpenVINO bf16: speed and agreement with ORT fp32."""
    if not rows:
        return "(not measured)"
    streams = rows[0]["streams"]
    return table(
        ["runtime", "computes in", "ms/img batch 1", "CPU ms/img batch 1", "img/s batch 4",
         f"img/s, {streams} streams", "top-1 agreement with ORT fp32", "max abs softmax diff"],
        [[r["variant"], r["runtime"] if r["fallback"] else r["precision"], f"{r['ms_b1']:.1f}",
          f"{r['cpu_ms_b1']:.1f}", f"{r['images_per_s_b4']:.0f}",
          f"{r['images_per_s_streams']:.0f}", f"{100 * r['top1_agreement']:.0f} %",
          f"{r['max_abs_diff']:.2g}"] for r in rows],
    )


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="e.g. /tmp/prod")
    parser.add_argument("--rates", default="20,40,60,80,100,120",
                        help="offered rates of the open-loop sweep")
    parser.add_argument("--target-rate", type=float, default=60)
    parser.add_argument("--mixed-rate", type=float, default=30)
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
    print(f"wrote {args.out / 'benchmark-results.md'}")


if __name__ == "__main__":
    main()
