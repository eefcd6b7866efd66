"""What a file is made of: the settings that decide its numbers, its datasets, and rows.

``Settings`` is what a continued run must match; it compares itself, so the
store decides whether a run may continue a file without knowing what each
setting means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from vggfeat.architecture import Architecture, vgg
from vggfeat.errors import VggfeatError
from vggfeat.heads import SEPARATOR, split_label

#: Sources whose weights are a file the user names (``vggfeat.weights``): a file's settings
#: show its name, not the source's.
FILE_SOURCES = ("file", "pytorch")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers in a file; a continued run must match it."""

    depth: int
    layers: tuple[str, ...]
    """Each layer's dataset name: its canonical alias (``fc7``, ``pool5``) since 0.2, and
    the head of its own after it, if any (``pool5:gem``)."""
    pooling: str
    """``--pool``: the head of every map without one of its own (``gem(p=3, eps=1e-06)``)."""
    weights: str
    weights_file: str
    weights_sha256: str
    seed: int
    image_size: int
    resize: str
    compute_dtype: str
    dtype: str
    heads: tuple[str, ...] = ()
    """Each dataset's head, in ``layers``' order: ``none`` for a fully connected layer.
    Empty in a file written before heads had parameters, where ``pooling`` says it."""
    batch_norm: bool = False
    preprocessing: str = "caffe"
    """``caffe`` or ``torch``: every file before PyTorch's weights was ``caffe``."""

    def differences(self, other: Settings, where: str = "in the file") -> list[str]:
        """Each setting that differs, as '--option our-value in the file, other-value now'.

        Layers compare by what they are, not how they were spelt (``FC7``,
        ``fc2`` and ``fc7`` are one layer), and in any order.
        """
        ours, theirs = self._compared(), other._compared()
        if ours["weights_sha256"] and theirs["weights_sha256"]:
            # Weights are the same under any name or source (a copy, a link, timm's file
            # given by its path): their contents say.
            for values in (ours, theirs):
                del values["weights_file"], values["weights"]
        else:  # weights whose contents are pinned otherwise (Keras's published hash), or none
            del ours["weights_sha256"], theirs["weights_sha256"]
        for values in (ours, theirs):
            if values.get("weights") in FILE_SOURCES:  # shown as --weights takes it: the file
                values["weights"] = values.get("weights_file") or values["weights"]
        found = []
        for key in ours:
            if key == "heads":
                found += [
                    f"the head of {name} {head} {where}, {theirs[key][name]} now"
                    for name, head in ours[key].items()
                    if theirs[key].get(name, head) != head
                ]
            elif key == "compute_dtype" and ours[key] != theirs[key]:
                found.append(
                    f"computed in {ours[key]} {where}, in {theirs[key]} now (--precision, "
                    "--backend and the device decide)"
                )
            elif ours[key] != theirs[key]:
                found.append(
                    f"{_OPTIONS[key]} {_shown(ours[key])} {where}, {_shown(theirs[key])} now"
                )
        return found

    def _compared(self) -> dict[str, Any]:
        values = asdict(self)
        values["layers"] = canonical_layers(self.depth, self.layers)
        # Each dataset's head is what decides its numbers; --pool only chose them.
        del values["pooling"]
        names = _canonical_each(self.depth, self.layers)
        values["heads"] = dict(zip(names, self.each_head(), strict=False))  # a damaged file's too
        if self.weights != "random":
            del values["seed"]  # a seed means nothing to other weights
        return values

    def each_head(self) -> tuple[str, ...]:
        """Each dataset's head, also for a file of before ``heads``: there ``pooling``, on
        a layer with a map."""
        if self.heads:
            return self.heads
        try:
            architecture = vgg(self.depth)
            maps = [architecture.layer(split_label(name)[0]).has_map for name in self.layers]
        except (VggfeatError, TypeError):
            maps = [True] * len(self.layers)
        return tuple(self.pooling if has_map else "none" for has_map in maps)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Settings:
        """Settings as ``asdict`` gave them, after a trip through JSON."""
        found: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
        }
        return cls(**found)


def canonical_layers(depth: int, layers: tuple[str, ...]) -> tuple[str, ...]:
    """The datasets' canonical names in network order; a name vggfeat does not know stays."""
    try:
        architecture = vgg(depth)
        order = {layer.alias: index for index, layer in enumerate(architecture.layers)}
        return tuple(
            sorted(
                _canonical_each(depth, layers),
                key=lambda label: (order[split_label(label)[0]], label),
            )
        )
    except (VggfeatError, TypeError, KeyError):
        return tuple(sorted(layers))


def _canonical_each(depth: int, layers: tuple[str, ...]) -> tuple[str, ...]:
    """Each dataset's canonical name (``pool5`` for ``block5_pool``), in the order given."""
    try:
        architecture = vgg(depth)
        return tuple(canonical_label(architecture, label) for label in layers)
    except (VggfeatError, TypeError):
        return layers


def canonical_label(architecture: Architecture, label: str) -> str:
    """A dataset's name with its layer's canonical name: ``pool5:gem`` for ``block5_pool:gem``."""
    name, own = split_label(label)
    alias = architecture.layer(name).alias
    return alias if own is None else f"{alias}{SEPARATOR}{own.strip().lower()}"


_OPTIONS = {
    "depth": "--depth",
    "batch_norm": "--batch-norm",
    "preprocessing": "--preprocessing",
    "layers": "--layer",
    "weights": "--weights",
    "weights_file": "weights file",
    "weights_sha256": "the weights file's contents, SHA-256",
    "seed": "--seed",
    "image_size": "--image-size",
    "resize": "--resize",
    "dtype": "--dtype",
}


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, tuple | list) else str(value) or "none"


@dataclass(frozen=True)
class LayerSpec:
    """One dataset of the output: its name, the Keras layer, head, and per-image shape."""

    name: str
    keras_layer: str
    pooling: str
    """The head with its parameters: ``gem(p=3, eps=1e-06)``; ``none`` for a fully
    connected layer."""
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """What an output file is made of: settings, datasets and the run's attributes."""

    settings: Settings
    layers: tuple[LayerSpec, ...]
    compression: str
    attributes: dict[str, Any]

    def named_as(self, stored: Settings) -> Layout:
        """This layout with its datasets named and ordered as ``stored`` has them: a file
        written before names were canonical (``FC7``, ``fc2``) keeps its own."""
        if stored.layers == self.settings.layers:
            return self
        architecture = vgg(stored.depth)
        by_name = {canonical_label(architecture, spec.name): spec for spec in self.layers}
        layers = tuple(
            replace(by_name[canonical_label(architecture, name)], name=name)
            for name in stored.layers
        )
        heads = tuple(spec.pooling for spec in layers)
        settings = replace(self.settings, layers=stored.layers, heads=heads)
        return Layout(settings, layers, self.compression, self.attributes)

    def map_shape(self, spec: LayerSpec) -> tuple[int, ...]:
        """The shape of the map a dataset's head is given: its layer's output per image."""
        architecture = vgg(self.settings.depth)
        catalogue = architecture.catalogue(self.settings.image_size)
        return catalogue.facts(architecture.layer(spec.keras_layer)).output_shape

    @property
    def row_bytes(self) -> int:
        itemsize = np.dtype(self.settings.dtype).itemsize
        return sum(math.prod(spec.shape) * itemsize for spec in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "feature_sets": [asdict(spec) for spec in self.layers],
            "compression": self.compression,
            "attributes": self.attributes,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Layout:
        return cls(
            settings=Settings.from_dict(values["settings"]),
            layers=tuple(
                LayerSpec(s["name"], s["keras_layer"], s["pooling"], tuple(s["shape"]))
                for s in values["feature_sets"]
            ),
            compression=values["compression"],
            attributes=values["attributes"],
        )


@dataclass(frozen=True)
class Rows:
    """Rows and failures on their way into a file; ``paths`` are keys."""

    paths: list[str]
    size: np.ndarray
    mtime_ns: np.ndarray
    features: tuple[np.ndarray, ...]
    """One (len(paths), ...) array per layer, in the layout's order."""
    failed_paths: list[str]
    failed_reasons: list[str]
    failed_size: np.ndarray
    failed_mtime_ns: np.ndarray

    @property
    def keys(self) -> list[str]:
        return [*self.paths, *self.failed_paths]

    @classmethod
    def failures_only(
        cls,
        layout: Layout,
        paths: Sequence[str],
        reasons: Sequence[str],
        size: np.ndarray,
        mtime_ns: np.ndarray,
    ) -> Rows:
        """Failures and no rows, with empty feature arrays of the layout's shapes."""
        dtype = layout.settings.dtype
        return cls(
            paths=[],
            size=np.zeros(0, np.int64),
            mtime_ns=np.zeros(0, np.int64),
            features=tuple(np.zeros((0, *spec.shape), dtype) for spec in layout.layers),
            failed_paths=list(paths),
            failed_reasons=list(reasons),
            failed_size=np.asarray(size, np.int64),
            failed_mtime_ns=np.asarray(mtime_ns, np.int64),
        )

    def select(self, rows: np.ndarray, failed: np.ndarray) -> Rows:
        """Only the rows and failures the boolean masks ``rows`` and ``failed`` keep."""
        return Rows(
            paths=[p for p, kept in zip(self.paths, rows, strict=True) if kept],
            size=self.size[rows],
            mtime_ns=self.mtime_ns[rows],
            features=tuple(values[rows] for values in self.features),
            failed_paths=[p for p, kept in zip(self.failed_paths, failed, strict=True) if kept],
            failed_reasons=[r for r, kept in zip(self.failed_reasons, failed, strict=True) if kept],
            failed_size=self.failed_size[failed],
            failed_mtime_ns=self.failed_mtime_ns[failed],
        )
