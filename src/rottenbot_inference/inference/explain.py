"""Occlusion heatmaps: which parts of the picture the model's answer depends on.

Model-agnostic and forward-only: the model input is cut into a `rows` x `cols` grid; for each
cell, a copy of the input with that cell painted over in the picture's mean colour is run
through the model (in batches, through the same runtime as predictions). A cell's value is how
much hiding it lowers the explained class's log-probability:

    value(cell) = log p(class | picture) - log p(class | picture with the cell hidden)

Positive: the answer relies on what is in that cell; near 0: it does not; negative: what is in
the cell argues against the class. Cost: rows x cols + 1 model passes per explanation.

Only numpy here: scheduling (priority, concurrency, deadlines) is in `explainer.py`, the
picture overlay in `overlay.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

METHOD = "occlusion"
_FLOOR = 1e-7  # probabilities below this are taken as this (log of 0 is -inf)


@dataclass(frozen=True)
class Heatmap:
    """One explanation: the grid of log-probability drops, and for which class."""

    grid: np.ndarray  # float32 (rows, cols); see the module docstring
    class_index: int
    class_name: str
    probabilities: np.ndarray  # the unmasked picture's (classes,) probabilities
    passes: int  # model passes run (cells + 1)
    method: str = METHOD

    @property
    def rows(self) -> int:
        return int(self.grid.shape[0])

    @property
    def cols(self) -> int:
        return int(self.grid.shape[1])

    def peak(self) -> tuple[int, int]:
        """(row, col) of the largest value (the first one on ties)."""
        row, col = np.unravel_index(int(np.argmax(self.grid)), self.grid.shape)
        return int(row), int(col)


def cell_edges(size: int, cells: int) -> np.ndarray:
    """Pixel boundaries of `cells` near-equal cells along a side of `size` pixels."""
    return np.linspace(0, size, cells + 1).round().astype(np.int64)


def occluded_batches(
    pixels: np.ndarray, rows: int, cols: int, batch_size: int
) -> Iterator[np.ndarray]:
    """The picture with one cell hidden, cell by cell (row-major), `batch_size` at a time."""
    height, width = pixels.shape[:2]
    ys, xs = cell_edges(height, rows), cell_edges(width, cols)
    fill = pixels.reshape(-1, pixels.shape[-1]).mean(axis=0).astype(pixels.dtype)
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    for start in range(0, len(cells), batch_size):
        chunk = cells[start : start + batch_size]
        batch = np.repeat(pixels[None], len(chunk), axis=0)
        for index, (r, c) in enumerate(chunk):
            batch[index, ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = fill
        yield batch


def occlusion_heatmap(
    pixels: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    class_names: tuple[str, ...],
    rows: int,
    cols: int,
    batch_size: int,
    class_index: int | None = None,
) -> Heatmap:
    """Run the occlusion method with `predict` ((N, H, W, C) -> (N, classes) probabilities).

    `class_index` None: the top class of the unmasked picture. `predict` is called once for
    the picture and once per batch of occluded copies; a caller that must yield to other work
    or honour a deadline does so inside `predict`.
    """
    if rows < 1 or cols < 1 or batch_size < 1:
        raise ValueError("rows, cols and batch_size must be at least 1")
    probabilities = predict(pixels[None].astype(np.float32, copy=False))[0]
    if class_index is None:
        class_index = int(np.argmax(probabilities))
    base = np.log(max(float(probabilities[class_index]), _FLOOR))
    scores: list[np.ndarray] = []
    for batch in occluded_batches(pixels.astype(np.float32, copy=False), rows, cols, batch_size):
        scores.append(predict(batch)[:, class_index])
    hidden = np.concatenate(scores).astype(np.float64)
    grid = (base - np.log(np.maximum(hidden, _FLOOR))).reshape(rows, cols).astype(np.float32)
    return Heatmap(
        grid=grid,
        class_index=class_index,
        class_name=class_names[class_index],
        probabilities=probabilities,
        passes=rows * cols + 1,
    )
