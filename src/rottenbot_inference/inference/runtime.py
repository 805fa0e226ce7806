"""Model runtimes: a batch of NHWC float32 images in, a batch of class probabilities out.

ONNX Runtime and OpenVINO (openvino_runtime.py; chosen by runtime_select.py) serve the
verified ONNX conversion; Keras is the loud fallback when a model cannot be converted
faithfully. The batcher's inference threads may call `run` concurrently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort


class Runtime(Protocol):
    """What the batcher needs from a model runtime."""

    name: str
    precision: str  # what the model computes in: "fp32" or "bf16"
    input_shape: tuple[int, int, int]  # height, width, channels
    report: dict[str, Any]  # how it was chosen (runtime_select.py), shown by describe()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, C) float32 -> (N, classes) float32 probabilities."""
        ...

    def describe(self) -> dict[str, Any]:
        """Runtime name, version and settings, for the model endpoint."""
        ...


class OnnxRuntime:
    """An ONNX Runtime CPU session with thread counts set from the CPU quota."""

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, model: Path | bytes, threads: int, spin: bool = False) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers would steal the cores the image decoders need between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        source = str(model) if isinstance(model, Path) else model
        self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        self.input_shape = nhwc_shape(model_input.shape)
        self._settings = {"intra_op_threads": threads, "inter_op_threads": 1, "spinning": spin}
        self.report: dict[str, Any] = {}

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input_name: batch})[0]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": ort.__version__,
            "precision": self.precision,
            **self._settings,
            **self.report,
        }


class KerasRuntime:
    """Runs the Keras model itself through a compiled `tf.function` (slow; fallback only)."""

    name = "keras"
    precision = "fp32"

    def __init__(self, model: Any, threads: int) -> None:
        import tensorflow as tf

        self._tf_version = tf.__version__
        height, width, channels = (int(d) for d in model.input_shape[1:])
        self.input_shape = (height, width, channels)
        signature = [tf.TensorSpec((None, height, width, channels), tf.float32)]
        self._call = tf.function(lambda x: model(x, training=False), input_signature=signature)
        self._threads = threads
        self.report: dict[str, Any] = {}

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._call(batch).numpy().astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self._tf_version,
            "precision": self.precision,
            "threads": self._threads,
            **self.report,
        }


def nhwc_shape(shape: list[Any]) -> tuple[int, int, int]:
    """(batch, H, W, C) from an ONNX input shape; H, W and C must be fixed."""
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise ValueError(f"expected an NHWC image input with fixed H, W, C; got {shape}")
    if shape[3] != 3:
        raise ValueError(f"expected 3 colour channels last (NHWC); got {shape}")
    return int(shape[1]), int(shape[2]), int(shape[3])
