"""Occlusion heatmaps: which parts of the picture the model's answer depends on.

Model-agnostic and forward-only: the model input is cut into a `rows` x `cols` grid; for each
cell, a copy of the input with that cell painted over in the picture's mean colour is run
through the model (in batches, through the same runtime as predictions). A cell's value is how
much hiding it lowers the explained score:

    value(cell) = score(picture) - score(picture with the cell hidden)
    score = log p(class)                      (no contrast class)
          = log p(class) - log p(versus)      (with a contrast class `versus`)

With a contrast the heatmap answers "why this class rather than that one": for RottenBot,
"Banana__Rotten rather than Banana__Healthy", i.e. where the rot is, instead of everything
that makes it a banana (see `counterpart`). Positive: the answer relies on what is in that
cell; near 0: it does not; negative: what is there argues against it. Cost: rows x cols + 1
model passes per explanation.

Only numpy here: scheduling (priority, concurrency, deadlines) is in `explainer.py`, the
picture overlay in `overlay.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

METHOD = "occlusion"
_FLOOR = 1e-7  # probabilities below this are taken as this (log of 0 is -inf)
_STATES = ("Healthy", "Rotten")


@dataclass(frozen=True)
class Heatmap:
    """One explanation: the grid of score drops, and for which class (versus which)."""

    grid: np.ndarray  # float32 (rows, cols); see the module docstring
    class_index: int
    class_name: str
    versus_name: str | None  # the contrast class, or None
    probabilities: np.ndarray  # the unmasked picture's (classes,) probabilities
    passes: int  # model passes run (cells + 1)
    method: str = METHOD

    @property
    def rows(self) -> int:
        return int(self.grid.shape[0])

    @property
    def cols(self) -> int:
        return int(self.grid.shape[1])


def counterpart(class_names: tuple[str, ...], index: int) -> int | None:
    """The same produce's other state (`Banana__Rotten` <-> `Banana__Healthy`), if the model
    has it; None for class names that do not follow `<Produce>__<Healthy|Rotten>`."""
    produce, _, state = class_names[index].rpartition("__")
    if not produce or state not in _STATES:
        return None
    other = f"{produce}__{_STATES[1 - _STATES.index(state)]}"
    return class_names.index(other) if other in class_names else None


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
    versus_index: int | None = None,
    versus_counterpart: bool = False,
) -> Heatmap:
    """Run the occlusion method with `predict` ((N, H, W, C) -> (N, classes) probabilities).

    `class_index` None: the top class of the unmasked picture. `versus_index`: the contrast
    class (None: none, or with `versus_counterpart` the explained class's `counterpart`).
    `predict` is called once for the picture and once per batch of
    occluded copies; a caller that must yield to other work or honour a deadline does so
    inside `predict`.
    """
    if rows < 1 or cols < 1 or batch_size < 1:
        raise ValueError("rows, cols and batch_size must be at least 1")
    pixels = pixels.astype(np.float32, copy=False)
    probabilities = predict(pixels[None])[0]
    if class_index is None:
        class_index = int(np.argmax(probabilities))
    if versus_index is None and versus_counterpart:
        versus_index = counterpart(class_names, class_index)
    if versus_index == class_index:
        versus_index = None

    def score(p: np.ndarray) -> np.ndarray:
        value = np.log(np.maximum(p[..., class_index].astype(np.float64), _FLOOR))
        if versus_index is not None:
            value -= np.log(np.maximum(p[..., versus_index].astype(np.float64), _FLOOR))
        return value

    base = score(probabilities)
    hidden = np.concatenate(
        [score(predict(batch)) for batch in occluded_batches(pixels, rows, cols, batch_size)]
    )
    return Heatmap(
        grid=(base - hidden).reshape(rows, cols).astype(np.float32),
        class_index=class_index,
        class_name=class_names[class_index],
        versus_name=None if versus_index is None else class_names[versus_index],
        probabilities=probabilities,
        passes=rows * cols + 1,
    )
