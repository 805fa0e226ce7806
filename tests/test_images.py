"""The image pipeline: sniffing, declared types, bad input, EXIF orientation, modes, parity.

Parity is measured against the training path, `tf.image.resize(tf.io.decode_jpeg(data,
channels=3), (224, 224), method="bilinear")` (no antialiasing), on real photographs from
scikit-image; those tests skip only when TensorFlow cannot be imported.
"""

from __future__ import annotations

import functools
import io
import re
import struct
import zlib
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from rottenbot_inference.inference.images import (
    ACCEPTED_CONTENT_TYPES,
    CorruptImage,
    ImageError,
    ImageFormat,
    ImagePreprocessor,
    ImageTooLarge,
    PreparedImage,
    UnsupportedImageType,
    check_declared_type,
    sniff_format,
)
from tests.helpers import jpeg_bytes, png_bytes, random_photo, require_import

SIZE = (224, 224)
MAX_PIXELS = 40_000_000
ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def prep() -> ImagePreprocessor:
    return ImagePreprocessor(SIZE, MAX_PIXELS)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference on the 0-255 scale."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def resized(rgb: np.ndarray, size: tuple[int, int] = SIZE) -> np.ndarray:
    """What the pipeline does to already-decoded, already-oriented pixels."""
    height, width = size
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)


def assert_model_input(result: PreparedImage, size: tuple[int, int] = SIZE) -> None:
    assert isinstance(result, PreparedImage)
    assert result.pixels.shape == (*size, 3)
    assert result.pixels.dtype == np.float32
    assert np.isfinite(result.pixels).all()
    assert result.pixels.min() >= 0.0
    assert result.pixels.max() <= 255.0


def encode(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int, color_type: int = 2) -> bytes:
    """A well-formed PNG that declares width x height but carries (almost) no image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """A copy of a baseline JPEG whose SOF0 header claims another size (scan data unchanged)."""
    sof = data.index(b"\xff\xc0")
    patched = bytearray(data)
    patched[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(patched)


def exif_bytes(entry_type: int, count: int, value: bytes, extra: bytes = b"") -> bytes:
    """A little-endian EXIF block with one Orientation entry of any TIFF type (even wrong ones)."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHI", ORIENTATION, entry_type, count) + value
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + extra


# --- sniffing and declared types -------------------------------------------------------------


def test_sniff_format_by_magic_bytes() -> None:
    photo = random_photo(32, 48)
    assert sniff_format(jpeg_bytes(photo)) is ImageFormat.JPEG
    assert sniff_format(png_bytes(Image.fromarray(photo))) is ImageFormat.PNG
    for data in (
        b"",
        b"\xff\xd8",  # too short to be a JPEG marker
        b"\xff\xd9\xff\xe0",
        b"\x89PNG\r\n\x1a",  # one byte short of the PNG signature
        b"GIF89a" + b"\x00" * 20,
        b"BM" + b"\x00" * 40,
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        b"II*\x00" + b"\x00" * 20,
        b"%PDF-1.7",
        b" \xff\xd8\xff",  # the magic must be at the start
    ):
        assert sniff_format(data) is None, data


def test_image_format_properties() -> None:
    assert ImageFormat.JPEG.content_type == "image/jpeg"
    assert ImageFormat.PNG.content_type == "image/png"
    assert ImageFormat.JPEG.extension == "jpg"
    assert ImageFormat.PNG.extension == "png"
    assert frozenset({"image/jpeg", "image/jpg", "image/png"}) == ACCEPTED_CONTENT_TYPES


@pytest.mark.parametrize(
    "content_type",
    [
        "image/jpeg",
        "image/jpg",
        "image/png",
        "image/jpeg; charset=x",
        "image/png;foo=bar",
        "IMAGE/JPEG",
        "Image/Png",
        "  image/jpg  ",
        "image/JPEG ; q=1",
        None,
        "",
        "application/octet-stream",
        "application/octet-stream; name=x.jpg",
    ],
)
def test_declared_type_accepted(content_type: str | None) -> None:
    check_declared_type(content_type)  # does not raise


@pytest.mark.parametrize(
    "content_type",
    [
        "image/gif",
        "image/webp",
        "image/svg+xml",
        "text/plain",
        "application/pdf",
        "image/heic",
        "image/jpeg2000",
        "jpeg",
        "image",
        "image/gif; charset=x",
    ],
)
def test_declared_type_rejected(content_type: str) -> None:
    with pytest.raises(UnsupportedImageType):
        check_declared_type(content_type)


def test_declared_type_rejection_message() -> None:
    message = "Invalid file type. Only JPEG, JPG, and PNG are supported. Got image/gif"
    with pytest.raises(UnsupportedImageType, match=f"^{re.escape(message)}$") as caught:
        check_declared_type("image/gif")
    assert str(caught.value) == message
    assert isinstance(caught.value, ImageError)
    assert isinstance(caught.value, ValueError)


# --- bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_jpeg() -> bytes:
    return jpeg_bytes(random_photo(120, 160, seed=1))


@pytest.fixture(scope="module")
def good_png() -> bytes:
    return png_bytes(Image.fromarray(random_photo(120, 160, seed=2)))


def test_empty_upload(prep: ImagePreprocessor) -> None:
    with pytest.raises(CorruptImage, match="empty"):
        prep.prepare(b"")


@pytest.mark.parametrize(
    "data",
    [
        bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8)),
        b"GIF89a" + b"\x00" * 100,
        b"BM" + b"\x00" * 100,
        b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 100,
        b"II*\x00" + b"\x00" * 100,
        b"\xff\xd8",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    ],
)
def test_not_jpeg_or_png_by_content(prep: ImagePreprocessor, data: bytes) -> None:
    with pytest.raises(UnsupportedImageType):
        prep.prepare(data)


def test_png_bytes_with_jpeg_magic_are_judged_by_content(
    prep: ImagePreprocessor, good_png: bytes
) -> None:
    with pytest.raises(CorruptImage):
        prep.prepare(b"\xff\xd8\xff" + good_png)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.05, 0.25, 0.5, 0.9, 0.99])
def test_truncated_jpeg(prep: ImagePreprocessor, good_jpeg: bytes, fraction: float) -> None:
    cut = max(3, int(len(good_jpeg) * fraction))
    with pytest.raises(CorruptImage):
        prep.prepare(good_jpeg[:cut])


@pytest.mark.parametrize("missing", [1, 2, 3])
def test_jpeg_missing_its_last_bytes(
    prep: ImagePreprocessor, good_jpeg: bytes, missing: int
) -> None:
    with pytest.raises(CorruptImage):
        prep.prepare(good_jpeg[:-missing])


@pytest.mark.parametrize("cut", [8, 12, 16, 20, 29, 33, 40, 60, 0.5, 0.9, -13, -5])
def test_truncated_png(prep: ImagePreprocessor, good_png: bytes, cut: float) -> None:
    """Any chunk cut short is a truncated file (as for libpng); -13 cuts the last IDAT's CRC,
    -5 the IEND chunk (Pillow alone accepted both)."""
    end = int(len(good_png) * cut) if isinstance(cut, float) else cut
    with pytest.raises(CorruptImage):
        prep.prepare(good_png[:end])


def test_png_without_iend_still_decodes(prep: ImagePreprocessor, good_png: bytes) -> None:
    """Cut exactly before IEND (all pixel data intact): accepted, as Pillow and browsers do."""
    assert good_png.endswith(png_chunk(b"IEND", b""))
    assert_model_input(prep.prepare(good_png[:-12]))


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 500,
        b"\xff" * 500,
        bytes(np.random.default_rng(3).integers(0, 256, 2000, dtype=np.uint8)),
    ],
)
def test_jpeg_magic_then_garbage(prep: ImagePreprocessor, garbage: bytes) -> None:
    with pytest.raises(CorruptImage):
        prep.prepare(b"\xff\xd8\xff" + garbage)


def test_jpeg_headers_then_garbage(prep: ImagePreprocessor, good_jpeg: bytes) -> None:
    scan = good_jpeg.index(b"\xff\xda")
    noise = bytes(np.random.default_rng(4).integers(0, 256, 3000, dtype=np.uint8))
    with pytest.raises(CorruptImage):
        prep.prepare(good_jpeg[: scan + 20] + noise)


def test_png_magic_then_garbage(prep: ImagePreprocessor) -> None:
    with pytest.raises(CorruptImage):
        prep.prepare(b"\x89PNG\r\n\x1a\n" + b"\x13" * 300)


def _idat(png: bytes) -> tuple[int, int]:
    """(offset of the first IDAT chunk's data, its length)."""
    kind = png.index(b"IDAT")
    return kind + 4, int.from_bytes(png[kind - 4 : kind], "big")


def test_png_with_corrupt_idat_data(prep: ImagePreprocessor, good_png: bytes) -> None:
    """One flipped byte in the middle of the compressed data; Pillow alone decodes it to garbage."""
    start, length = _idat(good_png)
    damaged = bytearray(good_png)
    damaged[start + length // 2] ^= 0x55
    with pytest.raises(CorruptImage, match="checksum"):
        prep.prepare(bytes(damaged))


def test_png_with_bad_idat_crc(prep: ImagePreprocessor, good_png: bytes) -> None:
    start, length = _idat(good_png)
    damaged = bytearray(good_png)
    damaged[start + length] ^= 0x01  # first byte of the CRC
    with pytest.raises(CorruptImage, match="IDAT"):
        prep.prepare(bytes(damaged))


def test_png_with_bad_ihdr_crc(prep: ImagePreprocessor, good_png: bytes) -> None:
    damaged = bytearray(good_png)
    damaged[29] ^= 0x01  # IHDR's CRC is bytes 29-32
    with pytest.raises(CorruptImage):
        prep.prepare(bytes(damaged))


def test_png_with_bad_ancillary_crc_is_tolerated(prep: ImagePreprocessor) -> None:
    """Like libpng, only critical chunks must be intact; a damaged text chunk after IDAT is not."""
    data = png_bytes(Image.fromarray(random_photo(40, 50)))
    text = png_chunk(b"tEXt", b"Comment\x00hello")
    damaged_text = text[:-1] + bytes([text[-1] ^ 0xFF])
    iend = data.rindex(b"IEND") - 4
    assert_model_input(prep.prepare(data[:iend] + damaged_text + data[iend:]))


@pytest.mark.parametrize(
    ("width", "height"),
    [(100_000, 100_000), (65_535, 65_535), (2**31 - 1, 2**31 - 1), (8_000, 6_000), (40_001, 1_000)],
)
def test_png_declaring_huge_dimensions(prep: ImagePreprocessor, width: int, height: int) -> None:
    """Refused from the header alone: the body is ~60 bytes, so decoding would fail otherwise."""
    with pytest.raises(ImageTooLarge):
        prep.prepare(png_header_only(width, height))


def test_png_huge_dimensions_refused_before_decoding(prep: ImagePreprocessor) -> None:
    """8000x6000 is under Pillow's own bomb limit, so only our header check can refuse it."""
    with pytest.raises(ImageTooLarge, match=r"8000x6000.*limit is 40000000"):
        prep.prepare(png_header_only(8_000, 6_000))


@pytest.mark.parametrize(("width", "height"), [(60_000, 60_000), (7_000, 7_000), (65_535, 700)])
def test_jpeg_declaring_huge_dimensions(
    prep: ImagePreprocessor, good_jpeg: bytes, width: int, height: int
) -> None:
    with pytest.raises(ImageTooLarge):
        prep.prepare(with_jpeg_size(good_jpeg, width, height))


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_pixel_limit_boundary(fmt: str) -> None:
    photo = random_photo(100, 100)
    data = jpeg_bytes(photo) if fmt == "jpeg" else png_bytes(Image.fromarray(photo))
    result = ImagePreprocessor(SIZE, max_pixels=100 * 100).prepare(data)
    assert_model_input(result)
    assert (result.width, result.height) == (100, 100)
    with pytest.raises(ImageTooLarge, match="100x100"):
        ImagePreprocessor(SIZE, max_pixels=100 * 100 - 1).prepare(data)


def test_pixel_limit_is_ours_not_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_pixels above Pillow's MAX_IMAGE_PIXELS must hold: Pillow's warning is not a refusal.

    (The pipeline used to escalate DecompressionBombWarning to an error, capping every
    configured limit at Pillow's ~89.5 MP.) Above twice Pillow's limit Pillow refuses outright.
    """
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    generous = ImagePreprocessor(SIZE, max_pixels=MAX_PIXELS)
    data = png_bytes(Image.fromarray(random_photo(80, 100)))  # 8000 px: warns, under 2x
    with pytest.warns(Image.DecompressionBombWarning):
        assert_model_input(generous.prepare(data))
    with pytest.raises(ImageTooLarge):
        generous.prepare(png_bytes(Image.fromarray(random_photo(200, 200))))  # over 2x


_FUZZ_PHOTO = random_photo(40, 56, seed=11)


def _fuzz_seeds() -> list[bytes]:
    rgb = Image.fromarray(_FUZZ_PHOTO)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return [
        jpeg_bytes(_FUZZ_PHOTO),
        jpeg_bytes(_FUZZ_PHOTO, progressive=True),
        jpeg_bytes(_FUZZ_PHOTO[:, :, 0].copy()),
        encode(rgb, "JPEG", exif=exif),
        encode(rgb.convert("CMYK"), "JPEG"),
        png_bytes(rgb),
        png_bytes(rgb.convert("P")),
        png_bytes(rgb.convert("RGBA")),
        png_bytes(Image.fromarray(_FUZZ_PHOTO[:, :, 0].astype(np.uint16) * 257)),
    ]


_FUZZ_SEEDS = _fuzz_seeds()
_EDIT = st.tuples(
    st.sampled_from(["flip", "set", "cut", "insert", "delete"]),
    st.integers(min_value=0, max_value=2**32),
    st.integers(min_value=0, max_value=255),
)


def _mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, where, value in edits:
        if not out:
            break
        at = where % len(out)
        if op == "flip":
            out[at] ^= 1 << (value % 8)
        elif op == "set":
            out[at] = value
        elif op == "cut":
            del out[max(1, at) :]
        elif op == "insert":
            out[at:at] = bytes([value]) * (1 + value % 7)
        else:
            del out[at : at + 1 + value % 7]
    return bytes(out)


@settings(
    max_examples=250,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(min_value=0, max_value=len(_FUZZ_SEEDS) - 1),
    edits=st.lists(_EDIT, min_size=1, max_size=6),
    dct_scaling=st.booleans(),
)
def test_mutated_images_fail_cleanly_or_decode(
    seed: int, edits: list[tuple[str, int, int]], dct_scaling: bool
) -> None:
    data = _mutate(_FUZZ_SEEDS[seed], edits)
    try:
        result = ImagePreprocessor(SIZE, MAX_PIXELS, dct_scaling).prepare(data)
    except ImageError:
        return
    assert_model_input(result)
    assert result.format is sniff_format(data)


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(
    magic=st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"]),
    tail=st.binary(max_size=300),
)
def test_arbitrary_bytes_only_raise_image_errors(magic: bytes, tail: bytes) -> None:
    try:
        result = ImagePreprocessor(SIZE, MAX_PIXELS).prepare(magic + tail)
    except ImageError:
        return
    assert_model_input(result)


# --- EXIF orientation ------------------------------------------------------------------------

# Strongly asymmetric: all eight orientations of it differ by far more than the tolerance.
_ORIENT_PHOTO = random_photo(96, 128, seed=5)
_ORIENT_TOLERANCE = 2.0  # ours (fast IDCT) vs Pillow's decode (accurate IDCT): ~0.4 measured
_WRONG_ORIENTATION_MINIMUM = 10.0  # any other orientation is this far off


def _oriented_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(Image.fromarray(_ORIENT_PHOTO), "JPEG", quality=95, exif=exif)


def _pillow_reference(
    data: bytes, size: tuple[int, int], orientation: int | None = None
) -> np.ndarray:
    """Pillow decode, exif_transpose (optionally as if tagged `orientation`), then resize."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if orientation is not None:
            image.getexif()[ORIENTATION] = orientation
        upright = ImageOps.exif_transpose(image).convert("RGB")
        return resized(np.asarray(upright), size)


@pytest.mark.parametrize("size", [(224, 224), (160, 224), (224, 160)])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation: int, size: tuple[int, int]) -> None:
    data = _oriented_jpeg(orientation)
    for dct_scaling in (False, True):  # 128x96 is too small to be DCT-scaled, but make sure
        result = ImagePreprocessor(size, MAX_PIXELS, dct_scaling).prepare(data)
        assert_model_input(result, size)
        assert (result.width, result.height) == (128, 96)  # as stored, before orientation
        diffs = {
            other: mad(result.pixels, _pillow_reference(data, size, other)) for other in range(1, 9)
        }
        assert diffs[orientation] < _ORIENT_TOLERANCE, diffs
        for other, diff in diffs.items():
            if other != orientation:
                assert diff > _WRONG_ORIENTATION_MINIMUM, (other, diffs)


def test_large_dct_scaled_jpeg_is_oriented(prep: ImagePreprocessor) -> None:
    """A phone-sized portrait (stored landscape, orientation 6) that does get DCT-scaled."""
    photo = cv2.resize(_ORIENT_PHOTO, (1600, 1200), interpolation=cv2.INTER_CUBIC)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    data = encode(Image.fromarray(photo), "JPEG", quality=92, exif=exif)
    ours = ImagePreprocessor((160, 224), MAX_PIXELS, dct_scaling=True).prepare(data)
    assert_model_input(ours, (160, 224))
    expected = _pillow_reference(data, (160, 224))
    assert mad(ours.pixels, expected) < _ORIENT_TOLERANCE
    assert mad(ours.pixels, _pillow_reference(data, (160, 224), 8)) > _WRONG_ORIENTATION_MINIMUM


@pytest.mark.parametrize("orientation", [3, 6, 7])
def test_png_exif_orientation(prep: ImagePreprocessor, orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = encode(Image.fromarray(_ORIENT_PHOTO), "PNG", exif=exif)
    result = prep.prepare(data)
    assert_model_input(result)
    # Lossless: resize-then-orient equals orient-then-resize up to cv2's fixed-point rounding.
    assert mad(result.pixels, _pillow_reference(data, SIZE)) < 0.5
    assert mad(result.pixels, resized(_ORIENT_PHOTO)) > _WRONG_ORIENTATION_MINIMUM


@pytest.mark.parametrize(
    "exif",
    [
        exif_bytes(3, 1, struct.pack("<HH", 0, 0)),  # orientation 0
        exif_bytes(3, 1, struct.pack("<HH", 9, 0)),  # orientation 9
        exif_bytes(3, 1, struct.pack("<HH", 60_000, 0)),
        exif_bytes(2, 4, b"abc\x00"),  # ASCII
        exif_bytes(7, 4, b"\x06\x00\x00\x00"),  # UNDEFINED bytes
        exif_bytes(3, 100, struct.pack("<I", 99_999)),  # points past the end
        b"Exif\x00\x00MM\x00*garbagegarbage",
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff",
    ],
    ids=["zero", "nine", "60000", "ascii", "undefined", "past-end", "garbage", "short-ifd"],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data" warnings
def test_malformed_orientation_is_ignored(prep: ImagePreprocessor, exif: bytes) -> None:
    """Broken metadata must not reject pixels that decode fine (used to be CorruptImage)."""
    plain = encode(Image.fromarray(_ORIENT_PHOTO), "JPEG", quality=95)
    tagged = encode(Image.fromarray(_ORIENT_PHOTO), "JPEG", quality=95, exif=exif)
    assert tagged != plain
    np.testing.assert_array_equal(prep.prepare(tagged).pixels, prep.prepare(plain).pixels)


# --- modes -----------------------------------------------------------------------------------


def _stripes() -> np.ndarray:
    """Four vertical colour bands, 224x224, so no resizing happens and values are exact."""
    image = np.zeros((224, 224, 3), np.uint8)
    for band, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (40, 80, 120)]):
        image[:, band * 56 : (band + 1) * 56] = colour
    return image


def test_grayscale_jpeg(prep: ImagePreprocessor) -> None:
    gray = random_photo(300, 400, seed=8)[:, :, 1].copy()
    result = prep.prepare(jpeg_bytes(gray, quality=95))
    assert_model_input(result)
    assert (result.width, result.height) == (400, 300)
    np.testing.assert_array_equal(result.pixels[..., 0], result.pixels[..., 1])
    np.testing.assert_array_equal(result.pixels[..., 0], result.pixels[..., 2])
    assert mad(result.pixels[..., 0], resized(gray)) < 1.5


def test_cmyk_jpeg(prep: ImagePreprocessor) -> None:
    photo = random_photo(300, 400, seed=9)
    data = encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "CMYK"
    result = prep.prepare(data)
    assert_model_input(result)
    assert mad(result.pixels, resized(photo)) < 3.0


@pytest.mark.parametrize("dct_scaling", [False, True])
def test_progressive_jpeg(dct_scaling: bool) -> None:
    photo = cv2.resize(random_photo(300, 400, seed=10), (1024, 768))
    progressive = jpeg_bytes(photo, quality=95, progressive=True)
    baseline = jpeg_bytes(photo, quality=95)
    assert b"\xff\xc2" in progressive  # SOF2: really progressive
    preprocessor = ImagePreprocessor(SIZE, MAX_PIXELS, dct_scaling)
    result = preprocessor.prepare(progressive)
    assert_model_input(result)
    assert mad(result.pixels, preprocessor.prepare(baseline).pixels) < 0.5
    assert mad(result.pixels, resized(photo)) < 2.0


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_jpeg_chroma_subsampling(prep: ImagePreprocessor, subsampling: int) -> None:
    photo = random_photo(240, 320, seed=12)
    result = prep.prepare(jpeg_bytes(photo, quality=95, subsampling=subsampling))
    assert_model_input(result)
    assert mad(result.pixels, resized(photo)) < 2.0


def test_grayscale_png(prep: ImagePreprocessor) -> None:
    gray = random_photo(150, 200, seed=13)[:, :, 0].copy()
    result = prep.prepare(png_bytes(Image.fromarray(gray)))
    assert_model_input(result)
    expected = resized(np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(result.pixels, expected)


def test_one_bit_png(prep: ImagePreprocessor) -> None:
    bits = np.zeros((224, 224), bool)
    bits[:, 112:] = True
    data = png_bytes(Image.fromarray(bits))
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "1"
    result = prep.prepare(data)
    assert_model_input(result)
    assert (result.pixels[:, :112] == 0).all()
    assert (result.pixels[:, 112:] == 255).all()


def test_palette_png(prep: ImagePreprocessor) -> None:
    stripes = _stripes()
    image = Image.fromarray(stripes).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    data = png_bytes(image)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "P"
        assert "transparency" not in opened.info
    result = prep.prepare(data)
    assert_model_input(result)
    np.testing.assert_array_equal(result.pixels, stripes.astype(np.float32))


def test_palette_png_with_transparency(prep: ImagePreprocessor) -> None:
    indices = np.zeros((224, 224), np.uint8)
    indices[:, 112:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    data = encode(image, "PNG", transparency=0)  # index 0 (black) is fully transparent
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "P" and opened.info.get("transparency") == 0
    result = prep.prepare(data)
    assert_model_input(result)
    assert (result.pixels[:, :112] == 255).all()  # white, not the stored black
    assert (result.pixels[:, 112:] == np.array([200, 30, 10], np.float32)).all()


def test_rgb_png_with_transparent_colour(prep: ImagePreprocessor) -> None:
    stripes = _stripes()
    data = encode(Image.fromarray(stripes), "PNG", transparency=(0, 255, 0))
    result = prep.prepare(data)
    assert_model_input(result)
    assert (result.pixels[:, 56:112] == 255).all()  # the green band was transparent
    np.testing.assert_array_equal(result.pixels[:, :56], stripes[:, :56].astype(np.float32))


def test_rgba_png_composited_on_white(prep: ImagePreprocessor) -> None:
    rgba = np.zeros((224, 224, 4), np.uint8)
    rgba[:, :, :3] = (10, 20, 30)
    rgba[:, :75, 3] = 0  # fully transparent over black-ish pixels
    rgba[:, 75:150, 3] = 128  # half
    rgba[:, 150:, 3] = 255  # opaque
    result = prep.prepare(png_bytes(Image.fromarray(rgba)))
    assert_model_input(result)
    assert (result.pixels[:, :75] == 255).all()
    half = np.rint(np.array([10, 20, 30]) * 128 / 255 + 255 * 127 / 255)
    assert (result.pixels[:, 75:150] == half.astype(np.float32)).all()
    assert (result.pixels[:, 150:] == np.array([10, 20, 30], np.float32)).all()


def test_rgba_png_resized(prep: ImagePreprocessor) -> None:
    """Compositing happens before resizing: a transparent region far from edges stays white."""
    rgba = np.zeros((600, 800, 4), np.uint8)
    rgba[:, :, :3] = random_photo(600, 800, seed=14)
    rgba[:, 400:, 3] = 255
    result = prep.prepare(png_bytes(Image.fromarray(rgba)))
    assert_model_input(result)
    assert (result.pixels[:, :100] == 255).all()
    assert mad(result.pixels[:, 124:], resized(rgba[:, :, :3])[:, 124:]) < 0.01


def test_la_png(prep: ImagePreprocessor) -> None:
    la = np.zeros((224, 224, 2), np.uint8)
    la[:, :, 0] = 60
    la[:, 112:, 1] = 255
    image = Image.fromarray(la, mode="LA")
    data = png_bytes(image)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "LA"
    result = prep.prepare(data)
    assert_model_input(result)
    assert (result.pixels[:, :112] == 255).all()
    assert (result.pixels[:, 112:] == 60).all()


def test_sixteen_bit_grayscale_png(prep: ImagePreprocessor) -> None:
    values = np.zeros((224, 224), np.uint16)
    values[:50] = 65535
    values[50:100] = 32896  # 128 * 257
    values[100:150] = 257 * 77
    values[150:200] = 128  # 128/257 = 0.498 -> 0
    values[200:] = 129  # 129/257 = 0.502 -> 1
    ok, encoded = cv2.imencode(".png", values)
    assert ok
    data = encoded.tobytes()
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode in ("I;16", "I;16B", "I")
    result = prep.prepare(data)
    assert_model_input(result)
    expected = [(0, 50, 255), (50, 100, 128), (100, 150, 77), (150, 200, 0), (200, 224, 1)]
    for top, bottom, value in expected:
        assert (result.pixels[top:bottom] == value).all(), (top, value)


def test_sixteen_bit_grayscale_ramp(prep: ImagePreprocessor) -> None:
    ramp = np.repeat((np.arange(224, dtype=np.uint16) * 257)[:, None], 224, axis=1)
    result = prep.prepare(png_bytes(Image.fromarray(ramp)))
    assert_model_input(result)
    expected = np.repeat(np.arange(224, dtype=np.float32)[:, None], 224, axis=1)
    np.testing.assert_array_equal(result.pixels[:, :, 0], expected)


def test_sixteen_bit_rgb_png(prep: ImagePreprocessor) -> None:
    bgr = np.zeros((224, 224, 3), np.uint16)
    bgr[..., 2] = 65535  # red
    bgr[..., 1] = 32896  # green: 0x8080
    bgr[..., 0] = 0x1AFF  # blue: 6911 -> 26.9 (the high byte 0x1A = 26)
    ok, encoded = cv2.imencode(".png", bgr)
    assert ok
    assert encoded.tobytes()[24] == 16  # IHDR bit depth
    result = prep.prepare(encoded.tobytes())
    assert_model_input(result)
    red, green, blue = (result.pixels[..., channel] for channel in range(3))
    assert (red == 255).all()
    assert (green == 128).all()
    assert np.isin(blue, (26, 27)).all()  # Pillow keeps the high byte; rounding would give 27


def test_sixteen_bit_rgba_png(prep: ImagePreprocessor) -> None:
    bgra = np.zeros((224, 224, 4), np.uint16)
    bgra[..., 1] = 65535
    bgra[:, 112:, 3] = 65535  # left half transparent
    ok, encoded = cv2.imencode(".png", bgra)
    assert ok
    result = prep.prepare(encoded.tobytes())
    assert_model_input(result)
    assert (result.pixels[:, :112] == 255).all()
    assert (result.pixels[:, 112:] == np.array([0, 255, 0], np.float32)).all()


def test_animated_png_uses_first_frame(prep: ImagePreprocessor) -> None:
    frames = [Image.new("RGB", (224, 224), colour) for colour in ((200, 0, 0), (0, 200, 0))]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    assert b"acTL" in data and b"fdAT" in data
    with Image.open(io.BytesIO(data)) as opened:
        assert getattr(opened, "n_frames", 1) == 2
    result = prep.prepare(data)
    assert_model_input(result)
    assert (result.pixels == np.array([200, 0, 0], np.float32)).all()


@pytest.mark.parametrize(
    ("size", "stored", "decoded"),
    [
        ((224, 224), (1024, 768), (1024, 768)),  # 1/2 would give 384 rows < 448
        ((224, 224), (2000, 1788), (1000, 894)),  # 1/4 would give 447 rows
        ((224, 224), (2000, 1789), (500, 448)),  # 1/4 gives exactly 448 (rounded up)
        ((224, 224), (4032, 3024), (1008, 756)),
        ((160, 224), (2000, 1789), (500, 448)),  # the larger target side governs both axes
        ((224, 160), (1600, 1200), (800, 600)),
        ((224, 224), (4000, 300), (4000, 300)),  # panorama: any scale would drop the short side
    ],
)
def test_dct_scale_choice(
    monkeypatch: pytest.MonkeyPatch,
    size: tuple[int, int],
    stored: tuple[int, int],
    decoded: tuple[int, int],
) -> None:
    """Only 1/2, 1/4, 1/8 (the fast ones), and only while the decode stays >= 2x the target."""
    import simplejpeg

    decode = simplejpeg.decode_jpeg
    shapes: list[tuple[int, ...]] = []

    def recording(*args: Any, **kwargs: Any) -> np.ndarray:
        out = decode(*args, **kwargs)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(simplejpeg, "decode_jpeg", recording)
    width, height = stored
    data = jpeg_bytes(np.full((height, width, 3), 90, np.uint8))
    for dct_scaling, expected in ((True, decoded), (False, stored)):
        shapes.clear()
        result = ImagePreprocessor(size, MAX_PIXELS, dct_scaling).prepare(data)
        assert_model_input(result, size)
        assert shapes == [(expected[1], expected[0], 3)]
        assert np.abs(result.pixels - 90).max() <= 2


@pytest.mark.parametrize(("width", "height"), [(1, 1), (1, 500), (500, 1), (3, 2)])
def test_tiny_and_extreme_aspect_images(prep: ImagePreprocessor, width: int, height: int) -> None:
    photo = random_photo(height, width)[:height, :width]
    for data in (jpeg_bytes(photo), png_bytes(Image.fromarray(photo))):
        result = prep.prepare(data)
        assert_model_input(result)
        assert (result.width, result.height) == (width, height)


def test_output_is_a_fresh_writable_array(prep: ImagePreprocessor) -> None:
    data = jpeg_bytes(random_photo(224, 224))  # already model-sized: no resize step
    first = prep.prepare(data)
    assert first.pixels.flags.c_contiguous and first.pixels.flags.writeable
    first.pixels[:] = 0
    assert prep.prepare(data).pixels.max() > 0


# --- parity with the training path (TensorFlow) ----------------------------------------------

_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")

# Worst mean |ours - TF| over the five photos (0-255 scale), JPEG quality 90, as measured with
# TF 2.21 / simplejpeg 1.9 / opencv 5.0:
#
#   size        dct_scaling=False   dct_scaling=True (decoded at)
#   640x480     0.26                0.26  (not scaled)
#   1024x768    0.27                0.27  (not scaled: 1/2 would be under 2x224)
#   1600x1200   0.26                1.14  (1/2 -> 800x600)
#   4032x3024   0.24                1.39  (1/4 -> 1008x756)
#
# Without DCT scaling the decode is bit-identical to TF's (both libjpeg-turbo, fast integer IDCT,
# fancy upsampling); what is left is cv2 rounding its bilinear result to uint8 (~0.25). Switching
# to the accurate IDCT alone would cost ~0.5 (libjpeg-turbo's fast IDCT reads ~0.49 darker), so
# the first bound also pins the decoder settings. With DCT scaling libjpeg-turbo uses its
# accurate scaled IDCTs (so the ~0.5 brightness offset comes back) and the reduced decode
# low-passes what TF's unantialiased resize aliases; that is the rest of the gap. (When any
# M/8 scale was allowed, 1024x768 decoded at 5/8 and 1600x1200 at 3/8: 1.50 and 1.83.)
_NO_DCT_BOUND = 0.35
_DCT_BOUNDS = {(640, 480): 0.35, (1024, 768): 0.35, (1600, 1200): 1.4, (4032, 3024): 1.7}


@pytest.fixture(scope="module")
def tf() -> Any:
    return require_import(
        "tensorflow", "TensorFlow (the training-path reference) is not importable"
    )


@functools.cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)())


@functools.lru_cache(maxsize=4)
def _photo_jpegs(width: int, height: int) -> tuple[bytes, ...]:
    return tuple(
        jpeg_bytes(cv2.resize(_photo(name), (width, height), interpolation=cv2.INTER_CUBIC), 90)
        for name in _PHOTOS
    )


def _tf_reference(tf: Any, data: bytes, png: bool = False) -> np.ndarray:
    decode = tf.io.decode_png if png else tf.io.decode_jpeg
    return tf.image.resize(decode(data, channels=3), SIZE, method="bilinear").numpy()


@pytest.mark.parametrize(("width", "height"), list(_DCT_BOUNDS))
def test_jpeg_parity_with_training_path(tf: Any, width: int, height: int) -> None:
    exact = ImagePreprocessor(SIZE, MAX_PIXELS, dct_scaling=False)
    scaled = ImagePreprocessor(SIZE, MAX_PIXELS, dct_scaling=True)
    measured: dict[str, tuple[float, float]] = {}
    for name, data in zip(_PHOTOS, _photo_jpegs(width, height), strict=True):
        reference = _tf_reference(tf, data)
        ours_exact, ours_scaled = exact.prepare(data), scaled.prepare(data)
        assert (ours_exact.width, ours_exact.height) == (width, height)
        assert_model_input(ours_scaled)
        measured[name] = (mad(ours_exact.pixels, reference), mad(ours_scaled.pixels, reference))
        # Per pixel, the exact path differs from TF by uint8 rounding (plus cv2's fixed point).
        assert np.abs(ours_exact.pixels - reference).max() <= 1.0, name
    assert max(exact for exact, _ in measured.values()) <= _NO_DCT_BOUND, measured
    assert max(scaled for _, scaled in measured.values()) <= _DCT_BOUNDS[width, height], measured


@pytest.mark.parametrize("mode", ["RGB", "L", "P"])
def test_png_parity_with_training_path(tf: Any, prep: ImagePreprocessor, mode: str) -> None:
    """Lossless input, so only cv2's uint8 rounding separates us (0.20-0.26 measured for RGB)."""
    for name in _PHOTOS:
        image = Image.fromarray(cv2.resize(_photo(name), (640, 480))).convert(mode)
        data = png_bytes(image)
        ours = prep.prepare(data).pixels
        reference = _tf_reference(tf, data, png=True)
        assert mad(ours, reference) <= _NO_DCT_BOUND, (name, mad(ours, reference))
        assert np.abs(ours - reference).max() <= 1.0, name
