"""bench/sweep.py's results as docs/benchmark-results.md (targets as pass/fail rows) + a plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def others(result: dict[str, Any]) -> int:
    """Answers that are neither 200 nor 503 (and transport errors)."""
    return sum(count for status, count in result["statuses"].items()
               if status not in ("200", "503"))


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    """Issue #15's targets, each measured in this run."""
    target, otlp = results["target"], results["otlp60"]
    overload = results["overload"]
    peak = max(row["ok_per_s"] for row in results["closed"])
    rate = results["target_rate"]
    rss = max(results["rss_mb"].values())
    cold = results["cold_start_s"]
    return [
        [f"{rate:g} req/s constant for {results['run_s']} s: p99 ≤ 100 ms, zero errors",
         f"{target['ok_per_s']:.1f} ok/s, p99 {target['p99']} ms, {errors(target)} errors",
         _yes(target["p99"] <= 100 and errors(target) == 0)],
        ["closed-loop peak ≥ 140 req/s", f"{peak:.1f} req/s", _yes(peak >= 140)],
        [f"goodput at 3 x the peak ({overload['offered_rate']:.0f} req/s offered) ≥ 95 % of "
         "the peak; only 200 and 503",
         f"{overload['ok_per_s']:.1f} ok/s = {100 * overload['ok_per_s'] / peak:.0f} % of the "
         f"peak; {others(overload)} other answers",
         _yes(overload["ok_per_s"] >= 0.95 * peak and others(overload) == 0)],
        ["with OTLP export on: 60 req/s at p99 ≤ 100 ms",
         f"{otlp['ok_per_s']:.1f} ok/s, p99 {otlp['p99']} ms, {errors(otlp)} errors",
         _yes(otlp["p99"] <= 100 and errors(otlp) == 0)],
        ["cold start ≤ 2 s (cached model)", f"{cold['median']} s (runs {cold['runs']})",
         _yes(cold["median"] <= 2)],
        ["RSS ≤ 600 MB", f"max {rss:.0f} MB", _yes(rss <= 600)],
    ]


def targets_text(results: dict[str, Any]) -> str:
    return "\n".join(f"{row[2]:>7}  {row[0]}: {row[1]}" for row in target_rows(results))


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


def _serving(described: dict[str, Any] | None) -> str:
    if not described:
        return "ONNX Runtime fp32"
    return f"{described['name']} {described.get('precision', 'fp32')}"


def markdown(results: dict[str, Any], command: str) -> str:
    def load_row(result: dict[str, Any], label: Callable[[dict[str, Any]], str]) -> list[Any]:
        return [label(result), f"{result['ok_per_s']:.1f}", result["p50"], result["p90"],
                result["p99"], result["p99.9"], result["max"], errors(result)]

    load_header = ["load", "ok/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors"]
    s3 = {"rclone": "rclone's S3 server (Go, as MinIO)", "moto": "moto's S3 server (Python)"}
    served = results.get("model_endpoint", {}).get("runtime") or {}
    parts = [
        "# Benchmark results (generated)",
        "",
        f"Written by `{command}` on {results['date']} ({results['cpus']} CPUs; the service, "
        "PostgreSQL, the S3 stand-in, Redis and the load generator all on the same machine). "
        "Do not edit by hand: rerun the command. Method and older figures: "
        "[benchmarks.md](benchmarks.md).",
        "",
        f"Stack: PostgreSQL 15 (fsync off), {s3.get(results.get('s3', 'moto'))} and "
        "redis-server on loopback; every request's token is checked against Redis (revocation "
        "on); the production-architecture model; 1024x768 JPEG uploads; `save_prediction=true` "
        "on half of the requests (durable outbox fsync on the request path, upload and row "
        "insert in the background); open-loop loads at a constant rate, latency from each "
        f"request's intended send time. The service ran {_serving(served)}.",
        "",
        "## Targets",
        "",
        table(["target", "measured", "met"], target_rows(results)),
        "",
        "## Runtimes compared (bench/runtime_bench.py --compare-runtimes)",
        "",
        runtime_table(results.get("runtimes") or []),
        "",
        f"## Runtime only (the serving runtime: {_serving(results.get('serving_runtime'))})",
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
        "images/s**.",
        "",
        "## Target runs",
        "",
        table(load_header, [
            load_row(results["target"], lambda r: f"{r['offered_rate']:.0f} req/s constant"),
            load_row(results["reference60"], lambda r: "60 req/s constant"),
            load_row(results["otlp60"], lambda r: "60 req/s constant, OTLP export on"),
            load_row(results["overload"], lambda r: f"{r['offered_rate']:.0f} req/s (3 x peak)"),
        ]),
        "",
        "## Closed loop (1024x768 JPEG, 50 % saves)",
        "",
        table(load_header, [load_row(r, lambda r: f"c={r['concurrency']}")
                            for r in results["closed"]]),
        "",
        "## Open loop, offered rate sweep (1024x768 JPEG, 50 % saves)",
        "",
        "![latency vs offered rate](img/latency-vs-rate.png)",
        "",
        table(load_header, [load_row(r, lambda r: f"{r['offered_rate']:.0f} req/s")
                            for r in results["sweep"]]),
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
