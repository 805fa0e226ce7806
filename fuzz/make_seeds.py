"""Builds the image fuzzer's seed corpus (fuzz/seeds/) from real photographs.

The photos are scikit-image's bundled samples (astronaut, coffee, chelsea, camera, ...),
shrunk so the fuzzer's executions stay fast, then written in every JPEG/PNG variant the
pipeline has a separate path for: baseline/progressive/grayscale/CMYK JPEG with and without
EXIF orientation, chroma subsampling, and PNG in RGB, RGBA, palette (+ transparency), L, LA,
1-bit, 16-bit and animated (APNG). Run: `python fuzz/make_seeds.py [OUT_DIR]`.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as samples

ORIENTATION = 0x0112


def _photos() -> Iterator[tuple[str, Image.Image]]:
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        rgb = Image.fromarray(getattr(samples, name)())
        yield name, rgb.resize((64, 48), Image.BILINEAR)
    yield "camera", Image.fromarray(samples.camera()).resize((40, 56), Image.BILINEAR)


def _encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def seeds() -> Iterator[tuple[str, bytes]]:
    """(file name, bytes) of every seed."""
    for name, photo in _photos():
        rgb = photo.convert("RGB")
        yield f"{name}.jpg", _encode(rgb, "JPEG", quality=85)
        yield f"{name}.png", _encode(rgb, "PNG")
        if name == "camera":
            yield f"{name}-gray.jpg", _encode(photo.convert("L"), "JPEG", quality=85)
            yield f"{name}-gray.png", _encode(photo.convert("L"), "PNG")
            yield f"{name}-1bit.png", _encode(photo.convert("1"), "PNG")
            wide = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
            yield f"{name}-16bit.png", _encode(Image.fromarray(wide), "PNG")
    astronaut = dict(_photos())["astronaut"].convert("RGB")
    yield "astronaut-progressive.jpg", _encode(astronaut, "JPEG", quality=80, progressive=True)
    yield "astronaut-444.jpg", _encode(astronaut, "JPEG", quality=90, subsampling=0)
    yield "astronaut-422.jpg", _encode(astronaut, "JPEG", quality=90, subsampling=1)
    yield "astronaut-cmyk.jpg", _encode(astronaut.convert("CMYK"), "JPEG", quality=85)
    for orientation in (3, 6, 8):
        yield (
            f"astronaut-exif{orientation}.jpg",
            _encode(astronaut, "JPEG", quality=80, exif=_exif(orientation)),
        )
    yield "astronaut-exif6.png", _encode(astronaut, "PNG", exif=_exif(6))
    coffee = dict(_photos())["coffee"].convert("RGB")
    rgba = coffee.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(coffee.size))
    yield "coffee-rgba.png", _encode(rgba, "PNG")
    yield "coffee-la.png", _encode(rgba.convert("LA"), "PNG")
    palette = coffee.quantize(16)
    yield "coffee-palette.png", _encode(palette, "PNG")
    yield "coffee-palette-trns.png", _encode(palette, "PNG", transparency=0)
    wide = (np.asarray(coffee, dtype=np.uint16) * 257).astype(">u2")
    yield "coffee-rgb16.png", _png_rgb16(wide)
    frames = [coffee, coffee.transpose(Image.FLIP_LEFT_RIGHT)]
    yield "coffee-apng.png", _encode(
        frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100
    )


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one from an array)."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "seeds"
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, content in seeds():
        (out / name).write_bytes(content)
        total += len(content)
    print(f"wrote {len(list(out.iterdir()))} seeds ({total} bytes) to {out}")


if __name__ == "__main__":
    main()
