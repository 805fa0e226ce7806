"""The hostile-image corpus (tests/data/hostile, built by fuzz/make_hostile.py) and the fuzzer.

Every file goes through the HTTP API of a real server process and gets its documented status
(200 valid odd formats, 400 corrupt or mislabelled, 413 bombs), never a 500; the server keeps
serving afterwards. The same files, and the fuzzer's seed corpus, go through the preprocessor
directly; and the atheris harness runs briefly, so CI proves it still works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from rottenbot_inference.inference.images import ImageError, ImagePreprocessor, ImageTooLarge
from tests.helpers import TEST_SECRET, auth, jpeg_bytes, random_photo, running_server

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = ROOT / "tests" / "data" / "hostile"
SEEDS = ROOT / "fuzz" / "seeds"
MANIFEST: dict[str, dict] = json.loads((HOSTILE / "manifest.json").read_text())
PREDICT = "/api/v1/inference/predict"
SIZE = (224, 224)
MAX_PIXELS = 40_000_000  # the default MAX_IMAGE_PIXELS


@pytest.fixture(scope="module")
def server(tiny_model: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("hostile-images")
    env = {
        "MODEL_PATH": str(tiny_model),
        "MODEL_CACHE_DIR": str(shared_cache),
        "DATA_DIR": str(folder / "data"),
        "JWT_SECRET": TEST_SECRET,
        "MODEL_POLL_INTERVAL_S": "0",
    }
    with running_server(env, folder / "server.log") as base_url:
        yield base_url


def test_the_corpus_covers_the_issue() -> None:
    names = set(MANIFEST)
    for required in (
        "truncated-half.jpg", "truncated-idat.png", "gif-declared-jpeg.jpg",
        "bomb-65535x65535.png", "bomb-65535x65535.jpg", "enormous-chunk-length.png",
        "progressive.jpg", "cmyk.jpg", "gray-16bit.png", "rgb-16bit.png", "animated.png",
        "exif-loop.jpg", "bomb-400-scans.jpg",
    ):
        assert required in names
    if os.environ.get("CI"):
        assert "arithmetic.jpg" in names  # committed: generated with cjpeg -arithmetic
    assert {entry["status"] for entry in MANIFEST.values()} == {200, 400, 413}
    assert all((HOSTILE / name).stat().st_size < 200_000 for name in names)  # bombs stay tiny


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_hostile_file_through_the_api(server: str, name: str) -> None:
    entry = MANIFEST[name]
    response = httpx.post(
        f"{server}{PREDICT}",
        files={"file": (name, (HOSTILE / name).read_bytes(), entry["content_type"])},
        headers=auth(),
        timeout=120,
    )
    assert response.status_code == entry["status"], (entry["why"], response.text)
    body = response.json()
    if entry["status"] == 200:
        assert 0.0 <= body["confidence"] <= 1.0
    else:
        assert body["detail"]


def test_server_keeps_serving_after_the_corpus(server: str) -> None:
    response = httpx.post(
        f"{server}{PREDICT}",
        files={"file": ("ok.jpg", jpeg_bytes(random_photo()), "image/jpeg")},
        headers=auth(),
        timeout=60,
    )
    assert response.status_code == 200
    assert httpx.get(f"{server}/health/ready").status_code == 200


@pytest.fixture(scope="module")
def prep() -> ImagePreprocessor:
    return ImagePreprocessor(SIZE, MAX_PIXELS)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_hostile_file_through_the_preprocessor(prep: ImagePreprocessor, name: str) -> None:
    status = MANIFEST[name]["status"]
    data = (HOSTILE / name).read_bytes()
    if status == 200:
        pixels = prep.prepare(data).pixels
        assert pixels.shape == (*SIZE, 3) and pixels.dtype == np.float32
        assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 255
    elif status == 413:
        with pytest.raises(ImageTooLarge):
            prep.prepare(data)
    else:
        with pytest.raises(ImageError) as caught:
            prep.prepare(data)
        assert not isinstance(caught.value, ImageTooLarge)


@pytest.mark.parametrize("name", sorted(path.name for path in SEEDS.iterdir()))
def test_fuzz_seeds_decode(prep: ImagePreprocessor, name: str) -> None:
    assert prep.prepare((SEEDS / name).read_bytes()).pixels.shape == (*SIZE, 3)


def test_scan_limit_counts_only_real_scans(prep: ImagePreprocessor) -> None:
    """A progressive photo (10 scans) carrying JPEGs in a metadata segment is no bomb."""
    embedded = jpeg_bytes(random_photo(16, 16), progressive=True) * 4  # 40 more FF DA bytes
    segment = b"\xff\xef" + (len(embedded) + 2).to_bytes(2, "big") + embedded  # APP15
    photo = jpeg_bytes(random_photo(), progressive=True)
    data = photo[:2] + segment + photo[2:]
    assert data.count(b"\xff\xda") > 32
    assert prep.prepare(data).pixels.shape == (*SIZE, 3)


def test_atheris_harness_runs(tmp_path: Path) -> None:
    """A short libFuzzer run of fuzz/fuzz_images.py over the seeds finds nothing."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_images.py"), str(tmp_path), str(SEEDS),
         "-runs=2000", "-timeout=30", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 2000 runs" in result.stderr
