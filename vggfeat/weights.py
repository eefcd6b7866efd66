"""Where the network's numbers come from, and the proof that every layer got its own.

Three sources: ``imagenet`` (the files Keras publishes, fetched once into
Keras's cache with Keras's own ``get_file`` and the published hashes),
``random`` (Keras's initialisers under a seed) and a path to a weights file in
the legacy Keras ``.h5`` layout or the Keras 3 ``.weights.h5`` layout.

A file is read here, not through Keras's load-by-name, which skips layers it
cannot match without a word: every layer of the cut model must find its
arrays, in order, with the right shapes, or loading fails naming the layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vggfeat.architecture import BLOCK_DEPTHS, Architecture, Layer
from vggfeat.errors import WeightsMismatchError, WeightsUnavailableError

if TYPE_CHECKING:
    import keras

WeightsKind = Literal["imagenet", "random", "file"]

_RELEASES = "https://storage.googleapis.com/tensorflow/keras-applications"


@dataclass(frozen=True)
class PublishedFile:
    """One ImageNet weight file that Keras publishes (legacy ``.h5`` layout)."""

    depth: int
    include_top: bool
    md5: str
    """The hash Keras's ``get_file`` checks, as ``keras.applications`` gives it."""
    approx_mb: int

    @property
    def fname(self) -> str:
        suffix = "" if self.include_top else "_notop"
        return f"vgg{self.depth}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"

    @property
    def url(self) -> str:
        return f"{_RELEASES}/vgg{self.depth}/{self.fname}"

    def cached_path(self) -> Path:
        return keras_cache_dir() / "models" / self.fname


PUBLISHED: dict[tuple[int, bool], PublishedFile] = {
    (f.depth, f.include_top): f
    for f in (
        PublishedFile(16, True, "64373286793e3c8b2b4e3219cbf3544b", 528),
        PublishedFile(16, False, "6d6bbae143d832006294945121d1f1fc", 58),
        PublishedFile(19, True, "cbe5617147190e668d6c5d5026f83318", 549),
        PublishedFile(19, False, "253f8cb515780f3b799900260a226db6", 80),
    )
}


@dataclass(frozen=True)
class WeightsRecord:
    """What was loaded, for the output file's attributes."""

    kind: WeightsKind
    file: str
    """The file's name ('' for random weights)."""
    sha256: str
    """SHA-256 of the file ('' for random weights)."""
    seed: int | None = None


@dataclass(frozen=True)
class StoredLayer:
    """One layer's arrays as a weights file holds them (NumPy arrays, or h5py datasets
    inside ``weights_in_file``)."""

    label: str
    """Where it is in the file, e.g. ``block1_conv1`` or ``layers/conv2d_3``."""
    name: str | None
    """The Keras layer name, where the layout records one."""
    arrays: tuple[np.ndarray, ...]

    @property
    def kind(self) -> str:
        return "conv" if self.arrays and self.arrays[0].ndim == 4 else "dense"


def keras_cache_dir() -> Path:
    """Keras's cache folder: ``$KERAS_HOME``, else ``~/.keras`` (``/tmp/.keras`` if ~ is read-only).

    Read at each call, unlike Keras's own setting, which is fixed at import.
    """
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"])
    home = Path("~").expanduser()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"


def published_file(architecture: Architecture, include_top: bool) -> PublishedFile:
    """The ImageNet file for a network, the no-top one when no classifier layer is needed."""
    try:
        return PUBLISHED[architecture.depth, include_top]
    except KeyError:
        raise WeightsUnavailableError(
            f"Keras publishes no ImageNet weights for {architecture.name} (only VGG16 and "
            "VGG19); use --weights PATH with a file of your own, or --weights random"
        ) from None


@dataclass(frozen=True)
class PreparedWeights:
    """A weights file read once, to be given to networks elsewhere (Ray actors, say)."""

    record: WeightsRecord
    layers: tuple[StoredLayer, ...]

    @classmethod
    def read(
        cls, architecture: Architecture, needs_top: bool, weights: str | os.PathLike
    ) -> PreparedWeights:
        """The ImageNet file (fetched into Keras's cache if missing) or a file, read."""
        named = identify_weights(architecture, needs_top, weights)
        if named.kind == "imagenet":
            path = fetch_imagenet(published_file(architecture, needs_top))
        else:
            path = Path(weights)
        record = WeightsRecord(named.kind, path.name, file_sha256(path))
        return cls(record, tuple(read_weights_file(path)))

    def digest(self) -> str:
        """SHA-256 of every array in order: what a receiver checks it got."""
        digest = hashlib.sha256()
        for layer in self.layers:
            for array in layer.arrays:
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


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
    to a weights file, or one already read. A file's arrays become the
    variables' first values, read one layer at a time: never zeros first and
    the file's numbers copied over them, which held fc6's 411 MB three times.
    Raises ``WeightsMismatchError`` naming the first layer the file does not fit,
    before any variable is made.
    """
    layers = [
        layer
        for layer in architecture.layers[: architecture.layers.index(up_to) + 1]
        if layer.has_weights
    ]
    if isinstance(weights, PreparedWeights):
        path, record = Path(weights.record.file), weights.record
        source: contextlib.AbstractContextManager = contextlib.nullcontext(list(weights.layers))
    else:
        needs_top = any(layer.is_top for layer in layers)
        record = identify_weights(architecture, needs_top, weights, seed)
        if record.kind == "random":
            return architecture.build(image_size, up_to, seed, dtype), record
        if record.kind == "imagenet":
            path = fetch_imagenet(published_file(architecture, needs_top))
            record = WeightsRecord("imagenet", path.name, file_sha256(path))
        else:
            path = Path(weights)
        source = weights_in_file(path)
    with source as stored:
        expected = architecture.catalogue(image_size).weight_shapes()
        chosen = _match(layers, stored, expected, architecture, path)
        initial = {name: [_array_initialiser(a) for a in c.arrays] for name, c in chosen.items()}
        model = architecture.build(image_size, up_to, dtype=dtype, initial=initial)
    return model, record


def check_fits(architecture: Architecture, image_size: int, up_to: Layer, path: Path) -> None:
    """Raise ``WeightsMismatchError`` unless the file at ``path`` has the arrays every weighted
    layer through ``up_to`` needs; reads the file's layout only, not its numbers."""
    layers = [
        layer
        for layer in architecture.layers[: architecture.layers.index(up_to) + 1]
        if layer.has_weights
    ]
    with weights_in_file(path) as stored:
        _match(
            layers, stored, architecture.catalogue(image_size).weight_shapes(), architecture, path
        )


def _array_initialiser(array: Any) -> Callable[..., np.ndarray]:
    """A Keras initialiser that returns ``array`` (read from the file only now)."""

    def initial(shape: tuple[int, ...], dtype: object = None) -> np.ndarray:
        return np.asarray(array)

    return initial


def identify_weights(
    architecture: Architecture, needs_top: bool, weights: str | os.PathLike, seed: int = 0
) -> WeightsRecord:
    """What ``weights`` names, known before any network is built.

    An ImageNet file's hash is known only once it is fetched, so it is '' here.
    Raises for VGG11/13 ImageNet weights and for a file that does not exist.
    """
    if weights == "random":
        return WeightsRecord("random", "", "", seed)
    if weights == "imagenet":
        return WeightsRecord("imagenet", published_file(architecture, needs_top).fname, "")
    path = Path(weights)
    _require_file(path)
    return WeightsRecord("file", path.name, file_sha256(path))


def fetch_imagenet(published: PublishedFile) -> Path:
    """The path of a published file in Keras's cache, downloading it there if missing."""
    import keras

    cache = keras_cache_dir()
    try:
        # get_file reports its download on stdout, which carries only what a command prints.
        with contextlib.redirect_stdout(sys.stderr):
            path = Path(
                keras.utils.get_file(
                    published.fname,
                    origin=published.url,
                    file_hash=published.md5,
                    cache_subdir="models",
                    cache_dir=str(cache),
                )
            )
    except Exception as error:
        raise WeightsUnavailableError(
            f"ImageNet weights {published.fname} (about {published.approx_mb} MB) are not in "
            f"{cache / 'models'} and could not be downloaded ({error}); copy the file there "
            "from a machine with network access, or use --weights PATH or --weights random"
        ) from error
    return path


def read_weights_file(path: Path) -> list[StoredLayer]:
    """The weighted layers of a Keras weights file, in network order, read into memory."""
    with weights_in_file(path) as stored:
        return [
            StoredLayer(layer.label, layer.name, tuple(np.asarray(a) for a in layer.arrays))
            for layer in stored
        ]


@contextlib.contextmanager
def weights_in_file(path: Path) -> Iterator[list[StoredLayer]]:
    """The weighted layers of a Keras weights file, in network order, not read yet.

    Each array is an h5py dataset, read when used inside the block, so that a
    network takes its weights one layer at a time (fc6 alone is 411 MB).
    Reads the legacy ``.h5`` layout (root attribute ``layer_names``, also
    inside a whole-model file's ``model_weights`` group) and the Keras 3
    ``.weights.h5`` layout (``layers/conv2d_N/vars/K``, numbered by order).
    """
    import h5py

    _require_file(path)
    try:
        with h5py.File(path, "r") as file:
            root = file.get("model_weights", file)
            if "layer_names" in root.attrs:
                yield _read_legacy(root)
                return
            if isinstance(root.get("layers"), h5py.Group):
                yield _read_keras3(root["layers"], path)
                return
    except OSError as error:
        raise WeightsMismatchError(f"weights file {path} is not an HDF5 file: {error}") from error
    except (KeyError, ValueError) as error:
        raise WeightsMismatchError(
            f"weights file {path} is damaged or incomplete: {error}"
        ) from error
    raise WeightsMismatchError(
        f"weights file {path} is in neither Keras weights layout (legacy .h5 or Keras 3 "
        ".weights.h5); save it with model.save_weights()"
    )


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


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {path} does not exist; --weights takes imagenet, random or a path"
        )


def _text(value: bytes | str) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _read_legacy(root: Any) -> list[StoredLayer]:
    stored = []
    for raw_name in root.attrs["layer_names"]:
        name = _text(raw_name)
        group = root[name]
        weight_names = [_text(w) for w in group.attrs.get("weight_names", [])]
        if weight_names:
            arrays = tuple(group[w] for w in weight_names)
            stored.append(StoredLayer(name, name, arrays))
    return stored


_KERAS3_ENTRY = re.compile(r"(conv2d|dense)(?:_(\d+))?")


def _read_keras3(layers: Any, path: Path) -> list[StoredLayer]:
    entries: dict[str, list[tuple[int, str]]] = {"conv2d": [], "dense": []}
    for key, group in layers.items():
        match = _KERAS3_ENTRY.fullmatch(key)
        if match:
            entries[match[1]].append((int(match[2] or 0), key))
        elif "vars" in group and len(group["vars"]):
            raise WeightsMismatchError(
                f"weights file {path} holds a {key} layer with weights, which VGG has not"
            )
    stored = []
    for _, key in sorted(entries["conv2d"]) + sorted(entries["dense"]):
        variables = layers[key].get("vars", {})
        arrays = tuple(variables[k] for k in sorted(variables, key=int))
        stored.append(StoredLayer(f"layers/{key}", None, arrays))
    return stored


def _shapes(shapes: Iterable[Sequence[int]]) -> str:
    return ", ".join(str(tuple(shape)) for shape in shapes)


def _match(
    layers: list[Layer],
    stored: list[StoredLayer],
    expected: dict[str, list[tuple[int, ...]]],
    architecture: Architecture,
    path: Path,
) -> dict[str, StoredLayer]:
    """Each weighted layer's stored layer: the file's next of its kind, or fail naming it."""
    by_kind = {kind: [s for s in stored if s.kind == kind] for kind in ("conv", "dense")}
    file_convs = len(by_kind["conv"])
    file_depth = next((d for d, b in BLOCK_DEPTHS.items() if sum(b) == file_convs), None)
    for_depth = f"; the file holds {file_convs} conv layers, " + (
        f"as VGG{file_depth} does (--depth {file_depth})" if file_depth else "as no VGG does"
    )
    upcoming = {kind: iter(queue) for kind, queue in by_kind.items()}
    chosen = {}
    for layer in layers:
        candidate = next(upcoming[layer.kind], None)
        if candidate is None:
            no_top = layer.kind == "dense"
            hint = "; a no-top file serves cuts up to pool5 only" if no_top else for_depth
            raise WeightsMismatchError(
                f"weights file {path} has no weights for {layer.name} ({layer.alias}){hint}"
            )
        shapes_fit = [tuple(a.shape) for a in candidate.arrays] == expected[layer.name]
        if not shapes_fit or candidate.name not in (None, layer.name):
            raise WeightsMismatchError(
                f"weights file {path} does not fit {architecture.name} at {layer.name} "
                f"({layer.alias}): the network expects {_shapes(expected[layer.name])}, the "
                f"file's {candidate.label} has {_shapes(a.shape for a in candidate.arrays)}"
                + (for_depth if file_depth != architecture.depth else "")
            )
        chosen[layer.name] = candidate
    if file_convs != architecture.conv_count:
        raise WeightsMismatchError(f"weights file {path} is not for {architecture.name}{for_depth}")
    return chosen


def published_files(architecture: Architecture) -> list[PublishedFile]:
    """The ImageNet files Keras publishes for a network: none for VGG11 and VGG13."""
    return [f for f in PUBLISHED.values() if f.depth == architecture.depth]
