"""A heatmap laid over the picture the model saw, as a PNG a person can look at.

The model input (already resized, aspect ratio not kept) is stretched back to the upload's
aspect ratio, at most `max_side` pixels on its longer side. Only cells whose hiding lowered the
class's probability are coloured (red = most), scaled to the largest such drop; the rest of the
picture shows through unchanged.
"""

from __future__ import annotations

import cv2
import numpy as np

from rottenbot_inference.inference.explain import Heatmap

MAX_SIDE = 448
_OPACITY = 0.6  # of the colour at the heatmap's maximum


def output_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) with the upload's aspect ratio, longer side `max_side` (never 0)."""
    scale = max_side / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def overlay_png(
    pixels: np.ndarray, heatmap: Heatmap, width: int, height: int, max_side: int = MAX_SIDE
) -> bytes:
    """PNG of `pixels` (model input, float RGB 0-255) with `heatmap` over it."""
    size = output_size(width, height, max_side)
    photo = cv2.resize(np.clip(pixels, 0, 255).astype(np.uint8), size,
                       interpolation=cv2.INTER_LINEAR)
    positive = np.clip(heatmap.grid, 0, None)
    peak = float(positive.max())
    weight = positive / peak if peak > 0 else positive
    weight = cv2.resize(weight.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap(
        (weight * 255).astype(np.uint8), cv2.COLORMAP_JET
    )[..., ::-1].astype(np.float32)  # BGR -> RGB
    alpha = (_OPACITY * np.sqrt(weight))[..., None]  # sqrt: weaker cells stay visible
    blended = photo.astype(np.float32) * (1 - alpha) + colours * alpha
    ok, encoded = cv2.imencode(
        ".png", cv2.cvtColor(blended.round().astype(np.uint8), cv2.COLOR_RGB2BGR),
        [cv2.IMWRITE_PNG_COMPRESSION, 6],
    )
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()
