"""Where the numbers come from (one registry of sources), and the proof that every layer got
its own.

A source is named by what ``--weights`` says: ``imagenet`` (Keras's published
files), ``timm`` (torchvision's, as timm republishes them), ``random`` (drawn
under a seed), or a path, whose first bytes tell a
Keras weights file (HDF5) from a safetensors file in PyTorch's layout. Each
source says what it is before any network is built (``identify``) and gives
its layers in network order when one is (``open``). A new source is one
class here and one entry in ``SOURCES``.

Every weighted layer of the cut model must find its arrays, in order, with
the right shapes, or loading fails naming the first layer that does not fit.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from vggfeat.architecture import BLOCK_DEPTHS, Architecture, Layer
from vggfeat.errors import WeightsMismatchError, WeightsUnavailableError
from vggfeat.weights import pytorch_files
from vggfeat.weights.keras_files import (
    HDF5_SIGNATURE,
    fetch_imagenet,
    keras_layers,
    published_file,
)
from vggfeat.weights.stored import StoredLayer

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class WeightsRecord:
    """What the weights are, for the output file's settings and attributes."""

    kind: str
    """The source's name: ``imagenet``, ``random``, ``file`` (Keras's layout) or ``pytorch``."""
    file: str
    """The file's name ('' for random weights)."""
    sha256: str
    """SHA-256 of the file ('' for random weights, and for ImageNet's before it is fetched)."""
    seed: int | None = None
    layout: str = ""
    """``keras``, ``torchvision`` or ``timm``; '' for random weights."""
    preprocessing: str = "caffe"
    """What the weights were trained with, as far as their layout says."""


@dataclass(frozen=True)
class Opened:
    """A source opened to build a network: its record, and its layers (None: drawn at random)."""

    record: WeightsRecord
    layers: Sequence[StoredLayer] | None
    path: str = ""
    """Where the file is, for messages."""


class Source(abc.ABC):
    """One place weights come from."""

    name: ClassVar[str]
    preprocessing: ClassVar[str] = "caffe"
    local: ClassVar[bool] = False
    """Whether the weights are on this machine already, to be checked before a run starts."""
    pinned: ClassVar[bool] = True
    """Whether ``identify`` pins the weights' numbers before any download (by a seed, a
    published hash, a local file's SHA-256). timm's file is pinned only by its SHA-256,
    known once it is downloaded: an output's settings need it before the run starts."""

    def claims(self, weights: str) -> bool:
        """Whether ``--weights`` names this source: a published or drawn source by its name
        (a file source looks at the file, asked only if it exists)."""
        return weights == self.name

    @abc.abstractmethod
    def identify(
        self, architecture: Architecture, needs_top: bool, weights: str, seed: int
    ) -> WeightsRecord:
        """What the weights are, without reading their numbers or fetching them."""

    @abc.abstractmethod
    def open(
        self, architecture: Architecture, needs_top: bool, weights: str, seed: int
    ) -> contextlib.AbstractContextManager[Opened]:
        """The weights' layers, fetched if they must be, each array read when used."""

    def fetch(
        self,
        architecture: Architecture,
        needs_top: bool,
        announce: Callable[[str], None],
        backend: str,
    ) -> None:
        """Put the weights on this machine if they are published elsewhere, saying so to
        ``announce`` before a download (Keras's downloader starts on ``backend``); most
        sources have nothing to fetch."""
        return None


class FileSource(Source):
    """Weights in a file the user names, read by a layout's reader."""

    local = True

    @abc.abstractmethod
    def layout(self, path: Path) -> str:
        """The file's layout, from a look at it."""

    @abc.abstractmethod
    def layers(self, path: Path) -> contextlib.AbstractContextManager[list[StoredLayer]]:
        """The file's layers in network order (the layout's reader)."""

    def identify(
        self, architecture: Architecture, needs_top: bool, weights: str, seed: int
    ) -> WeightsRecord:
        path = Path(weights)
        return WeightsRecord(
            self.name, path.name, file_sha256(path), None, self.layout(path), self.preprocessing
        )

    @contextlib.contextmanager
    def open(
        self, architecture: Architecture, needs_top: bool, weights: str, seed: int
    ) -> Iterator[Opened]:
        with self.layers(Path(weights)) as layers:
            yield Opened(self.identify(architecture, needs_top, weights, seed), layers, weights)


class RandomWeights(Source):
    """Keras's initialisers under a seed, drawn by NumPy, the same on every backend."""

    name = "random"

    def identify(
        self, architecture: Architecture, needs_top: bool, weights: str, seed: int
    ) -> WeightsRecord:
        return WeightsRecord("random", "", "", seed)

    @contextlib.contextmanager
    def open(
        self, architecture: Architecture, needs_top: bool, weights: str, seed: int
    ) -> Iterator[Opened]:
        yield Opened(self.identify(architecture, needs_top, weights, seed), None)


class KerasImageNet(Source):
    """The ImageNet files Keras publishes (VGG16, VGG19), fetched once into Keras's cache."""

    name = "imagenet"

    def identify(
        self, architecture: Architecture, needs_top: bool, weights: str, seed: int
    ) -> WeightsRecord:
        if architecture.batch_norm:
            raise WeightsUnavailableError(
                f"Keras publishes no ImageNet weights with batch norm ({architecture.name}); "
                "use --weights timm (torchvision's ImageNet weights, as timm publishes them), "
                "or --weights PATH"
            )
        fname = published_file(architecture, needs_top).fname
        return WeightsRecord("imagenet", fname, "", None, "keras")

    def fetch(
        self,
        architecture: Architecture,
        needs_top: bool,
        announce: Callable[[str], None],
        backend: str,
    ) -> None:
        fetch_imagenet(published_file(architecture, needs_top), announce, backend)

    @contextlib.contextmanager
    def open(
        self, architecture: Architecture, needs_top: bool, weights: str, seed: int
    ) -> Iterator[Opened]:
        self.identify(architecture, needs_top, weights, seed)
        path = fetch_imagenet(published_file(architecture, needs_top))
        record = WeightsRecord("imagenet", path.name, file_sha256(path), None, "keras")
        with keras_layers(path) as layers:
            yield Opened(record, layers, str(path))


class TimmImageNet(Source):
    """torchvision's ImageNet weights as timm republishes them in safetensors (every depth,
    with batch norm or not), fetched once into Keras's cache."""

    name = "timm"
    preprocessing = pytorch_files.PREPROCESSING
    pinned = False  # timm publishes no hash beside its files

    def identify(
        self, architecture: Architecture, needs_top: bool, weights: str, seed: int
    ) -> WeightsRecord:
        published = pytorch_files.release(architecture)
        cached = published.cached_path()
        if not cached.is_file():  # '' until fetched: what a download will be
            return WeightsRecord("timm", cached.name, "", None, "timm", self.preprocessing)
        # No published hash pins timm's file: its SHA-256 does, in the output's settings.
        layout = "timm"  # a file put in its place may be another; open() refuses a bad one
        with contextlib.suppress(WeightsMismatchError):
            layout = pytorch_files.pytorch_layout(cached)
        return WeightsRecord(
            "timm", cached.name, file_sha256(cached), None, layout, self.preprocessing
        )

    def fetch(
        self,
        architecture: Architecture,
        needs_top: bool,
        announce: Callable[[str], None],
        backend: str,
    ) -> None:
        pytorch_files.fetch_timm(
            pytorch_files.release(architecture), _megabytes(architecture), announce, backend
        )

    @contextlib.contextmanager
    def open(
        self, architecture: Architecture, needs_top: bool, weights: str, seed: int
    ) -> Iterator[Opened]:
        published = pytorch_files.release(architecture)
        path = pytorch_files.fetch_timm(published, _megabytes(architecture))
        try:
            record = WeightsRecord(
                "timm", path.name, file_sha256(path), None, pytorch_files.pytorch_layout(path),
                self.preprocessing,
            )  # fmt: skip
            with pytorch_files.pytorch_layers(path) as layers:
                yield Opened(record, layers, str(path))
        except WeightsMismatchError as error:
            # Whatever the reason, the way out is the same: the right file in that place.
            reason = str(error).removeprefix(f"weights file {path} ").split("; ")[0]
            raise WeightsMismatchError(
                f"the cached file {path} is not timm's {published.timm_repository} "
                f"({reason}); delete it and vggfeat downloads it again, or put timm's "
                f"model.safetensors for {architecture.name} there"
            ) from error


class KerasFile(FileSource):
    """A file in Keras's legacy ``.h5`` or Keras 3 ``.weights.h5`` layout."""

    name = "file"

    def claims(self, weights: str) -> bool:
        return _head(weights).startswith(HDF5_SIGNATURE)

    def layout(self, path: Path) -> str:
        return "keras"

    def layers(self, path: Path) -> contextlib.AbstractContextManager[list[StoredLayer]]:
        return keras_layers(path)


class PyTorchFile(FileSource):
    """A safetensors file in torchvision's or timm's layout, trained with torchvision's
    preprocessing."""

    name = "pytorch"
    preprocessing = pytorch_files.PREPROCESSING

    def claims(self, weights: str) -> bool:
        return pytorch_files.is_safetensors(_head(weights))

    def layout(self, path: Path) -> str:
        return pytorch_files.pytorch_layout(path)

    def layers(self, path: Path) -> contextlib.AbstractContextManager[list[StoredLayer]]:
        return pytorch_files.pytorch_layers(path)


#: Every source, asked in order which one ``--weights`` names.
SOURCES: tuple[Source, ...] = (
    RandomWeights(),
    KerasImageNet(),
    TimmImageNet(),
    KerasFile(),
    PyTorchFile(),
)
#: What ``--weights`` takes besides a path.
KEYWORDS = tuple(source.name for source in SOURCES if not source.local)


def source_of(weights: str | os.PathLike) -> Source:
    """The source ``weights`` names: a keyword (``KEYWORDS``), or a path, whose first bytes
    say which file source reads it.

    Raises ``WeightsUnavailableError`` for a file that is not there and
    ``WeightsMismatchError`` for one no source reads: a PyTorch pickle with
    the two lines that convert it, anything else with what it is.
    """
    text = os.fspath(weights)
    for source in SOURCES:
        if not source.local and source.claims(text):
            return source
    path = Path(text)
    _require_file(path)
    for source in SOURCES:
        if source.local and source.claims(text):
            return source
    if pytorch_files.is_pickle(_head(text)):
        raise WeightsMismatchError(
            f"weights file {path} is a PyTorch pickle, which vggfeat never unpickles (it can "
            "run any code); convert it to safetensors with torch, then use that file:\n"
            + pytorch_files.conversion(path)
        )
    raise WeightsMismatchError(
        f"weights file {path} is neither a Keras weights file (.h5, .weights.h5) nor a "
        "safetensors file (PyTorch's layout)"
    )


def _require_file(path: Path) -> None:
    """Refuse a path that is not a readable file, saying what it is instead."""
    choices = f"--weights takes {', '.join(KEYWORDS)} or the path of a file"
    if not str(path) or str(path) == ".":
        raise WeightsUnavailableError(f"--weights names nothing; {choices}")
    if path.is_dir():
        raise WeightsUnavailableError(f"weights file {path} is a folder; {choices}")
    if not path.exists():
        raise WeightsUnavailableError(f"weights file {path} does not exist; {choices}")
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} is not a regular file; {choices}")


def fetch_weights(
    architecture: Architecture,
    needs_top: bool,
    weights: str | os.PathLike,
    announce: Callable[[str], None],
    backend: str,
) -> None:
    """Download published weights into the cache now, if they are not there, saying so to
    ``announce`` first: before any network is built, and on a cluster before any actor starts.
    Keras, whose downloader this is, starts on ``backend``, the run's."""
    source_of(weights).fetch(architecture, needs_top, announce, backend)


def _megabytes(architecture: Architecture) -> int:
    """The size of a network's float32 weights, as the published files have them."""
    return round(architecture.catalogue().params * 4 / 1e6)


def identify_weights(
    architecture: Architecture, needs_top: bool, weights: str | os.PathLike, seed: int = 0
) -> WeightsRecord:
    """What ``weights`` names, known before any network is built.

    An ImageNet file's hash is known only once it is fetched, so it is '' here.
    Raises for weights Keras does not publish and for a file that does not exist.
    """
    return source_of(weights).identify(architecture, needs_top, os.fspath(weights), seed)


@dataclass(frozen=True)
class PreparedWeights:
    """Weights read once, to be given to networks elsewhere (Ray actors, say)."""

    record: WeightsRecord
    layers: tuple[StoredLayer, ...] | None
    """In memory; None for random weights, which each network draws under the seed."""

    @classmethod
    def read(
        cls,
        architecture: Architecture,
        needs_top: bool,
        weights: str | os.PathLike,
        seed: int = 0,
    ) -> PreparedWeights:
        """Any source's weights, read into memory (ImageNet's fetched into the cache first)."""
        source = source_of(weights)
        with source.open(architecture, needs_top, os.fspath(weights), seed) as opened:
            layers = None if opened.layers is None else tuple(s.read() for s in opened.layers)
            return cls(opened.record, layers)

    def digest(self) -> str:
        """SHA-256 of every array in order: what a receiver checks it got."""
        digest = hashlib.sha256()
        for layer in self.layers or ():
            for array in layer.arrays:
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


@contextlib.contextmanager
def _opened(
    architecture: Architecture,
    needs_top: bool,
    weights: str | os.PathLike | PreparedWeights,
    seed: int,
) -> Iterator[Opened]:
    if isinstance(weights, PreparedWeights):
        yield Opened(weights.record, weights.layers, weights.record.file)
        return
    source = source_of(weights)
    with source.open(architecture, needs_top, os.fspath(weights), seed) as opened:
        yield opened


def build_with_weights(
    architecture: Architecture,
    image_size: int,
    up_to: Layer,
    weights: str | os.PathLike | PreparedWeights,
    seed: int = 0,
    dtype: str | None = None,
) -> tuple[keras.Model, WeightsRecord]:
    """The Keras model from the input through ``up_to``, with its weights, and their record.

    ``weights`` is ``"imagenet"``, ``"random"`` (drawn under ``seed``), a path
    to a weights file, or weights already read. A file's arrays become the
    variables' first values, read one layer at a time: never zeros first and
    the file's numbers copied over them, which held fc6's 411 MB three times.
    Raises ``WeightsMismatchError`` naming the first layer the file does not fit,
    before any variable is made.
    """
    layers = [layer for layer in architecture.through(up_to) if layer.has_weights]
    needs_top = any(layer.is_top for layer in layers)
    with _opened(architecture, needs_top, weights, seed) as opened:
        record = opened.record
        if opened.layers is None:
            drawn = seed if record.seed is None else record.seed
            return architecture.build(image_size, up_to, drawn, dtype), record
        expected = architecture.catalogue(image_size).weight_shapes()
        chosen = _match(layers, opened.layers, expected, architecture, opened.path)
        initial = {
            name: [_array_initialiser(a, c.label, opened.path) for a in c.arrays]
            for name, c in chosen.items()
        }
        model = architecture.build(image_size, up_to, dtype=dtype, initial=initial)
    return model, record


def check_fits(
    architecture: Architecture, image_size: int, up_to: Layer, weights: str | os.PathLike
) -> None:
    """Raise ``WeightsMismatchError`` unless weights on this machine have the arrays every
    weighted layer through ``up_to`` needs; reads a file's layout only, not its numbers.
    Weights still to be fetched or drawn are checked as they come."""
    source = source_of(weights)
    if not source.local:
        return
    layers = [layer for layer in architecture.through(up_to) if layer.has_weights]
    needs_top = any(layer.is_top for layer in layers)
    with source.open(architecture, needs_top, os.fspath(weights), 0) as opened:
        expected = architecture.catalogue(image_size).weight_shapes()
        _match(layers, opened.layers or (), expected, architecture, opened.path)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read once per version of it (path, size, modification time)."""
    info = path.stat()
    return _sha256(str(path.resolve()), info.st_size, info.st_mtime_ns)


@cache
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _head(path: str) -> bytes:
    """A file's first 16 bytes, or none if it cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read(16)
    except OSError:
        return b""


def _array_initialiser(array: Any, label: str, path: str) -> Callable[..., np.ndarray]:
    """A Keras initialiser that returns ``array`` (read from the file only now), refusing
    one that holds NaN or infinity: every feature downstream of it would."""

    def initial(shape: tuple[int, ...], dtype: object = None) -> np.ndarray:
        values = np.asarray(array)
        # One pass, no copy: a sum is finite only if every value is.
        if not np.isfinite(np.sum(values, dtype=np.float64)):
            raise WeightsMismatchError(
                f"weights file {path} holds NaN or infinite values in {label}"
            )
        return values

    return initial


def _shapes(shapes: Iterable[Sequence[int]]) -> str:
    return ", ".join(str(tuple(shape)) for shape in shapes)


def _match(
    layers: list[Layer],
    stored: Sequence[StoredLayer],
    expected: dict[str, list[tuple[int, ...]]],
    architecture: Architecture,
    path: str,
) -> dict[str, StoredLayer]:
    """Each weighted layer's stored layer: the file's next of its kind, or fail naming it."""
    by_kind = {kind: [s for s in stored if s.kind == kind] for kind in ("conv", "norm", "dense")}
    file_convs = len(by_kind["conv"])
    file_depth = next((d for d, b in BLOCK_DEPTHS.items() if sum(b) == file_convs), None)
    _check_batch_norm(bool(by_kind["norm"]), file_depth, architecture, path)
    for_depth = f"; the file holds {file_convs} conv layers, " + (
        f"as VGG{file_depth} does (--depth {file_depth})" if file_depth else "as no VGG does"
    )
    dense = [layer for layer in architecture.layers if layer.kind == "dense"]
    upcoming = {kind: iter(queue) for kind, queue in by_kind.items()}
    chosen = {}
    for layer in layers:
        candidate = next(upcoming[layer.kind], None)
        if candidate is None:
            held = len(by_kind["dense"])
            hint = for_depth
            if layer.kind == "dense" and not held:
                hint = "; a no-top file serves cuts up to pool5 only"
            elif layer.kind == "dense":
                hint = f"; the file's classifier ends at {dense[held - 1].alias}"
            raise WeightsMismatchError(
                f"weights file {path} has no weights for {layer.name} ({layer.alias}){hint}"
            )
        shapes_fit = [tuple(a.shape) for a in candidate.arrays] == expected[layer.name]
        if not shapes_fit or candidate.name not in (None, layer.name):
            raise WeightsMismatchError(
                f"weights file {path} does not fit {architecture.name} at {layer.name} "
                f"({layer.alias}): the network expects "
                f"{_shapes(candidate.in_file_terms(expected[layer.name]))}, the file's "
                f"{candidate.label} has {_shapes(candidate.stored_shapes())}"
                + (for_depth if file_depth != architecture.depth else "")
            )
        chosen[layer.name] = candidate
    if file_convs != architecture.conv_count:
        raise WeightsMismatchError(f"weights file {path} is not for {architecture.name}{for_depth}")
    return chosen


def _check_batch_norm(
    file_has_norm: bool, file_depth: int | None, architecture: Architecture, path: str
) -> None:
    """Refuse batch norm in the file against none in the network, and the other way round,
    naming the network the file is for."""
    depth = file_depth or architecture.depth
    other_depth = f" and --depth {depth}" if depth != architecture.depth else ""
    if file_has_norm and not architecture.batch_norm:
        raise WeightsMismatchError(
            f"weights file {path} has batch norm after its convolutions (a vgg{depth}_bn "
            f"file); add --batch-norm{other_depth}"
        )
    if architecture.batch_norm and not file_has_norm:
        raise WeightsMismatchError(
            f"weights file {path} has no batch norm after its convolutions (a plain "
            f"vgg{depth} file); leave out --batch-norm"
            + (f", and use --depth {depth}" if other_depth else "")
        )
