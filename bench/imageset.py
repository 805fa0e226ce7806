"""Upload-sized test images made from real photographs (scikit-image's sample images).

    python bench/imageset.py --out bench/images

Writes `<photo>_<W>x<H>.jpg` (quality 90) at 224x224, 640x480, 1024x768, 1600x1200 and
4032x3024, plus a few PNGs, re-encoded from the photos with an INTER_AREA resize.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

SIZES = [(224, 224), (640, 480), (1024, 768), (1600, 1200), (4032, 3024)]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


def photo(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def encode(rgb: np.ndarray, suffix: str, quality: int = 90) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if suffix == ".jpg" else []
    ok, buffer = cv2.imencode(suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    assert ok
    return buffer.tobytes()


def make(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PHOTOS:
        rgb = photo(name)
        for width, height in SIZES:
            resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA
                                 if width < rgb.shape[1] else cv2.INTER_CUBIC)
            path = out / f"{name}_{width}x{height}.jpg"
            path.write_bytes(encode(resized, ".jpg"))
            written.append(path)
            if (width, height) in ((640, 480), (1024, 768)):
                png = out / f"{name}_{width}x{height}.png"
                png.write_bytes(encode(resized, ".png"))
                written.append(png)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/images"))
    args = parser.parse_args()
    for path in make(args.out):
        print(f"{path}  {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
