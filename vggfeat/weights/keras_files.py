"""Keras's weights files: the ImageNet files Keras publishes, and the layouts Keras writes.

The published files (VGG16 and VGG19, with and without the classifier) are
fetched once into Keras's cache with Keras's own ``get_file`` and the
published hashes. A file is read in the legacy ``.h5`` layout (the published
files' and ``save_weights`` to ``.h5``) or the Keras 3 ``.weights.h5`` layout,
here, not through Keras's load-by-name, which skips layers it cannot match
without a word.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vggfeat.architecture import Architecture
from vggfeat.errors import WeightsMismatchError, WeightsUnavailableError
from vggfeat.weights.stored import StoredLayer

#: The first bytes of every HDF5 file (without a user block).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

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
            "VGG19); use --weights timm (torchvision's ImageNet weights, as timm publishes "
            "them), --weights PATH with a file of your own, or --weights random"
        ) from None


def fetch_imagenet(
    published: PublishedFile,
    announce: Callable[[str], None] | None = None,
    backend: str | None = None,
) -> Path:
    """The path of a published file in Keras's cache, downloading it there if missing."""
    return fetch(
        published.fname,
        published.url,
        published.md5,
        f"the ImageNet file {published.fname} (about {published.approx_mb} MB)",
        announce,
        backend,
    )


def fetch(
    fname: str,
    url: str,
    md5: str | None,
    what: str,
    announce: Callable[[str], None] | None = None,
    backend: str | None = None,
) -> Path:
    """The path of ``fname`` in Keras's cache folder ``models``, downloaded from ``url`` by
    Keras's ``get_file`` if missing (and checked against ``md5``, where one is published).

    A download is reported to ``announce`` as one line, before it starts; without one,
    Keras's own report and progress go to standard error. Keras is started on
    ``backend`` (the run's: a process holds one), else on the one it runs on.
    Raises ``WeightsUnavailableError`` naming ``what``, the folder and the way out.
    """
    from vggfeat.runtime import keras_module, start

    keras = start(backend) if backend else keras_module()
    cache = keras_cache_dir()
    report: Any = sys.stderr
    if announce is not None:
        report = open(os.devnull, "w")  # noqa: SIM115 (closed below)
        if not (cache / "models" / fname).is_file():
            announce(f"downloading {what} from {url} into {cache / 'models'}")
    try:
        # get_file reports its download on stdout, which carries only what a command prints.
        with contextlib.redirect_stdout(report):
            path = Path(
                keras.utils.get_file(
                    fname, origin=url, file_hash=md5, cache_subdir="models", cache_dir=str(cache)
                )
            )
    except Exception as error:
        raise WeightsUnavailableError(
            f"{what} is not in {cache / 'models'} and could not be downloaded from {url} "
            f"({error}); copy the file there from a machine with network access, or use "
            "--weights PATH or --weights random"
        ) from error
    finally:
        if report is not sys.stderr:
            report.close()
    return path


@contextlib.contextmanager
def keras_layers(path: Path) -> Iterator[list[StoredLayer]]:
    """The weighted layers of a Keras weights file, in network order, not read yet.

    Each array is an h5py dataset, read when used inside the block, so that a
    network takes its weights one layer at a time (fc6 alone is 411 MB).
    Reads the legacy ``.h5`` layout (root attribute ``layer_names``, also
    inside a whole-model file's ``model_weights`` group) and the Keras 3
    ``.weights.h5`` layout (``layers/conv2d_N/vars/K``, numbered by order).
    """
    import h5py

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


_KERAS3_ENTRY = re.compile(r"(conv2d|batch_normalization|dense)(?:_(\d+))?")


def _read_keras3(layers: Any, path: Path) -> list[StoredLayer]:
    """Layers by class, each class numbered in the order the model made them; the kinds
    are matched apart, so their order against each other does not matter."""
    entries: dict[str, list[tuple[int, str]]] = {
        "conv2d": [],
        "batch_normalization": [],
        "dense": [],
    }
    for key, group in layers.items():
        match = _KERAS3_ENTRY.fullmatch(key)
        if match:
            entries[match[1]].append((int(match[2] or 0), key))
        elif "vars" in group and len(group["vars"]):
            raise WeightsMismatchError(
                f"weights file {path} holds a {key} layer with weights, which VGG has not"
            )
    stored = []
    for _, key in [entry for kind in entries.values() for entry in sorted(kind)]:
        variables = layers[key].get("vars", {})
        arrays = tuple(variables[k] for k in sorted(variables, key=int))
        stored.append(StoredLayer(f"layers/{key}", None, arrays))
    return stored


def published_files(architecture: Architecture) -> list[PublishedFile]:
    """The ImageNet files Keras publishes for a network: none for VGG11 and VGG13, and none
    with batch norm."""
    if architecture.batch_norm:
        return []
    return [f for f in PUBLISHED.values() if f.depth == architecture.depth]
