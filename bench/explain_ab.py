"""Predict latency with and without explanations alongside: interleaved A/B on one service.

    python bench/explain_ab.py --model /tmp/prod --rounds 2 --rate 60 --duration 30

Starts the service once (the given model, no storage, access log off), then alternates: predict
load alone (bench/loadgen.py, constant rate, 1024x768 JPEGs), and the same load with one
explanation per second (bench/explain_alongside.py) in parallel. Prints predict p50/p99, ok/s
and 503s per run, and the explanations' outcome; --json writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import TEST_SECRET  # noqa: E402
from tests.servers_storage import ServiceProcess  # noqa: E402

IMAGES = str(ROOT / "bench" / "images" / "*_1024x768.jpg")


def run(url: str, rate: float, duration: float, explain: bool, folder: Path) -> dict:
    env = {**os.environ, "JWT_SECRET": TEST_SECRET}
    out = folder / "load.json"
    load = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--url", url, "--images", IMAGES,
         "--rate", str(rate), "--duration", str(duration), "--json", str(out)],
        env=env, stdout=subprocess.DEVNULL)
    explained = None
    if explain:
        explained = json.loads(subprocess.run(
            [sys.executable, str(ROOT / "bench" / "explain_alongside.py"), "--url", url,
             "--images", IMAGES, "--rate", "1", "--duration", str(duration)],
            env=env, check=True, capture_output=True, text=True).stdout)
    load.wait()
    result = json.loads(out.read_text())
    return {"explain": explain, "predict": result, "explanations": explained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=60)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="explain-ab-") as temp:
        service = ServiceProcess(
            {"MODEL_PATH": str(args.model), "DATA_DIR": str(Path(temp) / "data"),
             "JWT_SECRET": TEST_SECRET, "LOG_LEVEL": "warning", "ACCESS_LOG": "false"},
            Path(temp) / "service.log")
        url = service.start()
        try:
            run(url, args.rate, 5, False, Path(temp))  # warm-up
            for _ in range(args.rounds):
                for explain in (False, True):
                    runs.append(run(url, args.rate, args.duration, explain, Path(temp)))
                    p = runs[-1]["predict"]
                    e = runs[-1]["explanations"] or {}
                    print(f"explanations {'1/s' if explain else 'off'}: predict "
                          f"{p['ok_per_s']:.1f} ok/s p50 {p['p50']} p99 {p['p99']} ms "
                          f"statuses {p['statuses']}"
                          + (f"; explanations {e.get('statuses')} p50 {e.get('p50_ms')} ms"
                             if explain else ""), flush=True)
        finally:
            service.stop()
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
