"""The image pipeline: sniff the format from the bytes, decode, orient, resize to the model input.

Resizing follows training (`keras.utils.image_dataset_from_directory` defaults): bilinear with
half-pixel centres, aspect ratio not kept, no antialiasing - `cv2.INTER_LINEAR` computes the same.
JPEGs are decoded by libjpeg-turbo (simplejpeg) with the fast integer IDCT, as TensorFlow does,
optionally at a reduced DCT scale for large photos. Everything else goes through Pillow.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from enum import StrEnum

import cv2
import numpy as np
import simplejpeg
from PIL import Image

ACCEPTED_CONTENT_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png"})
# Multipart parts without a useful declared type are judged by their bytes alone.
UNDECLARED_CONTENT_TYPES = frozenset({"", "application/octet-stream"})

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

cv2.setNumThreads(1)  # our own thread pool parallelises across requests


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
    """Over the pixel limit."""


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
    while offset < end:
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


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow image -> RGB uint8; alpha is composited on white, 16-bit scaled to 8."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if image.mode == "F" else 65535.0
        gray = np.clip(np.rint(values * (255.0 / scale)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or ("transparency" in image.info)
    if not has_alpha:
        return np.asarray(image.convert("RGB"))
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
    alpha = rgba[:, :, 3:4] / 255.0
    blended = rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


class ImagePreprocessor:
    """Turns uploaded bytes into the model's input array (thread-safe, no shared state)."""

    def __init__(
        self,
        size: tuple[int, int],
        max_pixels: int,
        dct_scaling: bool = True,
    ) -> None:
        self.height, self.width = size
        self.max_pixels = max_pixels
        self.dct_scaling = dct_scaling

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
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise CorruptImage("The image has no pixels.")
            if width * height > self.max_pixels:
                raise ImageTooLarge(
                    f"The image has {width}x{height} pixels; the limit is {self.max_pixels}."
                )
            if image_format is ImageFormat.JPEG and image.mode in ("RGB", "L"):
                rgb = self._decode_jpeg(data, width, height)
            else:
                image.load()  # before getexif: a PNG's eXIf chunk may follow its image data
                rgb = _pil_to_rgb(image)
            orientation = _orientation(image)
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
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
        return _orient(rgb, orientation).astype(np.float32)
