"""Do the heatmaps point at the rot? A pointing game against the generator's lesion masks.

On fresh rotten pictures (a seed never used to train the demo model), drawn at random sizes
and aspect ratios and sent through the serving path (JPEG 90, decode, resize to 224 x 224),
the centre of the highest cell of the service's default heatmap (the rotten class against the
same produce's healthy class) must lie on the lesion - or within 15 px of it at the
model's 224 px input, the usual pointing-game tolerance - in at least 80 % of the pictures,
with the default settings and the bundled demo model. A random heatmap on the same pictures
must score far lower (its hit rate is roughly the share of the picture near a lesion).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rottenbot_inference.demo.synthetic import CLASS_NAMES, render, render_with_lesion
from rottenbot_inference.inference.bundle import ModelBundle
from rottenbot_inference.inference.explain import (
    Heatmap,
    cell_edges,
    counterpart,
    occlusion_heatmap,
)
from rottenbot_inference.inference.images import ImagePreprocessor
from rottenbot_inference.inference.loader import ModelLoader, source_from_settings
from rottenbot_inference.settings import Settings
from tests.helpers import jpeg_bytes

SEED = 20261202  # fresh: training used 0 and 1, the accuracy test 20261129
PER_CLASS = 8  # x 14 rotten classes = 112 pictures
TOLERANCE_PX = 15  # at the model input (224 px)
ROTTEN = [index for index, name in enumerate(CLASS_NAMES) if name.endswith("__Rotten")]


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    settings = Settings(_env_file=None, data_dir=tmp_path_factory.mktemp("demo"))  # type: ignore[call-arg]
    return ModelLoader(settings).load(source_from_settings(settings))


def _pictures() -> list[tuple[int, bytes, np.ndarray]]:
    """(class, JPEG, lesion mask) for every fresh rotten picture."""
    out = []
    for class_index in ROTTEN:
        for item in range(PER_CLASS):
            rng = np.random.default_rng([SEED, class_index, item])
            height, width = int(rng.integers(200, 480)), int(rng.integers(200, 480))
            rgb, lesion = render_with_lesion(class_index, rng, (height, width))
            out.append((class_index, jpeg_bytes(rgb), lesion))
    return out


def _near_lesion(lesion: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The lesion at the model input's size, grown by the tolerance."""
    height, width = size
    small = cv2.resize(lesion.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * TOLERANCE_PX + 1,) * 2)
    return cv2.dilate(small, disc).astype(bool)


def _hit(grid: np.ndarray, near: np.ndarray) -> bool:
    """Does the centre of `grid`'s highest cell fall on `near`?"""
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    ys, xs = cell_edges(near.shape[0], grid.shape[0]), cell_edges(near.shape[1], grid.shape[1])
    return bool(near[(ys[row] + ys[row + 1]) // 2, (xs[col] + xs[col + 1]) // 2])


def test_render_with_lesion_draws_what_render_draws() -> None:
    for class_index in (CLASS_NAMES.index("Apple__Rotten"), CLASS_NAMES.index("Grape__Rotten")):
        rgb, lesion = render_with_lesion(class_index, np.random.default_rng([5, class_index]),
                                         (200, 300))
        assert np.array_equal(rgb, render(class_index, np.random.default_rng([5, class_index]),
                                          (200, 300)))
        assert lesion.shape == (200, 300) and lesion.dtype == bool
        assert 0 < lesion.mean() < 0.5
    healthy = CLASS_NAMES.index("Apple__Healthy")
    _, none = render_with_lesion(healthy, np.random.default_rng(1), (100, 100))
    assert not none.any()


def test_heatmap_maximum_points_at_the_lesion(demo_bundle: ModelBundle) -> None:
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    preprocessor = ImagePreprocessor(demo_bundle.image_size, max_pixels=defaults.max_image_pixels)
    random = np.random.default_rng(0)
    hits = random_hits = 0
    pictures = _pictures()
    for class_index, jpeg, lesion in pictures:
        pixels = preprocessor.prepare(jpeg).pixels
        heatmap: Heatmap = occlusion_heatmap(
            pixels, demo_bundle.predict, demo_bundle.class_names,
            defaults.explain_grid, defaults.explain_grid, defaults.explain_batch_size,
            class_index,  # the rot the picture shows, as a user would ask with class_name
            versus_counterpart=True,  # the service's default: against the healthy twin
        )
        assert heatmap.versus_name == CLASS_NAMES[class_index].replace("Rotten", "Healthy")
        near = _near_lesion(lesion, pixels.shape[:2])
        hits += _hit(heatmap.grid, near)
        random_hits += _hit(random.random(heatmap.grid.shape), near)
    rate, random_rate = hits / len(pictures), random_hits / len(pictures)
    print(f"pointing game on {len(pictures)} rotten pictures: heatmap {rate:.3f}, "
          f"random {random_rate:.3f}")
    assert rate >= 0.80
    assert random_rate <= rate / 3


def test_occlusion_finds_the_one_region_a_model_looks_at() -> None:
    """A toy model that only looks at one cell: the heatmap peaks there and is ~0 elsewhere;
    the work is done in batches of at most the batch size."""
    edges = cell_edges(224, 7)
    box = (slice(edges[2], edges[3]), slice(edges[4], edges[5]))  # row 2, column 4
    sizes: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        logit = batch[(slice(None), *box)].mean(axis=(1, 2, 3)) / 50
        return np.stack([1 / (1 + np.exp(-logit)), 1 / (1 + np.exp(logit))], axis=1)

    pixels = np.zeros((224, 224, 3), np.float32)
    pixels[box] = 255
    heatmap = occlusion_heatmap(pixels, predict, ("bright", "dark"), 7, 7, 8, None)
    assert heatmap.class_name == "bright" and heatmap.versus_name is None
    assert heatmap.passes == 50 == sum(sizes) and max(sizes) <= 8
    assert (int(np.argmax(heatmap.grid)) // 7, int(np.argmax(heatmap.grid)) % 7) == (2, 4)
    others = np.delete(heatmap.grid.ravel(), 2 * 7 + 4)
    assert heatmap.grid[2, 4] > 0.5 and np.abs(others).max() < 1e-6
    against = occlusion_heatmap(pixels, predict, ("bright", "dark"), 7, 7, 8, 0, 1)
    assert against.versus_name == "dark" and against.grid[2, 4] > heatmap.grid[2, 4]


def test_counterpart_is_the_same_produce_in_the_other_state() -> None:
    assert CLASS_NAMES[counterpart(CLASS_NAMES, CLASS_NAMES.index("Banana__Rotten"))] == (
        "Banana__Healthy"
    )
    assert CLASS_NAMES[counterpart(CLASS_NAMES, CLASS_NAMES.index("Apple__Healthy"))] == (
        "Apple__Rotten"
    )
    assert counterpart(("cat", "dog"), 0) is None
    assert counterpart(("Kiwi__Rotten", "Apple__Healthy"), 0) is None
