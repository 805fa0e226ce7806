"""What a shadow challenger costs the champion: goodput and p99 at 1x and 3x capacity, with and
without CHALLENGER_URI, interleaved A/B.

    python bench/shadow_overhead.py --champion /tmp/prod --challenger /tmp/prod-challenger \
        [--capacity 100] [--rounds 3] [--duration 30] [--fraction 0.1] [--json out.json]

Starts the production-like stack (bench/sweep.py's Stack: PostgreSQL, moto S3, redis-server) and
two service processes on it, both warmed up and idle between runs: A serves the champion alone,
B the same champion with the challenger (SHADOW_FRACTION=--fraction; comparisons go to
PostgreSQL). Capacity (1x) is --capacity requests/s, or, without it, A's closed-loop peak
throughput (bench/loadgen.py --concurrency 8). Then, for each round and each load (1x, 3x), one
open-loop bench/loadgen.py run against A and one against B, in alternating order (A first in
odd rounds), each after the outboxes drained. Reported per load: the median over rounds of B/A
goodput (200 answers per second), B/A p99 and B/A service CPU time per 200 answer (from
/proc: steadier than wall-clock figures on a shared machine), every run's figures, B's shadow
work over the whole bench (scored, skipped by reason, from /metrics) and both processes' RSS.

The issue's bound: B/A goodput >= 0.95 and B/A p99 <= 1.05 at both loads. Run it on a quiet
machine; `--smoke` does one short round (seconds) to check that the script works. `--rss-only`
reports both processes' RSS at ready, after --duration s of closed-loop load, and their peak
(VmHWM) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tests.servers_mlflow import rss_mb  # noqa: E402
from tests.servers_storage import ServiceProcess  # noqa: E402

from sweep import Stack, loadgen, scrape, wait_for_empty_outbox  # noqa: E402

IMAGES = str(ROOT / "bench" / "images" / "*_1024x768.jpg")


def shadow_counts(base_url: str) -> dict[str, float]:
    """B's shadow work so far: scored, and skipped by reason (sums over labels)."""
    counts: dict[str, float] = {"scored": 0.0}
    for family in scrape(base_url):
        for sample in family.samples:
            if sample.name == "inference_shadow_comparisons_total":
                counts["scored"] += sample.value
            elif sample.name == "inference_shadow_skipped_total":
                key = f"skipped_{sample.labels['reason']}"
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def cpu_s(pid: int) -> float:
    """CPU time (user + system) the process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_mb(pid: int) -> float:
    """The process's peak RSS so far (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def wait_for_challenger(base_url: str, timeout_s: float = 900) -> None:
    """Until B's challenger is loaded (it loads in the background after readiness)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for family in scrape(base_url):
            for sample in family.samples:
                loaded = sample.name == "inference_challenger_loads_total" and sample.value > 0
                if loaded and sample.labels.get("outcome") in ("success", "reused"):
                    return
        time.sleep(1)
    raise SystemExit("the challenger was not loaded; see the service-B log")


def measure_rss(
    args: argparse.Namespace, folder: Path, urls: dict[str, str], services: dict[str, Any]
) -> dict[str, Any]:
    """RSS of A (champion) and B (champion + challenger) at ready, then after a closed-loop
    run on each (B scoring --fraction of it in the shadow)."""
    rss: dict[str, Any] = {}
    for name, service in services.items():
        rss[name] = {"ready": round(rss_mb(service.process.pid), 1)}
    for name, url in urls.items():
        loadgen(
            url,
            IMAGES,
            folder / f"rss-{name}.json",
            "--concurrency",
            "8",
            "--duration",
            str(args.duration),
        )
        wait_for_empty_outbox(url)
        time.sleep(3)  # B: let the shadow queue drain
        rss[name]["after_load"] = round(rss_mb(services[name].process.pid), 1)
        rss[name]["peak"] = round(peak_mb(services[name].process.pid), 1)
    return {"rss_mb": rss, "shadow": shadow_counts(urls["B"]), "summary": {}}


def ratio(b: float, a: float) -> float | None:
    return round(b / a, 3) if a else None


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    stack = Stack(folder, args.champion)
    services: dict[str, ServiceProcess] = {}
    try:
        for name, extra in (
            ("A", {}),
            ("B", {"CHALLENGER_URI": str(args.challenger), "SHADOW_FRACTION": str(args.fraction),
                   **({} if args.shadow_nice is None else {"SHADOW_NICE": str(args.shadow_nice)})}),
        ):
            env = {**stack.env, "DATA_DIR": str(folder / f"data-{name}"), **extra}
            services[name] = ServiceProcess(env, folder / f"service-{name}.log")
            services[name].start()
        urls = {name: service.base_url for name, service in services.items()}
        wait_for_challenger(urls["B"])
        if args.rss_only:
            return measure_rss(args, folder, urls, services)
        save = ["--save-fraction", str(args.save_fraction)]
        capacity = args.capacity
        if capacity is None:
            print("capacity: A's closed-loop peak ...", flush=True)
            peak = loadgen(
                urls["A"],
                IMAGES,
                folder / "peak.json",
                "--concurrency",
                "8",
                "--duration",
                str(args.duration),
                *save,
            )
            capacity = round(peak["ok_per_s"], 1)
        results: dict[str, Any] = {
            "capacity_rps": capacity,
            "fraction": args.fraction,
            "save_fraction": args.save_fraction,
            "runs": [],
        }
        before = shadow_counts(urls["B"])
        for round_index in range(args.rounds):
            order = ("A", "B") if round_index % 2 == 0 else ("B", "A")
            for load in (1, 3):
                for name in order:
                    wait_for_empty_outbox(urls[name])
                    print(f"round {round_index + 1} {load}x {name} ...", flush=True)
                    out = folder / f"r{round_index}-{load}x-{name}.json"
                    pid = services[name].process.pid  # type: ignore[union-attr]
                    cpu_before = cpu_s(pid)
                    result = loadgen(
                        urls[name],
                        IMAGES,
                        out,
                        "--rate",
                        f"{capacity * load:g}",
                        "--duration",
                        str(args.duration),
                        *save,
                    )
                    ok = result["statuses"].get("200", 0)
                    cpu_ms = (cpu_s(pid) - cpu_before) * 1000
                    results["runs"].append(
                        {
                            "round": round_index + 1,
                            "load": f"{load}x",
                            "service": name,
                            "ok_per_s": result["ok_per_s"],
                            "p99_ms": result["p99"],
                            "statuses": result["statuses"],
                            "cpu_ms_per_ok": round(cpu_ms / ok, 2) if ok else None,
                        }
                    )
        after = shadow_counts(urls["B"])
        results["shadow"] = {key: after[key] - before.get(key, 0.0) for key in after}
        results["rss_mb"] = {
            name: round(rss_mb(s.process.pid), 1)  # type: ignore[union-attr]
            for name, s in services.items()
        }
        results["summary"] = summarise(results["runs"])
        return results
    finally:
        for service in services.values():
            service.stop()
        stack.close()


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per load: the median over rounds of B/A goodput and p99 (same round, same load)."""
    summary: dict[str, Any] = {}
    for load in ("1x", "3x"):
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for entry in runs:
            if entry["load"] == load:
                by_round.setdefault(entry["round"], {})[entry["service"]] = entry
        goodput = [ratio(r["B"]["ok_per_s"], r["A"]["ok_per_s"]) for r in by_round.values()]
        p99 = [ratio(r["B"]["p99_ms"], r["A"]["p99_ms"]) for r in by_round.values()]
        cpu = [
            ratio(r["B"]["cpu_ms_per_ok"] or 0, r["A"]["cpu_ms_per_ok"] or 0)
            for r in by_round.values()
        ]
        goodput = [value for value in goodput if value is not None]
        p99 = [value for value in p99 if value is not None]
        cpu = [value for value in cpu if value]
        summary[load] = {
            "goodput_b_over_a": statistics.median(goodput) if goodput else None,
            "p99_b_over_a": statistics.median(p99) if p99 else None,
            "cpu_per_ok_b_over_a": statistics.median(cpu) if cpu else None,
            "rounds": len(by_round),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--champion", type=Path, required=True, help="model directory or file")
    parser.add_argument("--challenger", type=Path, required=True, help="model directory or file")
    parser.add_argument("--capacity", type=float, help="1x in requests/s (default: measured)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    parser.add_argument("--fraction", type=float, default=0.1, help="SHADOW_FRACTION of B")
    parser.add_argument("--save-fraction", type=float, default=0.5)
    parser.add_argument("--shadow-nice", type=int, help="SHADOW_NICE of B (default: the default)")
    parser.add_argument("--smoke", action="store_true", help="one 3-second round")
    parser.add_argument(
        "--rss-only", action="store_true", help="only RSS at ready and after --duration s of load"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.duration = 1, 3.0
    with tempfile.TemporaryDirectory(prefix="shadow-overhead-") as temp:
        results = run(args, Path(temp))
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    if results["summary"]:
        print(json.dumps(results["summary"], indent=2))
    print(json.dumps({"shadow": results["shadow"], "rss_mb": results["rss_mb"]}, indent=2))


if __name__ == "__main__":
    main()
