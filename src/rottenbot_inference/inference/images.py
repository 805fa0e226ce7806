"""The image pipeline: sniff the format from the bytes, decode, orient, resize to the model input.

Resizing follows training (`keras.utils.image_dataset_from_directory` defaults): bilinear with
half-pixel centres, aspect ratio not kept, no antialiasing - computed as OpenCV's `INTER_LINEAR`
does, bit for bit (`resize.py`; OpenCV itself is not in the runtime image).
JPEGs are decoded by libjpeg-turbo (simplejpeg) with the fast integer IDCT, as TensorFlow does,
optionally at a reduced DCT scale for large photos. Everything else goes through Pillow.
"""

from __future__ import annotations

import io
import re
import warnings
import zlib
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import simplejpeg
from PIL import Image

from rottenbot_inference.inference.resize import resize_bilinear

ACCEPTED_CONTENT_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png"})
# Multipart parts without a useful declared type are judged by their bytes alone.
UNDECLARED_CONTENT_TYPES = frozenset({"", "application/octet-stream"})

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112
_JPEG_SOS = b"\xff\xda"
# Progressive JPEGs from real encoders have 6-12 scans. Every scan is a pass over all of the
# image's blocks, so a small file repeating one scan thousands of times costs minutes of CPU
# (a 22 KB, 2000x2000 file with 500 scans took 3.7 s to decode; see docs/security.md).
MAX_JPEG_SCANS = 32
# Every PNG chunk costs a trip through Python (ours and Pillow's): a 10 MB file of 850,000
# empty chunks took 4.5 s. Real files have a few chunks plus one IDAT per 8-64 KB of data
# (~1,300 for 10 MiB at libpng's 8 KB), or two per frame for APNG.
MAX_PNG_CHUNKS = 20_000
# Pillow reads a JPEG's header (everything before the first scan) in Python, segment by
# segment and fill byte by fill byte: a million empty comments (3.8 MB) took 1.4 s, 9 MB of
# 0xFF padding 3.4 s. Real headers have 10-30 segments (APPn, tables, frame) and no padding.
MAX_JPEG_HEADER_SEGMENTS = 1_000
MAX_JPEG_FILL_BYTES = 4_096
_JPEG_FILL = re.compile(rb"\xff+")
# Colour conversions run over this many rows at a time, so their float temporaries stay small
# (whole-image float32/float64 copies of a 36 MP image took 1-2 GB).
_BLOCK_ROWS = 256
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

# Pillow warns once per distinct damaged EXIF tag ("Tag data larger than file. Skipping tag
# N"): one upload could print thousands of lines. Damaged metadata is ignored anyway (see
# _orientation), so these warnings are silenced once, process-wide, at import.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


class ImageFormat(StrEnum):
    JPEG = "jpeg"
    PNG = "png"

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"

    @property
    def extension(self) -> str:
        return "jpg" if self is ImageFormat.JPEG else "png"


class ImageError(ValueError):
    """The client's image cannot be used (a 4xx, never a 5xx)."""


class UnsupportedImageType(ImageError):
    """Neither JPEG nor PNG."""


class CorruptImage(ImageError):
    """Looks like JPEG/PNG but cannot be decoded."""


class ImageTooLarge(ImageError):
    """Over the pixel limit, or too costly to decode (too many JPEG scans or PNG chunks)."""


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """A decoded image resized for the model, plus what we learned about the upload."""

    pixels: np.ndarray  # float32, (height, width, 3), RGB 0-255
    format: ImageFormat
    width: int
    height: int


def sniff_format(data: bytes) -> ImageFormat | None:
    """The format the bytes really are, by magic number."""
    if data.startswith(_JPEG_MAGIC):
        return ImageFormat.JPEG
    if data.startswith(_PNG_MAGIC):
        return ImageFormat.PNG
    return None


def check_declared_type(content_type: str | None) -> None:
    """Refuse an upload whose declared type is something other than JPEG/PNG."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in ACCEPTED_CONTENT_TYPES and declared not in UNDECLARED_CONTENT_TYPES:
        raise UnsupportedImageType(
            f"Invalid file type. Only JPEG, JPG, and PNG are supported. Got {content_type}"
        )


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an HxWxC array."""
    match orientation:
        case 2:
            out = pixels[:, ::-1]
        case 3:
            out = pixels[::-1, ::-1]
        case 4:
            out = pixels[::-1]
        case 5:
            out = pixels.transpose(1, 0, 2)
        case 6:
            out = np.rot90(pixels, k=-1)
        case 7:
            out = pixels[::-1, ::-1].transpose(1, 0, 2)
        case 8:
            out = np.rot90(pixels, k=1)
        case _:
            out = pixels
    return np.ascontiguousarray(out)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, 1-8; a missing, unreadable or invalid tag counts as 1 (upright).

    Damaged metadata must not turn pixels that decode fine into a "corrupt image" error.
    """
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return 1
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8:
        return value
    return 1


def _swaps_axes(orientation: int) -> bool:
    return orientation in (5, 6, 7, 8)


def _check_png_chunks(data: bytes) -> None:
    """Walk the chunks and verify every critical chunk's CRC, as libpng (TensorFlow) does.

    Pillow checks CRCs only of the chunks before the image data and stops inflating once it has
    the pixels, so a damaged IDAT would otherwise decode "successfully" into garbage.
    """
    view = memoryview(data)
    offset, end = len(_PNG_MAGIC), len(data)
    chunks = 0
    while offset < end:
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise ImageTooLarge(
                f"The PNG has more than {MAX_PNG_CHUNKS} chunks; it would be too costly to read."
            )
        length = int.from_bytes(view[offset : offset + 4], "big")
        stop = offset + 8 + length
        if offset + 12 > end or stop + 4 > end:
            raise CorruptImage("The PNG file is corrupt or truncated (a chunk is cut short).")
        kind = bytes(view[offset + 4 : offset + 8])
        if not kind[0] & 0x20:  # critical chunk (IHDR, PLTE, IDAT, IEND): must be intact
            expected = int.from_bytes(view[stop : stop + 4], "big")
            if zlib.crc32(view[offset + 4 : stop]) != expected:
                raise CorruptImage(
                    f"The PNG file is corrupt (bad checksum on its {kind.decode('latin-1')} chunk)."
                )
        if kind == b"IEND":
            return
        offset = stop + 4


def _check_jpeg_header(data: bytes) -> None:
    """Refuse headers that are cheap to send and costly to parse (see MAX_JPEG_HEADER_*).

    Walks the segments up to the first scan; anything that is not a well-formed marker stops
    the walk quietly and is left to the decoder to report.
    """
    pos, end, segments, fill = 2, len(data), 0, 0
    while pos < end and data[pos] == 0xFF:
        run = _JPEG_FILL.match(data, pos)
        assert run is not None
        fill += run.end() - pos - 1
        pos = run.end()
        segments += 1
        if fill > MAX_JPEG_FILL_BYTES or segments > MAX_JPEG_HEADER_SEGMENTS:
            raise ImageTooLarge(
                "The JPEG header has too many segments or padding bytes; it would be too "
                "costly to read."
            )
        if pos >= end:
            return
        marker = data[pos]
        if marker in (0xDA, 0xD9):  # first scan (or the end): the header is over
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            pos += 1
            continue
        pos += 1 + int.from_bytes(data[pos + 1 : pos + 3], "big")


def _jpeg_scan_count(data: bytes, limit: int) -> int:
    """Scans (SOS segments) of a JPEG; exact once the fast count says more than `limit`.

    Entropy-coded data never holds an unstuffed 0xFF, so counting FF DA over-counts only
    markers inside metadata (an EXIF thumbnail's own scans); the walk skips those segments.
    """
    fast = data.count(_JPEG_SOS)
    if fast <= limit:
        return fast
    scans, pos, end = 0, 2, len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker != 0xDA:
            continue
        scans += 1
        if scans > limit:
            break
        while True:  # to the next marker after the scan's entropy-coded data
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= end:
                return scans
            following = data[pos + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:  # stuffed byte, restart
                pos += 2
            elif following == 0xFF:
                pos += 1
            else:
                break
    return scans


def _sixteen_bit_to_rgb(image: Image.Image) -> np.ndarray:
    """A 16-bit (or 32-bit) grayscale image scaled to 8 bits, replicated to RGB."""
    values = np.asarray(image)
    scale = 255.0 if image.mode == "F" else 65535.0
    out = np.empty((*values.shape[:2], 3), np.uint8)
    for start in range(0, values.shape[0], _BLOCK_ROWS):
        block = values[start : start + _BLOCK_ROWS].astype(np.float64)
        gray = np.clip(np.rint(block * (255.0 / scale)), 0, 255)
        out[start : start + _BLOCK_ROWS] = gray[:, :, None]
    return out


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 -> RGB uint8 over a white background."""
    out = np.empty((*rgba.shape[:2], 3), np.uint8)
    for start in range(0, rgba.shape[0], _BLOCK_ROWS):
        block = rgba[start : start + _BLOCK_ROWS].astype(np.float32)
        alpha = block[:, :, 3:4] / 255.0
        blended = block[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
        out[start : start + _BLOCK_ROWS] = np.clip(np.rint(blended), 0, 255)
    return out


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow image -> RGB uint8; alpha is composited on white, 16-bit scaled to 8.

    Works in row blocks and converts only when the mode differs, so the peak memory is the
    decoded image plus one uint8 copy, whatever the mode.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        return _sixteen_bit_to_rgb(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or ("transparency" in image.info)
    if not has_alpha:
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    return _composite_on_white(
        np.asarray(image if image.mode == "RGBA" else image.convert("RGBA"))
    )


class ImagePreprocessor:
    """Turns uploaded bytes into the model's input array (thread-safe, no shared state)."""

    def __init__(
        self,
        size: tuple[int, int],
        max_pixels: int,
        dct_scaling: bool = True,
        max_jpeg_scans: int = MAX_JPEG_SCANS,
    ) -> None:
        self.height, self.width = size
        self.max_pixels = max_pixels
        self.dct_scaling = dct_scaling
        self.max_jpeg_scans = max_jpeg_scans

    def prepare(self, data: bytes) -> PreparedImage:
        """Decode, orient and resize; raises an ImageError subclass for bad input."""
        if not data:
            raise CorruptImage("The uploaded file is empty.")
        image_format = sniff_format(data)
        if image_format is None:
            raise UnsupportedImageType(
                "The file is not a JPEG or PNG image (judged by its content)."
            )
        # Our own pixel limit is checked right after the header is parsed, before any pixel
        # buffer exists. Pillow's decompression-bomb check runs first, inside Image.open: over
        # Image.MAX_IMAGE_PIXELS it only warns, and we leave that a warning (escalating it needs
        # warnings.catch_warnings, which swaps process-global state - not thread-safe - and
        # silently capped max_pixels at Pillow's limit); over twice that Pillow refuses the
        # image, which we report as too large (as we do the warning if the process escalates it).
        try:
            return self._prepare(data, image_format)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"The image has too many pixels ({exc}).") from exc
        except Exception as exc:  # any decoder failure on client bytes is the client's error
            raise CorruptImage(
                f"The {image_format.name} file is corrupt or truncated and cannot be decoded."
            ) from exc

    def _prepare(self, data: bytes, image_format: ImageFormat) -> PreparedImage:
        if image_format is ImageFormat.PNG:
            _check_png_chunks(data)
        else:
            _check_jpeg_header(data)
            scans = _jpeg_scan_count(data, self.max_jpeg_scans)
            if scans > self.max_jpeg_scans:
                raise ImageTooLarge(
                    f"The JPEG has more than {self.max_jpeg_scans} scans; it would be too costly "
                    "to decode."
                )
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise CorruptImage("The image has no pixels.")
            if width * height > self.max_pixels:
                raise ImageTooLarge(
                    f"The image has {width}x{height} pixels; the limit is {self.max_pixels}."
                )
            if image_format is ImageFormat.JPEG and image.mode in ("RGB", "L"):
                orientation = _orientation(image)
                rgb = self._decode_jpeg(data, width, height)
            else:
                image.load()  # before getexif: a PNG's eXIf chunk may follow its image data
                orientation = _orientation(image)
                rgb = _pil_to_rgb(image)
        # Pillow's copy of the pixels is released here, before resizing.
        return PreparedImage(
            pixels=self._resize(rgb, orientation),
            format=image_format,
            width=width,
            height=height,
        )

    def _decode_jpeg(self, data: bytes, width: int, height: int) -> np.ndarray:
        """libjpeg-turbo decode, at 1/8, 1/4 or 1/2 scale when that stays >= 2x the target.

        Only those three scales: libjpeg-turbo's other scaled IDCTs (3/8, 5/8, 6/8, 7/8) are
        generic C routines, measured slower than a full-size SIMD decode (5/8 of a 1024x768
        photo took ~1.3x the CPU time), so they would cost time as well as fidelity to training.
        """
        if self.dct_scaling:
            minimum = 2 * max(self.height, self.width)  # either axis may become either axis
            for denominator in (8, 4, 2):
                scaled_height = -(-height // denominator)  # libjpeg rounds scaled sizes up
                scaled_width = -(-width // denominator)
                if min(scaled_height, scaled_width) >= minimum:
                    return simplejpeg.decode_jpeg(
                        data,
                        colorspace="RGB",
                        fastdct=True,
                        min_height=scaled_height,
                        min_width=scaled_width,
                    )
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True)

    def _resize(self, rgb: np.ndarray, orientation: int) -> np.ndarray:
        # Resizing commutes with flips/transposes, so resize first (cheap) and orient the result.
        height, width = (
            (self.width, self.height)
            if _swaps_axes(orientation)
            else (
                self.height,
                self.width,
            )
        )
        if rgb.shape[:2] != (height, width):
            rgb = resize_bilinear(rgb, width, height)
        return _orient(rgb, orientation).astype(np.float32)
