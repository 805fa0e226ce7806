"""A heatmap laid over the picture the model saw, as a PNG a person can look at.

The model input (already resized, aspect ratio not kept) is stretched back to the upload's
aspect ratio, at most `max_side` pixels on its longer side. Only cells whose hiding lowered the
class's probability are coloured (red = most), scaled to the largest such drop; the rest of the
picture shows through unchanged.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rottenbot_inference.inference.explain import Heatmap
from rottenbot_inference.inference.resize import resize_bilinear

MAX_SIDE = 448
_OPACITY = 0.6  # of the colour at the heatmap's maximum


def _jet() -> np.ndarray:
    """The "jet" colour map (blue - cyan - yellow - red) as a 256x3 RGB table; within 1 of
    OpenCV's COLORMAP_JET."""
    x = np.arange(256) / 255

    def ramp(centre: float) -> np.ndarray:
        return np.clip(1.5 - np.abs(4 * x - centre), 0, 1)

    return np.rint(np.stack([ramp(3), ramp(2), ramp(1)], axis=1) * 255).astype(np.float32)


_JET = _jet()


def output_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) with the upload's aspect ratio, longer side `max_side` (never 0)."""
    scale = max_side / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def overlay_png(
    pixels: np.ndarray, heatmap: Heatmap, width: int, height: int, max_side: int = MAX_SIDE
) -> bytes:
    """PNG of `pixels` (model input, float RGB 0-255) with `heatmap` over it."""
    size = output_size(width, height, max_side)
    photo = resize_bilinear(np.clip(pixels, 0, 255).astype(np.uint8), *size)
    positive = np.clip(heatmap.grid, 0, None)
    peak = float(positive.max())
    weight = positive / peak if peak > 0 else positive
    weight = resize_bilinear(weight.astype(np.float32), *size)
    colours = _JET[(weight * 255).astype(np.uint8)]
    alpha = (_OPACITY * np.sqrt(weight))[..., None]  # sqrt: weaker cells stay visible
    blended = photo.astype(np.float32) * (1 - alpha) + colours * alpha
    buffer = io.BytesIO()
    Image.fromarray(blended.round().astype(np.uint8), "RGB").save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()
