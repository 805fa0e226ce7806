"""ONNX Runtime fp32, OpenVINO fp32 and OpenVINO bf16 side by side on one model.

    python bench/runtime_compare.py --model /tmp/prod [--rounds 5 --calls 20 --streams 2]

Each variant is built as the service builds it (ModelLoader with MODEL_RUNTIME /
MODEL_PRECISION, one intra-op thread per stream, the agreement check included), then measured in
interleaved rounds (the VM drifts): batch 1 from one thread (wall ms and CPU ms per image),
batch 4 from one thread (images/s), and `streams` threads at batch 1 (images/s). Top-1
agreement and max abs softmax difference are against ONNX Runtime fp32 on real photographs
(scikit-image samples; the production model's weights are random, so accuracy means nothing).
On a CPU without native bf16, OpenVINO compiles the bf16 request to fp32 and the table says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from rottenbot_inference.inference.bundle import ModelBundle
from rottenbot_inference.inference.loader import LocalSource, ModelLoader
from rottenbot_inference.resources import cpu_quota
from rottenbot_inference.settings import Settings

VARIANTS = (
    ("ONNX Runtime fp32", "onnxruntime", "auto"),
    ("OpenVINO fp32", "openvino", "fp32"),
    ("OpenVINO bf16", "openvino", "bf16"),
)


def _photos(count: int, size: int) -> np.ndarray:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from build_production_model import sample_photos
    finally:
        sys.path.pop(0)
    return sample_photos(count, size)


def streams_rate(bundle: ModelBundle, pixels: np.ndarray, streams: int, seconds: float) -> float:
    """Images/s of `streams` threads calling the bundle back to back for `seconds`."""
    counts = [0] * streams
    stop = time.perf_counter() + seconds

    def stream(index: int) -> None:
        while time.perf_counter() < stop:
            bundle.predict(pixels)
            counts[index] += 1

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def compare_runtimes(
    model: Path, streams: int, rounds: int = 5, calls: int = 20
) -> list[dict[str, Any]]:
    """One row per variant (see the module docstring)."""
    bundles: dict[str, ModelBundle] = {}
    for label, runtime, precision in VARIANTS:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            model_runtime=runtime,
            model_precision=precision,
            inference_threads=1,
            inference_workers=streams,
            max_batch_size=4,
        )
        bundles[label] = ModelLoader(settings).load(LocalSource(model))
    shape = next(iter(bundles.values())).input_shape
    photos = _photos(16, shape[0]).astype(np.float32)
    reference = bundles[VARIANTS[0][0]].predict(photos)
    one, four = photos[:1], photos[:4]
    wall: dict[str, list[float]] = {label: [] for label in bundles}
    cpu: dict[str, list[float]] = {label: [] for label in bundles}
    batch4: dict[str, list[float]] = {label: [] for label in bundles}
    parallel: dict[str, list[float]] = {label: [] for label in bundles}
    for bundle in bundles.values():  # warm-up
        bundle.warm_up(4)
    for _ in range(rounds):
        for label, bundle in bundles.items():
            for _ in range(calls):
                wall0, cpu0 = time.perf_counter(), time.process_time()
                bundle.predict(one)
                cpu[label].append(time.process_time() - cpu0)
                wall[label].append(time.perf_counter() - wall0)
            started = time.perf_counter()
            for _ in range(max(1, calls // 4)):
                bundle.predict(four)
            batch4[label].append(4 * max(1, calls // 4) / (time.perf_counter() - started))
            parallel[label].append(streams_rate(bundle, one, streams, 1.0))
    rows = []
    for label, bundle in bundles.items():
        probabilities = bundle.predict(photos)
        described = bundle.runtime.describe()
        rows.append(
            {
                "variant": label,
                "runtime": bundle.runtime.name,
                "precision": bundle.runtime.precision,
                "fallback": described.get("fallback"),
                "ms_b1": 1000 * statistics.median(wall[label]),
                "cpu_ms_b1": 1000 * statistics.median(cpu[label]),
                "images_per_s_b4": statistics.median(batch4[label]),
                "images_per_s_streams": statistics.median(parallel[label]),
                "streams": streams,
                "top1_agreement": float((probabilities.argmax(1) == reference.argmax(1)).mean()),
                "max_abs_diff": float(np.abs(probabilities - reference).max()),
                "photos": len(photos),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'variant':<18} {'computes':>9} {'ms b1':>6} {'CPU ms b1':>9} {'img/s b4':>8} "
        f"{'img/s streams':>13} {'top-1':>6} {'max diff':>9}"
    )
    for row in rows:
        computes = row["runtime"] if row["fallback"] else row["precision"]
        print(
            f"{row['variant']:<18} {computes:>9} {row['ms_b1']:>6.2f} {row['cpu_ms_b1']:>9.2f} "
            f"{row['images_per_s_b4']:>8.0f} {row['images_per_s_streams']:>13.0f} "
            f"{100 * row['top1_agreement']:>5.0f}% {row['max_abs_diff']:>9.2g}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--streams", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = compare_runtimes(args.model, args.streams or cpu_quota(), args.rounds, args.calls)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
