"""Train the bundled RottenBot demo model on synthetic produce pictures.

Usage::

    python -m rottenbot_inference.demo.train --out DIR --seed 0
    python -m rottenbot_inference.demo.train --evaluate DIR/model.keras --eval-seed 12345

The model has the same I/O contract as the production MobileNetV3 model: input
float32 RGB in 0..255, NHWC ``(None, 224, 224, 3)``; output ``(None, 28)``
float32 softmax. Scaling to 0..1 happens inside the model.

Training pictures go through the serving path: they are rendered at random
sizes and aspect ratios, JPEG-encoded at a random quality, decoded and resized
to 224x224 with OpenCV's bilinear interpolation (aspect ratio not kept).

The first two layers of the model (``Rescaling`` and a 2x2 ``AveragePooling2D``)
have no weights, so they are applied once to the training set with numpy and
the rest of the network trains on 112x112 arrays; the saved model contains
the full, flat layer stack.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from rottenbot_inference.demo.synthetic import CLASS_NAMES, render

INPUT_SIZE = 224
NUM_CLASSES = len(CLASS_NAMES)
RESIZERS = ("cv2", "pil", "tf")

# split ids keep training, validation and evaluation pictures apart for one seed
_SPLIT_TRAIN, _SPLIT_VAL, _SPLIT_EVAL = 0, 1, 2


# --------------------------------------------------------------------------
# data: synthetic pictures through the serving preprocessing
# --------------------------------------------------------------------------


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Encode an RGB picture as JPEG with OpenCV and decode it back to RGB."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_for_model(rgb: np.ndarray, method: str = "cv2") -> np.ndarray:
    """Resize to 224x224 (aspect ratio not kept) with OpenCV, PIL or TensorFlow bilinear."""
    if method == "cv2":
        out = cv2.resize(rgb, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
        return out.astype(np.float32)
    if method == "pil":
        from PIL import Image

        img = Image.fromarray(rgb).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.float32)
    if method == "tf":
        import tensorflow as tf

        out = tf.image.resize(rgb[None].astype(np.float32), (INPUT_SIZE, INPUT_SIZE), "bilinear")
        return out.numpy()[0]
    raise ValueError(f"unknown resize method {method!r}")


def _picture(seed: int, split: int, label: int, index: int) -> np.ndarray:
    """A JPEG-decoded picture of random size, as the service would receive it."""
    rng = np.random.default_rng([seed, split, label, index])
    h = int(rng.integers(160, 641))
    w = int(np.clip(round(h * math.exp(rng.uniform(-0.5, 0.5))), 160, 640))
    quality = int(rng.integers(70, 96))
    return jpeg_roundtrip(render(label, rng, (h, w)), quality)


def _train_sample(job: tuple[int, int, int, int]) -> np.ndarray:
    """Model-ready training array: 224 bilinear resize, then /255 and 2x2 average pooling."""
    x = resize_for_model(_picture(*job), "cv2") / 255.0
    half = INPUT_SIZE // 2
    return x.reshape(half, 2, half, 2, 3).mean(axis=(1, 3), dtype=np.float32)


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _parallel_map(
    fn: Callable[[tuple[int, int, int, int]], np.ndarray],
    jobs: Iterable[tuple[int, int, int, int]],
    workers: int,
) -> list[np.ndarray]:
    jobs = list(jobs)
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        return list(pool.map(fn, jobs, chunksize=16))


def make_pooled_set(
    seed: int, split: int, n_per_class: int, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled (112x112, 0..1) training arrays and labels."""
    jobs = [(seed, split, c, i) for c in range(NUM_CLASSES) for i in range(n_per_class)]
    x = np.stack(_parallel_map(_train_sample, jobs, workers))
    y = np.array([c for _, _, c, _ in jobs], dtype=np.int32)
    return x, y


def make_eval_pictures(
    seed: int, n_per_class: int, workers: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """JPEG-decoded held-out pictures at their original (random) sizes, and labels."""
    jobs = [(seed, _SPLIT_EVAL, c, i) for c in range(NUM_CLASSES) for i in range(n_per_class)]
    pictures = _parallel_map(_picture_job, jobs, workers)
    return pictures, np.array([c for _, _, c, _ in jobs], dtype=np.int32)


def _picture_job(job: tuple[int, int, int, int]) -> np.ndarray:
    return _picture(*job)


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------


def _trunk_layers(keras: Any) -> list[Any]:
    """The trainable part of the network, applied to 112x112 inputs in 0..1."""
    layers = keras.layers
    out: list[Any] = []

    def conv(filters: int, strides: int, bn: bool = True) -> None:
        out.append(layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=not bn))
        if bn:
            out.append(layers.BatchNormalization())
        out.append(layers.ReLU())

    conv(16, 2, bn=False)  # 56x56
    conv(32, 2)  # 28x28
    out.append(layers.MaxPooling2D(2))  # 14x14
    conv(64, 1)
    conv(96, 1)
    out.append(layers.MaxPooling2D(2))  # 7x7
    conv(160, 1)
    out += [
        layers.GlobalAveragePooling2D(),
        layers.Dropout(0.2),
        layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities"),
    ]
    return out


def build_models(keras: Any) -> tuple[Any, Any]:
    """(training model on 112x112 pooled inputs, serving model on 224x224 0..255 inputs).

    Both share the same trainable layer objects.
    """
    trunk = _trunk_layers(keras)

    def apply(x: Any) -> Any:
        for layer in trunk:
            x = layer(x)
        return x

    half = INPUT_SIZE // 2
    small_in = keras.Input((half, half, 3), name="pooled")
    train_model = keras.Model(small_in, apply(small_in), name="rottenbot_demo_trunk")
    image = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="image", dtype="float32")
    x = keras.layers.Rescaling(1.0 / 255.0)(image)
    x = keras.layers.AveragePooling2D(2)(x)
    serve_model = keras.Model(image, apply(x), name="rottenbot_demo")
    return train_model, serve_model


# --------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------


def train(
    out: Path,
    seed: int = 0,
    n_per_class: int = 220,
    val_per_class: int = 5,
    epochs: int = 20,
    batch_size: int = 64,
    workers: int | None = None,
) -> dict[str, float]:
    """Generate data, train, save ``model.keras`` and ``index_to_class.json`` into ``out``."""
    workers = workers or os.cpu_count() or 1
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    x_train, y_train = make_pooled_set(seed, _SPLIT_TRAIN, n_per_class, workers)
    x_val, y_val = make_pooled_set(seed, _SPLIT_VAL, val_per_class, workers)
    t_data = time.time() - t0
    print(f"generated {len(x_train)} training + {len(x_val)} validation pictures in {t_data:.0f}s")

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    train_model, serve_model = build_models(keras)
    steps = math.ceil(len(x_train) / batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=steps * epochs, alpha=0.02)
    train_model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    def augment(x: Any, y: Any) -> tuple[Any, Any]:
        x = tf.image.random_flip_left_right(x, seed=seed)
        x = tf.image.random_flip_up_down(x, seed=seed + 1)
        x = tf.image.random_brightness(x, 0.06, seed=seed + 2)
        x = tf.image.random_contrast(x, 0.85, 1.15, seed=seed + 3)
        return tf.clip_by_value(x, 0.0, 1.0), y

    ds = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .map(augment, num_parallel_calls=1)
        .prefetch(2)
    )
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(256)
    t1 = time.time()
    train_model.fit(ds, epochs=epochs, validation_data=val_ds, verbose=2)
    t_train = time.time() - t1

    model_path = out / "model.keras"
    serve_model.save(model_path)
    (out / "index_to_class.json").write_text(
        json.dumps({str(i): name for i, name in enumerate(CLASS_NAMES)}, indent=2) + "\n"
    )
    # held-out check through the full serving model (JPEG -> cv2 resize -> 0..255 input)
    pictures, labels = make_eval_pictures(seed + 1, val_per_class, workers)
    acc = _accuracy(serve_model, pictures, labels, "cv2")
    stats = {
        "data_seconds": t_data,
        "train_seconds": t_train,
        "total_seconds": time.time() - t0,
        "model_bytes": float(model_path.stat().st_size),
        "heldout_accuracy": acc,
    }
    print(
        f"held-out accuracy (seed {seed + 1}, {len(labels)} pictures, cv2 resize): {acc:.4f}; "
        f"model {stats['model_bytes'] / 1e6:.2f} MB; data {t_data:.0f}s, "
        f"training {t_train:.0f}s, total {stats['total_seconds']:.0f}s"
    )
    return stats


def _accuracy(model: Any, pictures: list[np.ndarray], labels: np.ndarray, method: str) -> float:
    x = np.stack([resize_for_model(p, method) for p in pictures])
    probs = model.predict(x, batch_size=64, verbose=0)
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def evaluate(
    model_path: Path, seed: int, n_per_class: int = 20, workers: int | None = None
) -> dict[str, float]:
    """Top-1 accuracy of a saved model on fresh pictures, for each resize method."""
    workers = workers or os.cpu_count() or 1
    pictures, labels = make_eval_pictures(seed, n_per_class, workers)

    import keras
    import tensorflow as tf

    model = keras.models.load_model(model_path, compile=False)
    results = {m: _accuracy(model, pictures, labels, m) for m in RESIZERS}
    for m, acc in results.items():
        print(f"held-out top-1 ({len(labels)} pictures, seed {seed}, {m} resize): {acc:.4f}")

    x = resize_for_model(pictures[0], "cv2")[None]
    fn = tf.function(lambda t: model(t, training=False))
    fn(x)
    reps = 200
    t = time.perf_counter()
    for _ in range(reps):
        fn(x)
    results["latency_ms_batch1"] = (time.perf_counter() - t) / reps * 1e3
    xb = np.repeat(x, 32, axis=0)
    fn(xb)
    t = time.perf_counter()
    for _ in range(10):
        fn(xb)
    results["latency_ms_per_image_batch32"] = (time.perf_counter() - t) / (10 * 32) * 1e3
    print(
        f"Keras latency: {results['latency_ms_batch1']:.2f} ms (batch 1), "
        f"{results['latency_ms_per_image_batch32']:.2f} ms/image (batch 32); "
        f"model file {model_path.stat().st_size / 1e6:.2f} MB"
    )
    return results


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for model.keras and index_to_class.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=220, help="training pictures per class")
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="processes rendering pictures")
    p.add_argument("--evaluate", type=Path, help="only evaluate this saved model")
    p.add_argument("--eval-seed", type=int, default=12345)
    p.add_argument("--eval-per-class", type=int, default=20)
    args = p.parse_args(argv)
    if args.evaluate is not None:
        evaluate(args.evaluate, args.eval_seed, args.eval_per_class, args.workers)
        return
    if args.out is None:
        p.error("--out is required unless --evaluate is given")
    train(
        args.out,
        seed=args.seed,
        n_per_class=args.per_class,
        val_per_class=args.val_per_class,
        epochs=args.epochs,
        batch_size=args.batch_size,
        workers=args.workers,
    )


if __name__ == "__main__":
    main()
