"""A weights file's layers as vggfeat reads them, whatever the file's layout.

Every reader turns its file into ``StoredLayer``s in network order, each with
its arrays already in Keras's layout (kernels (kh, kw, in, out), dense
kernels (in, out)). The arrays are read when used, not when listed, so that
a network takes its weights one layer at a time: fc6 alone is 411 MB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class ArrayLike(Protocol):
    """What a stored array must offer: an h5py dataset, a NumPy array or a ``Deferred``."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    def __array__(self, dtype: Any = None) -> np.ndarray: ...


@dataclass(frozen=True)
class Deferred:
    """An array known by its shape, read (and converted to Keras's layout) when asked for."""

    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    stored: tuple[int, ...] | None = None
    """The shape as the file holds it, where its layout differs from Keras's."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.read()
        return array if dtype is None else array.astype(dtype, copy=False)


@dataclass(frozen=True)
class StoredLayer:
    """One layer's arrays as a weights file holds them, in Keras's layout."""

    label: str
    """Where it is in the file, e.g. ``block1_conv1``, ``layers/conv2d_3`` or ``features.28``."""
    name: str | None
    """The Keras layer name, where the layout records one."""
    arrays: tuple[ArrayLike, ...]
    pytorch: bool = False
    """Whether the file holds it in PyTorch's layout: (out, in, kh, kw) and (out, in)."""

    def stored_shapes(self) -> list[tuple[int, ...]]:
        """Each array's shape as the file holds it, for messages."""
        return [getattr(array, "stored", None) or tuple(array.shape) for array in self.arrays]

    def in_file_terms(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Keras's shapes as this file's layout writes them, for messages."""
        if not self.pytorch:
            return shapes
        return [
            (s[3], s[2], s[0], s[1]) if len(s) == 4 else (s[1], s[0]) if len(s) == 2 else s
            for s in shapes
        ]

    @property
    def kind(self) -> str:
        """``conv`` (a 4-D kernel), ``norm`` (four vectors: scale, shift, mean, variance) or
        ``dense``."""
        if self.arrays and self.arrays[0].ndim == 4:
            return "conv"
        if len(self.arrays) == 4 and all(array.ndim == 1 for array in self.arrays):
            return "norm"
        return "dense"

    def read(self) -> StoredLayer:
        """The same layer with its arrays in memory."""
        arrays = tuple(np.asarray(a) for a in self.arrays)
        return StoredLayer(self.label, self.name, arrays, self.pytorch)
