"""Weights in PyTorch's layout: torchvision's and timm's VGGs, from safetensors files.

Read with the ``safetensors`` package's NumPy API, one tensor (or, for the
classifier, a slice of rows) at a time; torch is never needed. Two layouts
are told apart by their keys:

- torchvision: ``features.N.weight|bias`` (with batch norm also
  ``features.N.running_mean|running_var``) and ``classifier.{0,3,6}``;
- timm: the same ``features.N``, then ``pre_logits.fc1`` (a 7x7 convolution),
  ``pre_logits.fc2`` (a 1x1 convolution) and ``head.fc``.

Each array is converted to Keras's layout as it is read: kernels from
(out, in, kh, kw) to (kh, kw, in, out), dense kernels from (out, in) to
(in, out), and fc6's inputs from PyTorch's flattening of pool5's map,
(C, H, W), to Keras's, (H, W, C). A PyTorch pickle (``.pth``) is never
unpickled: it can run any code.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vggfeat.architecture import Architecture
from vggfeat.errors import WeightsMismatchError
from vggfeat.weights.keras_files import fetch, keras_cache_dir
from vggfeat.weights.stored import Deferred, StoredLayer

#: The classifier's three layers (fc6, fc7, fc8) in each layout.
CLASSIFIERS = {
    "torchvision": ("classifier.0", "classifier.3", "classifier.6"),
    "timm": ("pre_logits.fc1", "pre_logits.fc2", "head.fc"),
}
#: What the layouts' files were trained with: torchvision's preprocessing.
PREPROCESSING = "torch"
#: Rows of a classifier's weight read at once, and inputs of them turned into Keras's order
#: at once: blocks of 1 MB, which stay in cache (measured fastest of 64 to 1024 rows).
ROWS_AT_ONCE = 128
COLUMNS_AT_ONCE = 2048
#: safetensors' dtypes that NumPy reads, all converted to float32.
READABLE = ("F16", "F32", "F64")
#: Where timm publishes its files (the Hugging Face Hub).
_HUB = "https://huggingface.co"

_FEATURE = re.compile(r"features\.(\d+)\.(\w+)")
_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


def conversion(path: Path) -> str:
    """The two lines of Python, with torch, that turn a PyTorch pickle into safetensors."""
    target = path.with_suffix(".safetensors")
    if target == path:  # a pickle named .safetensors: the conversion must not overwrite it
        target = path.with_suffix(".converted.safetensors")
    return (
        "import torch, safetensors.torch\n"
        f"safetensors.torch.save_file(torch.load({str(path)!r}, weights_only=True), "
        f"{str(target)!r})"
    )


def is_safetensors(head: bytes) -> bool:
    """Whether a file starting with ``head`` (its first 16 bytes) is safetensors, whole or
    not: a little-endian 8-byte header length, then the JSON header. (A file cut short is
    the reader's to refuse, as damaged.)"""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length < 1 << 32 and head[8:9] == b"{"


def is_pickle(head: bytes) -> bool:
    """Whether a file starting with ``head`` is one of PyTorch's pickles: a zip archive
    (``torch.save`` since 1.6) or a bare pickle (protocol 2 and up)."""
    bare_pickle = len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5
    return head.startswith(b"PK\x03\x04") or bare_pickle


def pytorch_layout(path: Path) -> str:
    """``torchvision`` or ``timm``: which layout the file's keys are in (reads its header)."""
    with _opened(path) as (_file, keys):
        return _layout(keys, path)


@contextlib.contextmanager
def pytorch_layers(path: Path) -> Iterator[list[StoredLayer]]:
    """The weighted layers of a safetensors file in PyTorch's layout, in network order, in
    Keras's layout, each array read when used inside the block."""
    with _opened(path) as (file, keys):
        layout = _layout(keys, path)
        layers = _features(file, keys, path)
        channels = next((layer.arrays[0].shape[-1] for layer in reversed(layers)
                         if layer.kind == "conv"), 0)  # fmt: skip
        map_channels = channels
        for prefix in CLASSIFIERS[layout]:
            if f"{prefix}.weight" not in keys:
                break
            layers.append(_dense(file, keys, prefix, map_channels, path))
            map_channels = 0  # only fc6 takes a map
        yield layers


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[Any, dict[str, str]]]:
    """The open file and its keys, each without a ``module.`` prefix (a model saved from
    ``DataParallel``) mapped to the key in the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as file:
            names = list(file.keys())
            prefix = "module." if names and all(n.startswith("module.") for n in names) else ""
            yield file, {name.removeprefix(prefix): name for name in names}
    except SafetensorError as error:
        raise WeightsMismatchError(
            f"weights file {path} is damaged or incomplete: {error}"
        ) from error


def _layout(keys: dict[str, str], path: Path) -> str:
    if not any(_FEATURE.fullmatch(key) for key in keys):
        raise WeightsMismatchError(
            f"weights file {path} holds no features.N tensors: it is not a VGG in "
            "torchvision's or timm's layout"
        )
    timm = any(key.startswith(("pre_logits.", "head.")) for key in keys)
    if timm and any(key.startswith("classifier.") for key in keys):
        raise WeightsMismatchError(
            f"weights file {path} holds both torchvision's classifier (classifier.N) and "
            "timm's (pre_logits, head): it is in neither layout"
        )
    return "timm" if timm else "torchvision"


def _features(file: Any, keys: dict[str, str], path: Path) -> list[StoredLayer]:
    """``features.N``: each convolution, and each batch norm after it, in order of N."""
    modules: dict[int, dict[str, str]] = defaultdict(dict)
    for key in keys:
        match = _FEATURE.fullmatch(key)
        if match:
            modules[int(match[1])][match[2]] = key
    layers = []
    for index in sorted(modules):
        parts = {name: key for name, key in modules[index].items() if name != "num_batches_tracked"}
        if not parts:
            continue
        label = f"features.{index}"
        _require(parts, ("weight", "bias"), label, path)
        rank = len(_slice(file, keys[parts["weight"]], path).get_shape())
        if rank == 1:  # a batch norm's scale
            _require(parts, _NORM_KEYS, label, path)
            arrays = tuple(_vector(file, keys[parts[name]], path) for name in _NORM_KEYS)
            layers.append(StoredLayer(label, None, arrays, pytorch=True))
        elif rank == 4:
            kernel = _kernel(file, keys[parts["weight"]], path)
            bias = _vector(file, keys[parts["bias"]], path)
            layers.append(StoredLayer(label, None, (kernel, bias), pytorch=True))
        else:
            raise WeightsMismatchError(
                f"weights file {path} holds {label}.weight with {rank} axes, neither a "
                "convolution's (4) nor a batch norm's (1)"
            )
    return layers


def _require(parts: dict[str, str], names: tuple[str, ...], label: str, path: Path) -> None:
    missing = [name for name in names if name not in parts]
    if missing:
        raise WeightsMismatchError(
            f"weights file {path} has {label}.{next(iter(parts))} but no {label}.{missing[0]}"
        )


def _slice(file: Any, key: str, path: Path) -> Any:
    """A tensor's slice object, refused unless NumPy can read its dtype."""
    tensor = file.get_slice(key)
    dtype = tensor.get_dtype()
    if dtype not in READABLE:
        raise WeightsMismatchError(
            f"weights file {path} holds {key} as {dtype}, which vggfeat does not read; save "
            "it in float32 (model.float() in PyTorch) and convert it again"
        )
    return tensor


def _vector(file: Any, key: str, path: Path) -> Deferred:
    tensor = _slice(file, key, path)
    return Deferred(tuple(tensor.get_shape()), lambda: np.asarray(file.get_tensor(key), np.float32))


def _kernel(file: Any, key: str, path: Path) -> Deferred:
    """A convolution's kernel, (out, in, kh, kw) to Keras's (kh, kw, in, out)."""
    out, inputs, height, width = _slice(file, key, path).get_shape()

    def read() -> np.ndarray:
        kernel = np.asarray(file.get_tensor(key), np.float32)
        return np.ascontiguousarray(kernel.transpose(2, 3, 1, 0))

    return Deferred((height, width, inputs, out), read, (out, inputs, height, width))


def _dense(
    file: Any, keys: dict[str, str], prefix: str, map_channels: int, path: Path
) -> StoredLayer:
    """A classifier layer: its weight as a Keras dense kernel (in, out), and its bias.

    A weight of (out, in) reads the inputs in PyTorch's order; for fc6 that is
    pool5's map flattened as (C, H, W), with ``map_channels`` channels. timm's
    fc1 is a convolution over the whole map, (out, C, H, W), the same numbers.
    Keras flattens the map as (H, W, C), so fc6's rows are put in that order.
    """
    label = prefix
    weight_key = keys[f"{prefix}.weight"]
    if f"{prefix}.bias" not in keys:
        raise WeightsMismatchError(f"weights file {path} has {prefix}.weight but no {prefix}.bias")
    source = _slice(file, weight_key, path)
    shape = tuple(source.get_shape())
    out, inputs = shape[0], math.prod(shape[1:])
    if len(shape) == 4:
        channels, height, width = shape[1:]
    else:
        side = math.isqrt(inputs // map_channels) if map_channels else 1
        fits = map_channels and map_channels * side * side == inputs
        channels, height, width = (map_channels, side, side) if fits else (inputs, 1, 1)

    def read() -> np.ndarray:
        kernel = np.empty((inputs, out), np.float32)

        def fill(start: int) -> None:
            rows = np.asarray(source[start : min(start + ROWS_AT_ONCE, out)], np.float32)
            count = len(rows)
            # Each row from (C, H, W) to (H, W, C), in cache; then the rows become columns,
            # a block at a time: a transpose of the whole 411 MB at once runs 3x slower.
            by_place = rows.reshape(count, channels, height * width).transpose(0, 2, 1)
            ordered = np.ascontiguousarray(by_place).reshape(count, inputs)
            for first in range(0, inputs, COLUMNS_AT_ONCE):
                columns = slice(first, first + COLUMNS_AT_ONCE)
                kernel[columns, start : start + count] = ordered[:, columns].T

        # NumPy's copies let go of the GIL: the blocks fill in parallel.
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, range(0, out, ROWS_AT_ONCE)))
        return kernel

    bias = _vector(file, keys[f"{prefix}.bias"], path)
    return StoredLayer(label, None, (Deferred((inputs, out), read, shape), bias), pytorch=True)


@dataclass(frozen=True)
class Release:
    """One network's ImageNet weights as torchvision publishes them, and as timm republishes
    them in safetensors (``tv_in1k``: the same numbers)."""

    depth: int
    batch_norm: bool
    torchvision_file: str
    top1: float
    """ImageNet top-1 accuracy in percent, as torchvision reports it."""

    @property
    def name(self) -> str:
        return f"vgg{self.depth}" + ("_bn" if self.batch_norm else "")

    @property
    def timm_repository(self) -> str:
        return f"timm/{self.name}.tv_in1k"

    @property
    def timm_url(self) -> str:
        return f"{_HUB}/{self.timm_repository}/resolve/main/model.safetensors"

    @property
    def torchvision_url(self) -> str:
        return f"https://download.pytorch.org/models/{self.torchvision_file}"

    @property
    def timm_fname(self) -> str:
        """The name of timm's file in Keras's cache (every timm file is model.safetensors)."""
        return f"timm_{self.name}.tv_in1k.safetensors"

    def cached_path(self) -> Path:
        return keras_cache_dir() / "models" / self.timm_fname


def release(architecture: Architecture) -> Release:
    """The PyTorch world's ImageNet weights for a network: every depth, with batch norm or not."""
    return RELEASES[architecture.depth, architecture.batch_norm]


def fetch_timm(
    published: Release,
    size_mb: int,
    announce: Callable[[str], None] | None = None,
    backend: str | None = None,
) -> Path:
    """The path of timm's file for a network in Keras's cache, downloaded there if missing.
    timm publishes no hash beside the file: it is checked by reading it, layer by layer."""
    return fetch(
        published.timm_fname,
        published.timm_url,
        None,
        f"timm's {published.timm_repository} file {published.timm_fname} (about {size_mb} MB)",
        announce,
        backend,
    )


RELEASES: dict[tuple[int, bool], Release] = {
    (r.depth, r.batch_norm): r
    for r in (
        Release(11, False, "vgg11-8a719046.pth", 69.02),
        Release(11, True, "vgg11_bn-6002323d.pth", 70.37),
        Release(13, False, "vgg13-19584684.pth", 69.928),
        Release(13, True, "vgg13_bn-abd245e5.pth", 71.586),
        Release(16, False, "vgg16-397923af.pth", 71.592),
        Release(16, True, "vgg16_bn-6c64b313.pth", 73.36),
        Release(19, False, "vgg19-dcbb9e9d.pth", 72.376),
        Release(19, True, "vgg19_bn-c79401a0.pth", 74.218),
    )
}
