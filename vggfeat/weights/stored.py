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
        return StoredLayer(self.label, self.name, tuple(np.asarray(a) for a in self.arrays))
