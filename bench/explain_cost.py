"""Cost of one explanation heatmap, as the service computes it, at idle.

    python bench/explain_cost.py --model /tmp/prod            # production architecture
    python bench/explain_cost.py --model src/rottenbot_inference/models/demo --count 20

Builds the bundle exactly as the service does (its default threads: one single-threaded
inference worker per CPU, so an explanation runs on one core), then explains `--count` fresh
rotten synthetic pictures (JPEG 90, 640 x 480: decode + EXPLAIN_GRID² + 1 model passes in
batches of EXPLAIN_BATCH_SIZE, nothing else running) and prints the median and p90 in ms,
of wall time and of the thread's CPU time (on a busy machine the CPU time is the better guide to
the wall time at idle: it leaves out the time other processes held the core).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from rottenbot_inference.demo.synthetic import CLASS_NAMES, render
from rottenbot_inference.inference.explain import occlusion_heatmap
from rottenbot_inference.inference.images import ImagePreprocessor
from rottenbot_inference.inference.loader import LocalSource, ModelLoader
from rottenbot_inference.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--grid", type=int, default=None, help="default: EXPLAIN_GRID")
    args = parser.parse_args()
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    grid = args.grid or settings.explain_grid
    bundle = ModelLoader(settings).load(LocalSource(args.model))
    bundle.warm_up(settings.explain_batch_size)
    preprocessor = ImagePreprocessor(bundle.image_size, max_pixels=settings.max_image_pixels)
    rotten = [i for i, name in enumerate(CLASS_NAMES) if name.endswith("__Rotten")]
    timings, cpu = [], []
    for item in range(args.count):
        class_index = rotten[item % len(rotten)]
        rgb = render(class_index, np.random.default_rng([777, item]), (480, 640))
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        started, started_cpu = time.perf_counter(), time.thread_time()
        pixels = preprocessor.prepare(jpeg.tobytes()).pixels
        heatmap = occlusion_heatmap(
            pixels, bundle.predict, bundle.class_names, grid, grid,
            settings.explain_batch_size, versus_counterpart=True,
        )
        timings.append((time.perf_counter() - started) * 1000)
        cpu.append((time.thread_time() - started_cpu) * 1000)
    timings.sort()
    cpu.sort()
    print(json.dumps({
        "model": str(args.model),
        "runtime": bundle.runtime.describe(),
        "grid": grid,
        "passes": heatmap.passes,
        "batch_size": settings.explain_batch_size,
        "explanations": len(timings),
        "median_ms": round(statistics.median(timings), 1),
        "p90_ms": round(timings[int(0.9 * (len(timings) - 1))], 1),
        "cpu_median_ms": round(statistics.median(cpu), 1),
        "cpu_p90_ms": round(cpu[int(0.9 * (len(cpu) - 1))], 1),
    }, indent=2))


if __name__ == "__main__":
    main()
