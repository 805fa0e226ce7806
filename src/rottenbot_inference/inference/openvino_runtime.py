"""OpenVINO as a model runtime: the verified ONNX conversion compiled for the CPU.

Compiled once, for a static batch of 1: a dynamic batch dimension measured ~15 % slower per
image, and a second static shape for full batches (~10 % less CPU per image at batch 4-8) cost
~70 MB of memory and another compile, so a batch runs as one call per image. The compiled model
serves every inference thread: it has one stream per thread (`workers`) with `threads` threads
each, and each call borrows an infer request from a pool (a request is used by one thread at a
time; the pool grows when more threads call at once than it holds).

OpenVINO picks bf16 by itself on CPUs with native bf16, so the precision is always asked for
explicitly (INFERENCE_PRECISION_HINT) and the one it compiled to is reported (on a CPU without
bf16 a bf16 request compiles to f32).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import openvino as ov

from rottenbot_inference.inference.runtime import nhwc_shape

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
_HINTS: dict[str, str] = {"fp32": "f32", "bf16": "bf16"}
_REPORTED = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}

_core: ov.Core | None = None


def core() -> ov.Core:
    """The process's one OpenVINO Core (creating one costs time; compiled models share it)."""
    global _core
    if _core is None:
        _core = ov.Core()
        # Cached blobs are read, not mapped: a blob another process is still writing (or one a
        # crash cut short) then fails to import and is compiled afresh, instead of SIGBUS.
        _core.set_property({"ENABLE_MMAP": False})
    return _core


@contextlib.contextmanager
def _compile_lock(cache_dir: Path | None) -> Iterator[None]:
    """Processes sharing a compiled-model cache (workers, replicas on one volume) compile one at
    a time: OpenVINO writes a cache blob in place, so a second process must not read it half
    written. The first writes it; the others then import the whole blob."""
    if cache_dir is None:
        yield
        return
    with (cache_dir / ".compile.lock").open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def cpu_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin says this CPU can compute natively (e.g. FP32, BF16, INT8)."""
    return tuple(str(item) for item in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVinoRuntime:
    """An ONNX model compiled by OpenVINO for the CPU at a given precision."""

    name = "openvino"

    def __init__(
        self,
        model: Path,
        threads: int,
        workers: int,
        precision: Precision,
        cache_dir: Path | None = None,
    ) -> None:
        started = time.perf_counter()
        source = core().read_model(str(model))
        self.input_shape = nhwc_shape(
            [dim.get_length() if dim.is_static else None for dim in source.inputs[0].partial_shape]
        )
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINTS[precision],
            "NUM_STREAMS": workers,
            "INFERENCE_NUM_THREADS": workers * threads,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,  # the decode threads share these cores
        }
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        source.reshape([1, *self.input_shape])
        with _compile_lock(cache_dir):
            self._compiled = compiled = core().compile_model(source, "CPU", config)
        hint = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.precision = _REPORTED.get(hint, hint)
        self.requested_precision = precision
        self._classes = int(compiled.outputs[0].get_partial_shape()[1].get_length())
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(workers):
            self._pool.put(compiled.create_infer_request())
        self.compile_s = time.perf_counter() - started
        self._settings = {
            "streams": workers,
            "threads_per_stream": threads,
            "batch_shapes": [1],
            "model_cache": str(cache_dir) if cache_dir is not None else None,
            "compile_s": round(self.compile_s, 3),
        }
        self.report: dict[str, Any] = {}

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            request = self._pool.get_nowait()
        except queue.Empty:  # more callers at once than streams (e.g. an explanation)
            request = self._compiled.create_infer_request()
        try:
            out = np.empty((batch.shape[0], self._classes), np.float32)
            for index in range(batch.shape[0]):
                request.infer({0: batch[index : index + 1]}, share_inputs=True)
                out[index] = request.get_output_tensor(0).data[0]
            return out
        finally:
            self._pool.put(request)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": ov.__version__.split("-")[0],
            "precision": self.precision,
            "requested_precision": self.requested_precision,
            **self._settings,
            **self.report,
        }


def _type_name(value: Any) -> str:
    """`f32` / `bf16` from an ov.Type (or its string)."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)
