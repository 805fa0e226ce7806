"""Keras -> ONNX conversion (needs TensorFlow; imported only when a conversion must run).

Two things matter here:
- Models trained under `mixed_float16` are rebuilt with a float32 policy before conversion, so
  the CPU graph computes in float32 (the variables are float32 in the file already).
- tf2onnx's transpose optimizer crashes on the `x + 3` of hard-swish (an `Add` whose constant
  is 0-d), logs "Failed to apply optimize_transpose" and keeps a graph with one NHWC<->NCHW
  `Transpose` pair per convolution (124 for MobileNetV3Large). `_scalar_add_fix` routes such
  `Add`s through the optimizer's generic broadcast handler instead; the graph keeps a single
  `Transpose` at the input.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ONNX_OPSET = 17


@dataclass(frozen=True)
class ConversionResult:
    onnx_bytes: bytes
    node_count: int
    transpose_count: int
    max_abs_diff: float


def _float32_config(config: Any) -> Any:
    """A Keras model config with every dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            return "float32"
        return {key: _float32_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_config(value) for value in config]
    if config in ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16"):
        return "float32"
    return config


def configure_tensorflow(threads: int) -> None:
    """Quiet TensorFlow and limit its threads (call before importing it)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised in this process
        pass


def load_keras_float32(path: Path) -> Any:
    """Load a `.keras` file so that it computes in float32, whatever policy it was trained in."""
    import keras

    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    model = keras.saving.deserialize_keras_object(_float32_config(config))
    model.load_weights(path)
    return model


@contextmanager
def _scalar_add_fix() -> Iterator[None]:
    from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

    original = TransposeOptimizer._add_handler

    def add_handler(self: Any, trans: Any, node: Any) -> Any:
        constant = node.inputs[1]
        if constant.is_const() and np.ndim(constant.get_tensor_value(as_list=False)) == 0:
            return self._handle_node_having_branches(trans, node)
        return original(self, trans, node)

    TransposeOptimizer._add_handler = add_handler
    try:
        yield
    finally:
        TransposeOptimizer._add_handler = original


def convert(model: Any) -> Any:
    """Convert a float32 Keras image model (NHWC input) to an ONNX ModelProto."""
    import tensorflow as tf
    import tf2onnx

    height, width, channels = (int(d) for d in model.input_shape[1:])
    signature = (tf.TensorSpec((None, height, width, channels), tf.float32, name="input"),)
    function = tf.function(lambda x: model(x, training=False))
    with _scalar_add_fix():
        proto, _ = tf2onnx.convert.from_function(
            function, input_signature=signature, opset=ONNX_OPSET
        )
    return proto


def probe_batch(shape: tuple[int, int, int], size: int = 4, seed: int = 0) -> np.ndarray:
    """Deterministic smooth probe images (gradients + noise) in the model's 0-255 range."""
    rng = np.random.default_rng(seed)
    height, width, channels = shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for _ in range(size):
        base = rng.uniform(0, 255, channels) + rng.uniform(-1, 1, channels) * xs[..., None]
        base = base + rng.uniform(-1, 1, channels) * ys[..., None]
        images.append(base + rng.normal(0, 20, (height, width, channels)))
    return np.clip(np.stack(images), 0, 255).astype(np.float32)


def convert_and_verify(model: Any, threads: int) -> ConversionResult:
    """Convert, then compare ONNX Runtime with Keras on a probe batch."""
    from rottenbot_inference.inference.runtime import OnnxRuntime

    proto = convert(model)
    onnx_bytes = proto.SerializeToString()
    ops = Counter(node.op_type for node in proto.graph.node)
    probe = probe_batch(tuple(int(d) for d in model.input_shape[1:]))
    expected = np.asarray(model(probe, training=False), dtype=np.float32)
    actual = OnnxRuntime(onnx_bytes, threads=threads).run(probe)
    diff = float(np.max(np.abs(expected - actual)))
    return ConversionResult(
        onnx_bytes=onnx_bytes,
        node_count=len(proto.graph.node),
        transpose_count=ops.get("Transpose", 0),
        max_abs_diff=diff,
    )
