"""Build RottenBot's production architecture with random weights, for benchmarks and tests.

MobileNetV3Large (include_preprocessing=True, float32 RGB 0-255 NHWC 224x224x3) + global average
pooling + Dense(28, softmax), under the `mixed_float16` policy it was trained with, saved the
way MLflow's tensorflow flavor stores it: `<out>/MLmodel`, `<out>/data/model.keras`, plus
`<out>/index_to_class.json`.

Randomly initialised, the network outputs exactly 1/28 everywhere (activations vanish), so
`--calibrate` sets every batch-norm layer's statistics from a forward pass over real photographs
(scikit-image's sample images): outputs then differ per image, which agreement checks need.

    python scripts/build_production_model.py --out /tmp/prod --calibrate
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CLASS_NAMES = [
    f"{produce}__{state}"
    for produce in (
        "Apple", "Banana", "Bellpepper", "Carrot", "Cucumber", "Grape", "Guava", "Jujube",
        "Mango", "Orange", "Pomegranate", "Potato", "Strawberry", "Tomato",
    )
    for state in ("Healthy", "Rotten")
]

MLMODEL = """artifact_path: model
flavors:
  python_function:
    data: data
    loader_module: mlflow.tensorflow
    python_version: 3.11
  tensorflow:
    code: null
    data: data
    keras_version: {keras_version}
    model_type: keras
    save_format: keras
mlflow_version: 2.19.0
"""


def sample_photos(count: int = 16, size: int = 224) -> np.ndarray:
    """Real photographs (scikit-image samples), random crops resized to the model input."""
    import cv2
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        photo = sources[index % len(sources)]
        height, width = photo.shape[:2]
        crop = int(min(height, width) * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
        patch = photo[top : top + crop, left : left + crop]
        images.append(cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR))
    return np.stack(images).astype(np.float32)


def build(out: Path, calibrate: bool = False, seed: int = 0) -> Path:
    """Write the model directory and return it."""
    import keras

    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        base = keras.applications.MobileNetV3Large(
            input_shape=(224, 224, 3), include_top=False, weights=None,
            include_preprocessing=True,
        )
        pooled = keras.layers.GlobalAveragePooling2D()(base.output)
        outputs = keras.layers.Dense(len(CLASS_NAMES), activation="softmax", dtype="float32")(
            pooled
        )
        model = keras.Model(base.input, outputs, name="rottenbot_mobilenetv3large")
        if calibrate:
            _calibrate_batch_norm(model, sample_photos())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    (out / "data").mkdir(parents=True, exist_ok=True)
    model.save(out / "data" / "model.keras")
    (out / "MLmodel").write_text(MLMODEL.format(keras_version=keras.__version__))
    (out / "index_to_class.json").write_text(
        json.dumps({str(i): name for i, name in enumerate(CLASS_NAMES)}, indent=1)
    )
    return out


def _calibrate_batch_norm(model, images: np.ndarray) -> None:
    """Moving statistics := batch statistics of `images` (momentum 0, one training pass)."""
    import keras

    layers = [layer for layer in model._flatten_layers() if
              isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    # Spread the classifier so the softmax is not flat.
    dense = model.layers[-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * 20, bias])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibrate", action="store_true", help="set BN statistics")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out, args.calibrate, args.seed))


if __name__ == "__main__":
    main()
