"""Writes the hostile-image regression corpus: tests/data/hostile/ and its manifest.json.

Each file is small (the largest is ~140 KB) and says in the manifest what the API must answer:
200 for valid but unusual formats, 400 for corrupt or mislabelled files, 413 for bombs. The
arithmetic-coded JPEG comes from libjpeg-turbo's `cjpeg -arithmetic` (Debian package
libjpeg-turbo-progs); everything else is built here from scikit-image's photographs or by
hand. Run: `python fuzz/make_hostile.py` (the files are committed; CI does not rerun this).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as samples

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "hostile"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return struct.pack(">I", size) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, depth: int, colour: int, rows: Iterator[bytes],
         extra: bytes = b"") -> bytes:
    """A PNG streamed from raw rows (filter byte included), compressed as it goes."""
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (PNG_MAGIC + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _photo(name: str = "astronaut", size: tuple[int, int] = (160, 120)) -> Image.Image:
    return Image.fromarray(getattr(samples, name)()).convert("RGB").resize(size, Image.BILINEAR)


def _tiff_ifd(entries: list[tuple[int, int, int, bytes]], next_ifd: int) -> bytes:
    """A little-endian IFD at offset 8 of a TIFF header (tag, type, count, 4-byte value)."""
    body = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        body += struct.pack("<HHI", tag, kind, count) + value
    return b"II*\x00" + struct.pack("<I", 8) + body + struct.pack("<I", next_ifd)


def _exif_loop() -> bytes:
    """IFD0: Orientation 6, an Exif-IFD pointer and a next-IFD offset all pointing at IFD0."""
    return _tiff_ifd(
        [(0x0112, 3, 1, struct.pack("<HH", 6, 0)), (0x8769, 4, 1, struct.pack("<I", 8))],
        next_ifd=8,
    )


def _exif_huge_counts() -> bytes:
    """Entries claiming 2^31 values far past the end of the block."""
    return _tiff_ifd(
        [(0x0112, 3, 0x7FFFFFFF, struct.pack("<I", 0x10)),
         (0x010F, 2, 0x7FFFFFFF, struct.pack("<I", 0xFFFFFF00))],
        next_ifd=0xFFFFFFF0,
    )


def _exif_many_entries() -> bytes:
    """5000 entries (60 KB, just under a JPEG segment's 64 KB)."""
    entries = [(0x9000 + index % 0x100, 3, 1, struct.pack("<HH", index, 0))
               for index in range(5000)]
    return _tiff_ifd([(0x0112, 3, 1, struct.pack("<HH", 3, 0)), *entries], next_ifd=0)


def _with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    sof = data.index(b"\xff\xc0")
    patched = bytearray(data)
    patched[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(patched)


def _scan_bomb(side: int = 1000, repeats: int = 400) -> bytes:
    """A progressive grayscale JPEG whose last scan is repeated `repeats` times."""
    data = _encode(Image.new("L", (side, side), 128), "JPEG", quality=50, progressive=True)
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * repeats + data[end:]


def _arithmetic_jpeg(photo: Image.Image) -> bytes | None:
    cjpeg = shutil.which("cjpeg")
    if cjpeg is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "in.ppm"
        photo.save(source)
        return subprocess.run(
            [cjpeg, "-arithmetic", "-quality", "85", str(source)],
            check=True, capture_output=True,
        ).stdout


def corpus() -> Iterator[tuple[str, bytes, str, int, str]]:
    """(file name, bytes, declared content type, expected status, why)."""
    photo = _photo()
    jpeg = _encode(photo, "JPEG", quality=85)
    png = _encode(photo, "PNG")
    # --- corrupt or mislabelled: 400
    yield "truncated-half.jpg", jpeg[: len(jpeg) // 2], "image/jpeg", 400, "JPEG cut in half"
    yield "truncated-headers.jpg", jpeg[:300], "image/jpeg", 400, "only the JPEG headers"
    yield "truncated-idat.png", png[: len(png) * 2 // 3], "image/png", 400, "PNG cut in IDAT"
    yield "truncated-signature.png", PNG_MAGIC[:6], "image/png", 400, "half a PNG signature"
    gif = _encode(photo.convert("P"), "GIF")
    yield "gif-declared-jpeg.jpg", gif, "image/jpeg", 400, "GIF bytes declared image/jpeg"
    yield "text-declared-png.png", b"<html>not an image</html>\n", "image/png", 400, "text"
    yield "jpeg-magic-then-zeros.jpg", b"\xff\xd8\xff\xe0" + bytes(2000), "image/jpeg", 400, (
        "JPEG magic, no JPEG")
    enormous = (PNG_MAGIC + png[8:33] + _chunk(b"tEXt", b"Comment\x00x", length=0x7FFFFFF0)
                + png[33:])
    yield "enormous-chunk-length.png", enormous, "image/png", 400, (
        "a tEXt chunk claiming 2 GiB")
    yield "enormous-idat-length.png", (PNG_MAGIC + png[8:33] + struct.pack(">I", 0x7FFFFFFF)
                                       + b"IDAT" + bytes(64)), "image/png", 400, (
        "an IDAT chunk claiming 2 GiB")
    text_bomb = zlib.compress(bytes(8 * 1024 * 1024), 9)
    yield "ztxt-bomb.png", (PNG_MAGIC + png[8:33] + _chunk(b"zTXt", b"Comment\x00\x00" + text_bomb)
                            + png[33:]), "image/png", 400, (
        "a zTXt chunk inflating to 8 MiB (Pillow refuses text over 1 MB)")
    icc_bomb = zlib.compress(bytes(8 * 1024 * 1024), 9)
    yield "iccp-bomb.png", (PNG_MAGIC + png[8:33] + _chunk(b"iCCP", b"icc\x00\x00" + icc_bomb)
                            + png[33:]), "image/png", 400, "an iCCP profile inflating to 8 MiB"
    # --- bombs: 413
    tiny_idat = iter([b"\x00" * 16])
    yield "bomb-65535x65535.png", _png(65535, 65535, 8, 2, tiny_idat), "image/png", 413, (
        "4.3 gigapixels declared in a tiny file")
    yield "bomb-65535x65535.jpg", _with_jpeg_size(jpeg, 65535, 65535), "image/jpeg", 413, (
        "SOF header patched to 65535x65535")
    yield "bomb-400-scans.jpg", _scan_bomb(), "image/jpeg", 413, (
        "a progressive JPEG repeating one scan 400 times (CPU bomb)")
    yield "header-2000-comments.jpg", jpeg[:2] + b"\xff\xfe\x00\x02" * 2000 + jpeg[2:], (
        "image/jpeg"), 413, "2,000 empty COM segments (Pillow parses headers in Python)"
    yield "header-8000-fill-bytes.jpg", jpeg[:2] + b"\xff" * 8000 + jpeg[2:], "image/jpeg", 413, (
        "8,000 0xFF fill bytes before a marker")
    # --- unusual but valid: 200
    yield "progressive.jpg", _encode(photo, "JPEG", quality=85, progressive=True), (
        "image/jpeg"), 200, "progressive JPEG"
    arithmetic = _arithmetic_jpeg(photo)
    if arithmetic is not None:
        yield "arithmetic.jpg", arithmetic, "image/jpeg", 200, "arithmetic-coded (cjpeg)"
    yield "cmyk.jpg", _encode(photo.convert("CMYK"), "JPEG", quality=85), "image/jpeg", 200, (
        "CMYK JPEG (Adobe marker)")
    gray16 = (np.asarray(photo.convert("L"), np.uint16) * 257).astype(">u2")
    yield "gray-16bit.png", _png(160, 120, 16, 0, (b"\x00" + row.tobytes() for row in gray16)), (
        "image/png"), 200, "16-bit grayscale PNG"
    rgb16 = (np.asarray(photo, np.uint16) * 257).astype(">u2")
    yield "rgb-16bit.png", _png(160, 120, 16, 2, (b"\x00" + row.tobytes() for row in rgb16)), (
        "image/png"), 200, "16-bit RGB PNG"
    small = photo.resize((96, 72), Image.BILINEAR)
    frames = [small, small.transpose(Image.FLIP_LEFT_RIGHT), small.rotate(180)]
    yield "animated.png", _encode(frames[0], "PNG", save_all=True, append_images=frames[1:],
                                  duration=100, loop=0), "image/png", 200, "APNG, 3 frames"
    for name, exif, why in (
        ("exif-loop.jpg", _exif_loop(), "EXIF IFDs pointing at themselves"),
        ("exif-huge-counts.jpg", _exif_huge_counts(), "EXIF counts of 2^31"),
        ("exif-5000-entries.jpg", _exif_many_entries(), "5000 EXIF entries"),
    ):
        yield name, _encode(photo, "JPEG", quality=80, exif=b"Exif\x00\x00" + exif), (
            "image/jpeg"), 200, why
    exif_png = (PNG_MAGIC + png[8:33] + _chunk(b"eXIf", _exif_loop()) + png[33:])
    yield "exif-loop.png", exif_png, "image/png", 200, "eXIf chunk with looping IFDs"
    zero_rows = (bytes(1 + 6000 * 4) for _ in range(6000))
    yield "rgba-6000x6000-zeros.png", _png(6000, 6000, 8, 6, zero_rows), "image/png", 200, (
        "36 MP RGBA in 136 KB: within MAX_IMAGE_PIXELS, decoded in row blocks")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, content, content_type, status, why in corpus():
        (OUT / name).write_bytes(content)
        manifest[name] = {"content_type": content_type, "status": status, "why": why}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(len((OUT / name).read_bytes()) for name in manifest)
    print(f"wrote {len(manifest)} files ({total} bytes) to {OUT}")


if __name__ == "__main__":
    main()
