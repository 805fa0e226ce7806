"""Bilinear resizing in NumPy, computed as OpenCV's `cv2.resize(..., INTER_LINEAR)` computes it.

Half-pixel centres, no antialiasing, edge pixels repeated: what training's
`tf.image.resize(..., "bilinear")` does. For uint8 the result is bit-identical to OpenCV 5.0's
(tests/test_resize.py compares them): weights rounded to 11-bit fixed point, a horizontal pass
into integers, then a vertical pass as OpenCV's SIMD kernel does it (both rows shifted right by
4, each multiplied by its weight keeping the high 16 bits, summed, rounded off 2 bits). Vertical
weights are not clamped at the edges - the clamped row is used twice, as OpenCV does. Float
input is interpolated in float32 with the same taps.

It replaces OpenCV in the runtime image, where OpenCV and its bundled libraries took 159 MB for
this and the explanation overlay (docs/containers.md).
"""

from __future__ import annotations

import numpy as np

_ONE = 1 << 11  # OpenCV's INTER_RESIZE_COEF_SCALE


def _taps(source: int, target: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: the two source indices and the second one's weight (float32).

    `clamp` (OpenCV's horizontal rule): outside the source the weight becomes 0 at the edge
    pixel; without it (the vertical rule) only the indices are clamped.
    """
    scale = 1.0 / (target / source)
    position = ((np.arange(target) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.intp)
    weight = (position - first.astype(np.float32)).astype(np.float32)
    if clamp:
        outside = (first < 0) | (first >= source - 1)
        weight[outside] = 0
    second = np.clip(first + 1, 0, source - 1)
    return np.clip(first, 0, source - 1), second, weight


def _fixed(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 weights -> OpenCV's 11-bit integer weights (each rounded on its own)."""
    one = np.rint((np.float32(1) - weight) * np.float32(_ONE)).astype(np.int32)
    return one, np.rint(weight * np.float32(_ONE)).astype(np.int32)


def _flat_columns(columns: np.ndarray, channels: int) -> np.ndarray:
    """Column indices of an (H, W*C) view: each pixel's C values side by side."""
    return (columns[:, None] * channels + np.arange(channels)).ravel()


def resize_bilinear(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """`pixels` (H, W) or (H, W, C), uint8 or float, resized to (height, width[, C]).

    uint8 stays uint8 (bit-identical to OpenCV's INTER_LINEAR); anything else becomes float32.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot resize to {width}x{height}")
    source_height, source_width = pixels.shape[:2]
    channels = pixels.shape[2] if pixels.ndim == 3 else 1
    rows0, rows1, row_weight = _taps(source_height, height, clamp=False)
    cols0, cols1, col_weight = _taps(source_width, width, clamp=True)
    # Rows of W*C values: two gathers per pass instead of fancy indexing per axis.
    flat = np.ascontiguousarray(pixels).reshape(source_height, source_width * channels)
    cols0, cols1 = _flat_columns(cols0, channels), _flat_columns(cols1, channels)
    col_weight = np.repeat(col_weight, channels)
    shape = (height, width, channels) if pixels.ndim == 3 else (height, width)
    if pixels.dtype == np.uint8:
        a0, a1 = _fixed(col_weight)
        b0, b1 = _fixed(row_weight)

        def share(rows: np.ndarray, weight: np.ndarray) -> np.ndarray:
            # The horizontal pass on the rows needed, then their share of the vertical one.
            picked = np.take(flat, rows, axis=0)
            out = np.take(picked, cols0, axis=1).astype(np.int32)
            out *= a0
            right = np.take(picked, cols1, axis=1).astype(np.int32)
            right *= a1
            out += right
            out >>= 4
            out *= weight[:, None]
            out >>= 16
            return out

        out = share(rows0, b0)
        out += share(rows1, b1)
        out += 2
        out >>= 2
        return np.clip(out, 0, 255, out=out).astype(np.uint8).reshape(shape)
    values = flat.astype(np.float32, copy=False)
    w1 = col_weight
    w0 = np.float32(1) - w1

    def blend(rows: np.ndarray) -> np.ndarray:
        picked = np.take(values, rows, axis=0)
        return np.take(picked, cols0, axis=1) * w0 + np.take(picked, cols1, axis=1) * w1

    v1 = row_weight[:, None]
    return (blend(rows0) * (np.float32(1) - v1) + blend(rows1) * v1).reshape(shape)
