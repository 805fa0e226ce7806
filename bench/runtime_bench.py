"""Runtime-only benchmark: images/s of the serving runtime at batch sizes 1..16.

    python bench/runtime_bench.py --model /tmp/prod            # MLflow dir, .keras or .onnx
    python bench/runtime_bench.py --model /tmp/prod --threads 2 --rounds 5
    python bench/runtime_bench.py --model /tmp/prod --compare-runtimes   # + the runtime table

Builds the bundle exactly as the service does (conversion cached in DATA_DIR/model-cache),
then times `bundle.predict` in interleaved rounds (the VM's speed drifts) and reports medians:
one stream of calls with all CPUs as intra-op threads (the best single-image latency). Then,
as the service runs it by default, one single-threaded stream per CPU at batch 1 on the same
session (throughput, images/s). The runtime is whatever MODEL_RUNTIME / MODEL_PRECISION pick
(auto: see docs/models.md). `--compare-runtimes` adds ONNX Runtime fp32, OpenVINO fp32 and
OpenVINO bf16 side by side (bench/runtime_compare.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from rottenbot_inference.inference.loader import LocalSource, ModelLoader
from rottenbot_inference.resources import cpu_quota
from rottenbot_inference.settings import Settings


def concurrent_streams(model: Path, streams: int, seconds: float) -> float:
    """Images/s of `streams` threads each calling the session at batch 1 (1 intra-op thread)."""
    settings = Settings(_env_file=None, inference_threads=1, inference_workers=streams)
    bundle = ModelLoader(settings).load(LocalSource(model))
    pixels = np.random.default_rng(1).uniform(0, 255, (1, *bundle.input_shape))
    pixels = pixels.astype(np.float32)
    for _ in range(5):
        bundle.predict(pixels)
    from runtime_compare import streams_rate

    return streams_rate(bundle, pixels, streams, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per round and size")
    parser.add_argument("--streams", type=int, default=None,
                        help="concurrent single-threaded streams (default: the CPU quota)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--compare-runtimes", action="store_true",
                        help="also measure ONNX Runtime fp32, OpenVINO fp32 and OpenVINO bf16")
    args = parser.parse_args()

    threads = args.threads or cpu_quota()
    settings = Settings(_env_file=None, inference_threads=threads, inference_workers=1)
    started = time.perf_counter()
    bundle = ModelLoader(settings).load(LocalSource(args.model))
    load_s = time.perf_counter() - started
    sizes = [int(size) for size in args.batches.split(",")]
    rng = np.random.default_rng(0)
    inputs = {s: rng.uniform(0, 255, (s, *bundle.input_shape)).astype(np.float32) for s in sizes}
    for size in sizes:  # warm-up
        bundle.predict(inputs[size])
    samples: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(args.rounds):
        for size in sizes:
            for _ in range(args.calls):
                t0 = time.perf_counter()
                bundle.predict(inputs[size])
                samples[size].append(time.perf_counter() - t0)
    rows = []
    print(f"model {bundle.name} {bundle.version} runtime {bundle.runtime.describe()}")
    print(f"load (incl. conversion if not cached): {load_s:.2f} s")
    print(f"{'batch':>5} {'median ms':>10} {'p90 ms':>8} {'images/s':>9}")
    for size in sizes:
        median = statistics.median(samples[size])
        p90 = float(np.percentile(samples[size], 90))
        rows.append({"batch": size, "median_ms": median * 1000, "p90_ms": p90 * 1000,
                     "images_per_s": size / median})
        print(f"{size:>5} {median * 1000:>10.2f} {p90 * 1000:>8.2f} {size / median:>9.1f}")
    streams = args.streams or cpu_quota()
    parallel = concurrent_streams(args.model, streams, seconds=2.0 * args.rounds)
    print(f"{streams} single-threaded streams at batch 1: {parallel:.1f} images/s")
    compared = None
    if args.compare_runtimes:
        from runtime_compare import compare_runtimes, print_table

        compared = compare_runtimes(args.model, streams, args.rounds, args.calls)
        print_table(compared)
    if args.json:
        args.json.write_text(json.dumps(
            {"load_s": load_s, "threads": threads, "rows": rows,
             "runtime": bundle.runtime.describe(),
             "streams": {"count": streams, "images_per_s": parallel},
             "runtimes": compared}, indent=1))


if __name__ == "__main__":
    main()
