"""JPEG decode + resize: CPU ms per image and distance from the training path, per decoder.

    python bench/decode_bench.py [--size 1024x768] [--calls 200]

For five real photographs (scikit-image samples) saved as JPEG (quality 90) at `--size`, one
thread, `time.process_time`, median of `--calls` per variant:

- service: the service's pipeline (ImagePreprocessor, DCT scaling on: 1/2, 1/4 or 1/8 only while
  the decode stays >= 2x the model input);
- full: the same without DCT scaling;
- pillow-draft-2x: Pillow's `Image.draft("RGB", 2x the model input)`, then the same resize;
- dct-1/2: a 1/2-scale decode whatever the size (what relaxing the 2x rule would do).

Distance: mean abs difference from TensorFlow's decode_jpeg + bilinear resize (the training
path; 0-255 scale), worst of the five photos - the quantity tests/test_images.py bounds.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from rottenbot_inference.inference.images import ImagePreprocessor

MODEL = (224, 224)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def _jpeg(width: int, height: int, name: str) -> bytes:
    import skimage.data

    photo = cv2.resize(
        getattr(skimage.data, name)(), (width, height), interpolation=cv2.INTER_CUBIC
    )
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _resize(rgb: np.ndarray) -> np.ndarray:
    return ImagePreprocessor(MODEL, 10**9, dct_scaling=False)._resize(rgb, 1)


def variants() -> dict[str, Callable[[bytes], np.ndarray]]:
    service = ImagePreprocessor(MODEL, 10**9, dct_scaling=True)
    full = ImagePreprocessor(MODEL, 10**9, dct_scaling=False)

    def draft(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (2 * MODEL[1], 2 * MODEL[0]))
            return _resize(np.asarray(image.convert("RGB")))

    def half(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        rgb = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            fastdct=True,
            min_height=-(-height // 2),
            min_width=-(-width // 2),
        )
        return _resize(rgb)

    return {
        "service": lambda data: service.prepare(data).pixels,
        "full": lambda data: full.prepare(data).pixels,
        "pillow-draft-2x": draft,
        "dct-1/2": half,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--no-parity", action="store_true", help="skip the TensorFlow reference")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    jpegs = [_jpeg(width, height, name) for name in PHOTOS]
    reference = None
    if not args.no_parity:
        import tensorflow as tf

        reference = [
            tf.image.resize(tf.io.decode_jpeg(data, channels=3), MODEL, "bilinear").numpy()
            for data in jpegs
        ]
    cpu: dict[str, list[float]] = {}
    decoders = variants()
    for _ in range(args.calls // len(jpegs)):  # interleaved
        for label, decode in decoders.items():
            for data in jpegs:
                started = time.process_time()
                decode(data)
                cpu.setdefault(label, []).append(time.process_time() - started)
    print(f"{args.size} JPEG (q90) -> {MODEL[0]}x{MODEL[1]}, one thread, median CPU ms")
    for label, decode in decoders.items():
        line = f"{label:<16} {1000 * statistics.median(cpu[label]):6.2f} ms"
        if reference is not None:
            worst = max(
                float(np.abs(decode(data) - ref).mean())
                for data, ref in zip(jpegs, reference, strict=True)
            )
            line += f"   worst mean |ours - TF| {worst:.2f}"
        print(line)


if __name__ == "__main__":
    main()
