"""What OpenVINO's compiled-model cache (MODEL_CACHE_DIR/openvino) saves at start.

    python bench/openvino_cache.py --onnx MODEL_CACHE_DIR/<sha256>-<tag>.onnx [--runs 4]

Alternates fresh processes that build the service's OpenVinoRuntime (fp32, one stream per CPU)
with and without the cache (the cache is filled once first) and reports, per mode, the median
wall and CPU seconds of reading + compiling the model, and of importing OpenVINO. CPU seconds
are the steadier figure on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
from pathlib import Path
wall, cpu = time.perf_counter(), time.process_time()
from rottenbot_inference.inference import openvino_runtime as o
o.core()
imported = time.perf_counter() - wall, time.process_time() - cpu
wall, cpu = time.perf_counter(), time.process_time()
cache = Path(sys.argv[2]) if sys.argv[2] else None
o.OpenVinoRuntime(Path(sys.argv[1]), threads=1, workers=int(sys.argv[3]), precision="fp32",
                  cache_dir=cache)
print(json.dumps({"import": imported,
                  "compile": (time.perf_counter() - wall, time.process_time() - cpu)}))
"""


def once(onnx: Path, cache: str, workers: int) -> dict[str, list[float]]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(onnx), cache, str(workers)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        once(args.onnx, folder, args.workers)  # fills the cache
        results: dict[str, list[dict[str, list[float]]]] = {"cache": [], "no cache": []}
        for _ in range(args.runs):
            results["cache"].append(once(args.onnx, folder, args.workers))
            results["no cache"].append(once(args.onnx, "", args.workers))
    for mode, runs in results.items():

        def median(key: str, index: int, runs: list = runs) -> float:
            return statistics.median(run[key][index] for run in runs)

        print(
            f"{mode:>8}: read + compile {median('compile', 0):.2f} s wall, "
            f"{median('compile', 1):.2f} s CPU; import {median('import', 0):.2f} s wall, "
            f"{median('import', 1):.2f} s CPU (medians of {len(runs)})"
        )


if __name__ == "__main__":
    main()
