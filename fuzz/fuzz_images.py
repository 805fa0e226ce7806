"""Coverage-guided fuzzing of the image pipeline (atheris / libFuzzer).

The property: any bytes either become the model's input (float32, 224x224x3, finite, 0-255)
or raise the service's ImageError (a 400/413). Any other exception, a crash, a hang past
-timeout or memory past -rss_limit_mb is a bug. Our code and Pillow (pure Python parts) are
instrumented; libjpeg-turbo, libpng/zlib and OpenCV are native and count only as black boxes.

    python fuzz/fuzz_images.py /tmp/fuzz-corpus fuzz/seeds -max_total_time=600

See fuzz/README.md.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["rottenbot_inference.inference.images", "PIL"]):
    import numpy as np
    from PIL import Image, JpegImagePlugin, PngImagePlugin  # noqa: F401 (instrumented)

    from rottenbot_inference.inference.images import ImageError, ImagePreprocessor

SIZE = (224, 224)
MAX_PIXELS = 40_000_000  # the service's default MAX_IMAGE_PIXELS
PREPROCESSOR = ImagePreprocessor(SIZE, MAX_PIXELS, dct_scaling=True)


def check(data: bytes) -> None:
    """The property itself (also used by the regression tests): decode cleanly or ImageError."""
    try:
        prepared = PREPROCESSOR.prepare(data)
    except ImageError:
        return
    pixels = prepared.pixels
    assert pixels.shape == (*SIZE, 3), pixels.shape
    assert pixels.dtype == np.float32, pixels.dtype
    assert np.isfinite(pixels).all()
    assert pixels.min() >= 0.0 and pixels.max() <= 255.0
    assert prepared.width > 0 and prepared.height > 0


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
