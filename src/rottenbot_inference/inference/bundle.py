"""An immutable, warmed-up model: runtime + class names + version. Swapped as one reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rottenbot_inference.inference.runtime import Runtime


@dataclass(frozen=True)
class ModelBundle:
    name: str
    version: str
    source: str
    runtime: Runtime
    class_names: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())  # e.g. why the Keras fallback runs

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.runtime.input_shape

    @property
    def image_size(self) -> tuple[int, int]:
        height, width, _ = self.runtime.input_shape
        return height, width

    def predict(self, batch: np.ndarray) -> np.ndarray:
        probabilities = self.runtime.run(batch)
        if probabilities.shape != (batch.shape[0], len(self.class_names)):
            raise RuntimeError(
                f"model returned shape {probabilities.shape}, "
                f"expected ({batch.shape[0]}, {len(self.class_names)})"
            )
        return probabilities

    def warm_up(self, max_batch_size: int) -> None:
        """Run every batch size once so the first real requests pay no allocation cost."""
        for size in sorted({1, max_batch_size, *range(1, max_batch_size + 1)}):
            self.predict(np.zeros((size, *self.input_shape), dtype=np.float32))

    def describe(self) -> dict[str, Any]:
        height, width, channels = self.input_shape
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "input_shape": [None, height, width, channels],
            "input_dtype": "float32",
            "input_range": [0, 255],
            "classes": list(self.class_names),
            "runtime": self.runtime.describe(),
            "notes": list(self.notes),
        }
