"""The NumPy bilinear resize that replaced OpenCV's in the runtime image: bit-identical to
`cv2.resize(..., INTER_LINEAR)` for uint8 (the image pipeline's parity with training was measured
with OpenCV's), close for float; upscaling, downscaling, exact halving (OpenCV's area shortcut),
single pixels, 1-4 channels and 2-D input.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from rottenbot_inference.inference.resize import resize_bilinear
from tests.helpers import require_import

SIZES = [
    # (source height, width) -> (target height, width)
    ((150, 200), (224, 224)),  # upscaling: edge rows weigh the edge pixel twice
    ((480, 640), (224, 224)),
    ((756, 1008), (224, 224)),  # a DCT-scaled phone photo
    ((448, 448), (224, 224)),  # exactly half: OpenCV takes its area path
    ((672, 672), (224, 224)),  # exactly a third
    ((1, 1), (224, 224)),
    ((224, 224), (1, 1)),
    ((37, 53), (160, 224)),
    ((301, 17), (5, 299)),
]


@pytest.fixture(scope="module")
def cv2() -> ModuleType:
    return require_import("cv2", "OpenCV (the reference) is not importable")


@pytest.mark.parametrize(("source", "target"), SIZES)
@pytest.mark.parametrize("channels", [0, 1, 3, 4])
def test_uint8_is_bit_identical_to_opencv(cv2, source, target, channels) -> None:
    rng = np.random.default_rng(hash((source, target, channels)) % 2**32)
    shape = source if channels == 0 else (*source, channels)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    height, width = target
    expected = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)
    ours = resize_bilinear(pixels, width, height)
    assert ours.dtype == np.uint8
    assert ours.shape == (height, width, *shape[2:])
    np.testing.assert_array_equal(ours, expected.reshape(ours.shape))


@pytest.mark.parametrize(("source", "target"), SIZES)
def test_float_matches_opencv(cv2, source, target) -> None:
    values = np.random.default_rng(7).random(source, dtype=np.float32)
    height, width = target
    expected = cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)
    ours = resize_bilinear(values, width, height)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_an_empty_target_is_refused() -> None:
    with pytest.raises(ValueError):
        resize_bilinear(np.zeros((4, 4), np.uint8), 0, 4)
