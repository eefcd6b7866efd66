"""Engines: what moves the decoding and the network work, here in threads or on a cluster.

An engine takes image paths and yields, in the same order, a ``Computed``
batch of rows or a ``Failure`` for each image. It knows nothing of the
output: the plan (which images) and the store (what is done) stay with the
driver, so every engine writes the same file. ``Engine`` says in code what an
engine must do; each engine has its own options dataclass, registered in
``ENGINES`` by name, so a new engine is one new module and one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar, Protocol

import numpy as np

from vggfeat.architecture import Architecture, vgg
from vggfeat.errors import OptionError, VggfeatError
from vggfeat.images import Decoded, Failure, Source, decode_image
from vggfeat.network import Cut

#: Each engine's options class, as ``module:Class``, imported only when chosen.
ENGINES = {
    "local": "vggfeat.local_engine:LocalOptions",
    "ray": "vggfeat.ray_engine:RayOptions",
}


@dataclass(frozen=True)
class Job:
    """Everything an engine needs to decode images and build the network, anywhere."""

    depth: int
    cuts: tuple[Cut, ...]
    """The layers to cut at, named as the output's datasets are, each with its head."""
    image_size: int
    batch_size: int | None
    """Images per network call; None: the largest that is fast and fits in memory."""
    weights: str
    """``imagenet``, ``random`` or a path (``vggfeat.weights.SOURCES``)."""
    seed: int
    precision: str
    resize: str
    max_pixels: int | None
    workers: int | None
    backend: str
    device: str | None
    """``cpu``, ``gpu`` or ``gpu:N``; None: the first GPU, else the CPU."""
    compute_dtype: str
    """What the layers compute in, as the output's settings say."""
    batch_norm: bool = False
    preprocessing: str = "caffe"
    """``caffe`` or ``torch`` (``vggfeat.preprocessing``), as the output's settings say."""

    @property
    def architecture(self) -> Architecture:
        return vgg(self.depth, self.batch_norm)

    def feature_shapes(self) -> list[tuple[int, ...]]:
        """Each layer's per-image feature shape, as stored."""
        catalogue = self.architecture.catalogue(self.image_size)
        return [cut.feature_shape(catalogue) for cut in self.cuts]

    def image_bytes(self) -> int:
        """Bytes one image may take in the network at its peak (``Catalogue.image_bytes``)."""
        catalogue = self.architecture.catalogue(self.image_size)
        return catalogue.image_bytes([cut.layer for cut in self.cuts])

    def decode(self, path: str) -> Decoded | Failure:
        return decode_image(path, self.image_size, self.resize, self.max_pixels)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Computed:
    """A batch of rows: one ``Source`` per image, one (n, ...) array per layer."""

    sources: tuple[Source, ...]
    features: tuple[np.ndarray, ...]
    seconds: float
    """Time the network spent on the batch."""


Result = Computed | Failure


@dataclass
class EngineReport:
    """What an engine says about its work: where rows were computed, on what, in what size."""

    name: str
    computed_by: str = ""
    """``NVIDIA H200 (GPU 0), float16, JAX 0.10.2``, or a cluster's description."""
    backend_version: str = ""
    weights_sha256: str = ""
    rows_per_node: dict[str, int] = field(default_factory=dict)
    cluster: dict[str, object] = field(default_factory=dict)
    batch_size: int = 0
    requested_batch_size: int = 0
    computes_here: bool = True
    """Whether the network runs in this process, so that its time is not waiting."""


class Engine(Protocol):
    """How decoding and the network get done. ``LocalEngine`` and ``RayEngine`` keep to it.

    The driver calls, in order:

    - ``compute_dtype``, before anything is written (the output records it);
    - ``start``, once there is work: networks are built, weights read;
    - ``run``, once per shard;
    - ``report``, for the output's provenance and the summary;
    - ``close``, always, after an error or an interrupt too.

    ``run`` yields in input order: a ``Computed`` per run of usable images, a
    ``Failure`` per image that cannot be used. The driver may stop iterating
    at any moment. Ctrl-C and SIGTERM arrive as ``KeyboardInterrupt`` and
    ``Terminated``, wherever the driver is; an engine that stops a run itself
    (nothing done for too long) raises a ``VggfeatError`` from ``run``, and if
    the interrupt it used to wake the driver surfaced elsewhere,
    ``stop_reason`` returns that error so the driver reports it, not Ctrl-C.
    """

    name: str

    def compute_dtype(self, precision: str, backend: str, device: str | None) -> str: ...

    def start(self, job: Job, images: int) -> list[str]:
        """Get ready for ``images`` images; lines for the user (a batch capped, say)."""
        ...

    def run(self, paths: Sequence[str]) -> Iterator[Result]: ...

    def report(self) -> EngineReport: ...

    def stop_reason(self) -> VggfeatError | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    """An engine's own options: checked when made, turned into the engine by ``open``."""

    name: ClassVar[str]

    def require(self) -> None:
        """Raise ``VggfeatError`` when the engine cannot run here (a package missing)."""

    def open(self) -> Engine:
        raise NotImplementedError


def engine_options(name: str, **values: object) -> EngineOptions:
    """The options of the engine called ``name``, from its own fields' values."""
    if name not in ENGINES:
        raise OptionError(f"--engine {name} is not one of {', '.join(ENGINES)}")
    return options_class(name)(**values)


def options_class(name: str) -> type[EngineOptions]:
    module, _, attribute = ENGINES[name].partition(":")
    found: type[EngineOptions] = getattr(importlib.import_module(module), attribute)
    return found


def option_names(name: str) -> set[str]:
    """The fields an engine's options class takes."""
    return {option.name for option in fields(options_class(name))}
