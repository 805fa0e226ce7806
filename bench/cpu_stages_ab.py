"""CPU per request by stage for two versions of the service, interleaved on the same stack.

    git worktree add /tmp/before <commit>
    python bench/cpu_stages_ab.py --model /tmp/prod --before /tmp/before/src --rounds 2

Starts PostgreSQL, the S3 stand-in and Redis once (bench/sweep.py's Stack), then alternates a
service built from `--before` (a source folder put first on PYTHONPATH) and the current one,
each measured by bench/cpu_stages.py at `--rate` req/s with half of the requests saved. Prints
the per-stage medians of the rounds side by side and writes them with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import TEST_SECRET  # noqa: E402

from sweep import Stack  # noqa: E402


def measure(url: str, pid: int, rate: float, duration: float, out: Path) -> dict:
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cpu_stages.py"), "--pid", str(pid), "--url", url,
         "--images", str(ROOT / "bench" / "images" / "*_1024x768.jpg"), "--rate", str(rate),
         "--duration", str(duration), "--save-fraction", "0.5", "--json", str(out)],
        check=True, env={**os.environ, "JWT_SECRET": TEST_SECRET})
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--before", type=Path, required=True, help="the older src/ folder")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=60)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--s3", choices=["rclone", "moto"], default="rclone")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="stages-ab-") as temp:
        stack = Stack(Path(temp), args.model, args.s3)
        try:
            for round_ in range(args.rounds):
                for name in ("before", "after"):
                    # Each its own database: the versions may differ in schema revision.
                    database = stack.postgres.create_database(name)
                    extra = {"DATABASE_URL": stack.postgres.url(database),
                             "DATA_DIR": str(Path(temp) / f"data-{name}")}
                    if name == "before":
                        extra["PYTHONPATH"] = str(args.before)
                    service = stack.service(f"{name}-{round_}", **extra)
                    url = service.start()
                    # Warm: the first requests pay for lazy imports and the storage clients.
                    measure(url, service.process.pid, args.rate, 5, Path(temp) / "warm.json")
                    runs[name].append(measure(url, service.process.pid, args.rate,
                                              args.duration, Path(temp) / f"{name}.json"))
                    service.stop()
        finally:
            stack.close()
    stages = sorted({stage for rs in runs.values() for r in rs for stage in r["stages_ms"]})
    table = {name: {stage: round(statistics.median(r["stages_ms"].get(stage, 0.0) for r in rs), 2)
                    for stage in stages} for name, rs in runs.items()}
    totals = {name: round(statistics.median(r["server_cpu_ms_per_request"] for r in rs), 2)
              for name, rs in runs.items()}
    print(f"{'stage':<20} {'before':>8} {'after':>8}   (CPU ms per answered request)")
    for stage in sorted(stages, key=lambda s: -table["before"][s]):
        print(f"{stage:<20} {table['before'][stage]:8.2f} {table['after'][stage]:8.2f}")
    print(f"{'total':<20} {totals['before']:8.2f} {totals['after']:8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"stages": table, "totals": totals, "runs": runs},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
