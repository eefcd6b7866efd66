"""One layer of a features file as unit-length float32 rows, ready for cosine similarity.

The layer is read through ``vggfeat.open`` a chunk at a time into one (N, D)
array, each row scaled to unit length as it arrives (a conv map is flattened
in C order first), so an inner product is a cosine. That array is the only
copy vggfeat keeps; it is refused up front when it would not fit in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from vggfeat.atomic import size_text
from vggfeat.errors import OptionError, OutputError
from vggfeat.export import CHUNK_BYTES, unit_length
from vggfeat.memory import free_bytes
from vggfeat.search.progress import OnStep, Step, ignore
from vggfeat.store import open_features, output_path
from vggfeat.store.identity import Identity, home_of


@dataclass(frozen=True)
class Vectors:
    """The rows of one layer of ``file``, each of unit length (an all-zero row stays zero)."""

    file: Path
    layer: str
    paths: list[str]
    """Each row's image as the file stores it: relative to the file's folder, or absolute."""
    rows: np.ndarray
    """(N, D) float32, C-contiguous: row i belongs to ``paths[i]``."""
    left_out: list[str] = field(default_factory=list)
    """Paths whose rows are all zeros or hold NaN or an infinity: they have no direction,
    so no cosine with any other row, and are left out."""
    pending: int = 0
    """Of the rows, those committed so far by a run that has not finished."""
    damaged: tuple[str, ...] = ()
    """A line for each part of an unfinished run left out as damaged."""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def width(self) -> int:
        return int(self.rows.shape[1])

    def locate(self, row: int) -> str | None:
        """Where the image of ``row`` is now (its stored path read from the file's
        folder), or None if it is gone."""
        return self._identity.locate(self.paths[row])

    @cached_property
    def _identity(self) -> Identity:
        return Identity(home_of(self.file))


def require_vectors(vectors: object, user: str) -> None:
    """Refuse anything but ``Vectors``, naming where they come from."""
    if not isinstance(vectors, Vectors):
        raise TypeError(
            f"{user} takes the Vectors that read_vectors(path) returns, not "
            f"{type(vectors).__name__}"
        )


def read_vectors(
    path: str | os.PathLike,
    layer: str | None = None,
    expect: Callable[[int], None] | None = None,
    on_step: OnStep = ignore,
) -> Vectors:
    """Read layer ``layer`` (the file's only one when None) of the features file at
    ``path`` as unit-length rows.

    ``expect(rows)`` is called with the number of rows before any is read, to
    refuse a request the file cannot answer (``-k`` too large) at once.
    ``OutputError`` when the file has no rows, or the layer would not fit in
    the memory there is.
    """
    if not os.fspath(path):
        raise OptionError("no file named: give the path of a vggfeat file")
    source = output_path(path)
    with open_features(source) as file:
        name = file.choose_layer(layer)
        column = file.features[name]
        count = len(column)
        width = math.prod(column.shape[1:])
        if count == 0:
            raise OutputError(
                f"{source} holds no rows of {name}, so nothing to compare: "
                "extract some images into it first"
            )
        if expect is not None:
            expect(count)
        _require_memory(source, name, count, width)
        rows = np.empty((count, width), np.float32)
        step = max(1, CHUNK_BYTES // (width * 4))
        for start in range(0, count, step):
            stop = min(count, start + step)
            try:
                values = np.asarray(column[start:stop])
            except (OSError, KeyError, ValueError) as error:
                raise OutputError(
                    f"{source} is damaged: rows {start:,} to {stop:,} of {name} cannot be read "
                    f"({error})"
                ) from None
            rows[start:stop] = unit_length(values).reshape(stop - start, width)
            on_step(Step("reading", stop, count))
        paths = list(file.paths)
        pending, damaged = file.pending, tuple(file.damaged)
    # A row of zeros, NaN or an infinity has no direction, so no cosine with any other.
    usable = np.isfinite(rows).all(axis=1) & rows.any(axis=1)
    left_out = [paths[row] for row in np.flatnonzero(~usable)]
    if left_out:
        rows = np.ascontiguousarray(rows[usable])
        paths = [paths[row] for row in np.flatnonzero(usable)]
        if not paths:
            raise OutputError(
                f"every row of {name} in {source} is all zeros or holds NaN or an infinity: "
                "nothing to compare"
            )
    return Vectors(source, name, paths, rows, left_out, pending, damaged)


def _require_memory(source: Path, name: str, count: int, width: int) -> None:
    """Refuse a layer whose rows, and an index's copy of them, would not fit in memory."""
    need = 2 * count * width * 4
    free = free_bytes()
    if free is not None and need > free:
        raise OutputError(
            f"{name} of {source} is {count:,} rows of {width:,} values: searching it takes "
            f"about {size_text(need)} of memory and {size_text(free)} is free; choose a "
            "smaller layer with --layer (a pooled one: extract --layer pool5 --pool gem)"
        )
