"""The image pipeline: sniff the format from the bytes, decode, orient, resize to the model input.

Resizing follows training (`keras.utils.image_dataset_from_directory` defaults): bilinear with
half-pixel centres, aspect ratio not kept, no antialiasing - `cv2.INTER_LINEAR` computes the same.
JPEGs are decoded by libjpeg-turbo (simplejpeg) with the fast integer IDCT, as TensorFlow does,
optionally at a reduced DCT scale for large photos. Everything else goes through Pillow.
"""

from __future__ import annotations

import io
import warnings
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


def _swaps_axes(orientation: int) -> bool:
    return orientation in (5, 6, 7, 8)


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
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
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
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise CorruptImage("The image has no pixels.")
            if width * height > self.max_pixels:
                raise ImageTooLarge(
                    f"The image has {width}x{height} pixels; the limit is {self.max_pixels}."
                )
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            if image_format is ImageFormat.JPEG and image.mode in ("RGB", "L"):
                rgb = self._decode_jpeg(data)
            else:
                image.load()
                rgb = _pil_to_rgb(image)
        return PreparedImage(
            pixels=self._resize(rgb, orientation),
            format=image_format,
            width=width,
            height=height,
        )

    def _decode_jpeg(self, data: bytes) -> np.ndarray:
        minimum = 2 * max(self.height, self.width) if self.dct_scaling else 0
        return simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=True, min_height=minimum, min_width=minimum
        )

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
