"""Cost of decompression and CPU bombs in the image pipeline: peak memory and time.

    .venv/bin/python bench/image_bombs.py [--side 6000]

Each case runs in a fresh child process (peak RSS is per process): a PNG of side x side zero
pixels in several modes (all tiny files: zeros compress ~1000:1, and 36 MP is under the
default MAX_IMAGE_PIXELS), and a 2000x2000 progressive JPEG whose last scan is repeated 500
times. Prints one markdown table row per case (docs/security.md).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import struct
import subprocess
import sys
import time
import zlib

PNG_MODES = {  # name: (bit depth, colour type, bytes per pixel)
    "RGB 8-bit": (8, 2, 3),
    "RGBA 8-bit": (8, 6, 4),
    "gray 16-bit": (16, 0, 2),
    "RGB 16-bit": (16, 2, 6),
    "gray+alpha 8-bit": (8, 4, 2),
}


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_zeros(side: int, depth: int, colour: int, bpp: int) -> bytes:
    row = bytes(1 + side * bpp)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def jpeg_scan_bomb(side: int = 2000, repeats: int = 500) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", quality=50, progressive=True)
    data = buffer.getvalue()
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * repeats + data[end:]


def measure(case: str, side: int) -> dict:
    """In this process: build the file, run the preprocessor once, report cost."""
    from rottenbot_inference.inference.images import ImageError, ImagePreprocessor

    data = jpeg_scan_bomb() if case == "JPEG 500 scans" else png_zeros(side, *PNG_MODES[case])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        ImagePreprocessor((224, 224), 40_000_000).prepare(data)
        outcome = "decoded"
    except ImageError as exc:
        outcome = type(exc).__name__
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"case": case, "file_kb": len(data) // 1024, "peak_mb": peak // 1024,
            "seconds": round(seconds, 2), "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.side)))
        return
    print("| file | size | peak RSS growth | time | outcome |\n|---|---|---|---|---|")
    for case in [*PNG_MODES, "JPEG 500 scans"]:
        child = subprocess.run(
            [sys.executable, __file__, "--side", str(args.side), "--case", case],
            capture_output=True, text=True, check=True,
        )
        row = json.loads(child.stdout.strip().splitlines()[-1])
        label = case if case.startswith("JPEG") else f"PNG {args.side}x{args.side} {case}"
        print(f"| {label} | {row['file_kb']} KB | {row['peak_mb']} MB | {row['seconds']} s "
              f"| {row['outcome']} |")


if __name__ == "__main__":
    main()
