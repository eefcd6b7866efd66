"""The HDF5 output: its format, written batch by batch, continued, and read back.

Layout (a contract; README.md documents it)::

    /paths                (N,) UTF-8 strings, row i of every feature set belongs to paths[i]
    /features/<name>      (N, ...) float32 or float16, one dataset per requested layer
    /failed/paths         (M,) UTF-8 strings, files that could not be used
    /failed/reasons       (M,) UTF-8 strings, why, in words

Root attributes record everything needed to reproduce or continue the run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vggfeat.errors import VggfeatError
from vggfeat.images import Failure, describe_path

FORMAT_VERSION = 1
COMPRESSIONS = ("none", "lzf", "gzip")
STORED_DTYPES = ("float32", "float16")
#: Target bytes per HDF5 chunk of features: big enough for fast appends, small for reads.
CHUNK_BYTES = 1 << 20


class OutputError(VggfeatError):
    """An output file that cannot be written, or cannot be continued with these settings."""


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers in a file; a continued run must match it."""

    depth: int
    layers: tuple[str, ...]
    pooling: str
    weights: str
    weights_file: str
    weights_sha256: str
    seed: int
    image_size: int
    resize: str
    precision: str
    dtype: str

    def differences(self, other: Settings) -> list[str]:
        """Each setting that differs, as '--option file-value in the file, other-value now'."""
        ours, theirs = asdict(self), asdict(other)
        return [
            f"{_OPTIONS[key]} {_shown(ours[key])} in the file, {_shown(theirs[key])} now"
            for key in ours
            if ours[key] != theirs[key]
        ]


_OPTIONS = {
    "depth": "--depth",
    "layers": "--layer",
    "pooling": "--pool",
    "weights": "--weights",
    "weights_file": "weights file",
    "weights_sha256": "weights SHA-256",
    "seed": "--seed",
    "image_size": "--image-size",
    "resize": "--resize",
    "precision": "--precision",
    "dtype": "--dtype",
}


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple | list) else str(value) or "none"


@dataclass(frozen=True)
class FeatureSet:
    """One dataset to create: its name, the Keras layer, pooling, and per-image shape."""

    name: str
    keras_layer: str
    pooling: str
    shape: tuple[int, ...]


class FeatureStore:
    """An open output file that rows are appended to, in order, batch by batch."""

    def __init__(self, file, path: Path, names: Sequence[str], created: bool) -> None:
        self._file = file
        self.path = path
        self.created = created
        # HDF5 lists a group's members alphabetically; rows follow the requested order.
        self._features = [file["features"][name] for name in names]

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        settings: Settings,
        feature_sets: Sequence[FeatureSet],
        attributes: dict[str, Any],
        compression: str = "none",
        overwrite: bool = False,
    ) -> FeatureStore:
        """Create ``path``, or open it to continue when its settings match.

        Raises ``OutputError`` when the file cannot be written, is not a
        vggfeat file, or was written with other settings (unless ``overwrite``).
        """
        import h5py

        path = Path(path)
        if path.is_dir():
            raise OutputError(
                f"output {path} is a folder; give a file name such as {path / 'features.h5'}"
            )
        exists = path.exists() and not overwrite
        if exists and not h5py.is_hdf5(path):
            raise OutputError(
                f"output {path} exists and is not a vggfeat file; "
                "choose another -o, or --overwrite to replace it"
            )
        try:
            file = h5py.File(path, "r+" if exists else "w")
        except (OSError, BlockingIOError) as error:
            raise OutputError(_unwritable(path, error)) from error
        try:
            if exists:
                _check_continues(file, path, settings)
            else:
                _create(file, settings, feature_sets, attributes, compression)
        except BaseException:
            file.close()
            raise
        return cls(file, path, settings.layers, created=not exists)

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        """Record facts known only once the network is built (versions, weights hash)."""
        for key, value in attributes.items():
            self._file.attrs[key] = value

    @property
    def done(self) -> set[str]:
        """Paths already stored or recorded as failed: a continued run skips them."""
        paths = self._file["paths"].asstr()[()]
        failed = self._file["failed/paths"].asstr()[()]
        return {*paths, *failed}

    @property
    def rows(self) -> int:
        return len(self._file["paths"])

    def append(self, paths: Sequence[str], features: Sequence[np.ndarray]) -> None:
        """Add one row per path; ``features`` holds one (len(paths), ...) array per set."""
        start = self.rows
        end = start + len(paths)
        for dataset, values in zip(self._features, features, strict=True):
            dataset.resize(end, axis=0)
            dataset[start:end] = values
        self._extend(self._file["paths"], [describe_path(p) for p in paths])
        self._file.flush()

    def add_failures(self, failures: Sequence[Failure]) -> None:
        if not failures:
            return
        self._extend(self._file["failed/paths"], [describe_path(f.path) for f in failures])
        self._extend(self._file["failed/reasons"], [f.reason for f in failures])
        self._file.flush()

    @staticmethod
    def _extend(dataset, values: list[str]) -> None:
        start = len(dataset)
        dataset.resize(start + len(values), axis=0)
        dataset[start:] = values

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        """Close, and delete the file if this run created it: for a run that never started."""
        self.close()
        if self.created:
            self.path.unlink(missing_ok=True)


def _create(file, settings: Settings, feature_sets, attributes, compression: str) -> None:
    import h5py

    text = h5py.string_dtype("utf-8")
    file.attrs["format"] = "vggfeat"
    file.attrs["format_version"] = FORMAT_VERSION
    file.attrs["settings"] = json.dumps(asdict(settings))
    for key, value in {**asdict(settings), **attributes}.items():
        file.attrs[key] = list(value) if isinstance(value, tuple) else value
    file.create_dataset("paths", (0,), text, maxshape=(None,), chunks=(4096,))
    failed = file.create_group("failed")
    for name in ("paths", "reasons"):
        failed.create_dataset(name, (0,), text, maxshape=(None,), chunks=(1024,))
    group = file.create_group("features")
    dtype = np.dtype(settings.dtype)
    options = {} if compression == "none" else {"compression": compression}
    for feature_set in feature_sets:
        row_bytes = math.prod(feature_set.shape) * dtype.itemsize
        rows = max(1, min(1024, CHUNK_BYTES // row_bytes))
        dataset = group.create_dataset(
            feature_set.name,
            (0, *feature_set.shape),
            dtype,
            maxshape=(None, *feature_set.shape),
            chunks=(rows, *feature_set.shape),
            **options,
        )
        dataset.attrs["keras_layer"] = feature_set.keras_layer
        dataset.attrs["pooling"] = feature_set.pooling
    file.flush()


def _check_continues(file, path: Path, settings: Settings) -> None:
    if file.attrs.get("format") != "vggfeat":
        raise OutputError(
            f"output {path} exists and is not a vggfeat file; "
            "choose another -o, or --overwrite to replace it"
        )
    stored = Settings(
        **{
            key: tuple(value) if isinstance(value, list) else value
            for key, value in json.loads(file.attrs["settings"]).items()
        }
    )
    differences = stored.differences(settings)
    if differences:
        raise OutputError(
            f"output {path} was written with other settings ({'; '.join(differences)}); "
            "run with the file's settings to continue it, --overwrite to replace it, "
            "or -o for a new file"
        )


def _unwritable(path: Path, error: BaseException) -> str:
    parent = path.parent
    if not parent.exists():
        return f"cannot write output {path}: folder {parent} does not exist"
    if "lock" in str(error).lower():
        return f"cannot write output {path}: it is open in another program ({error})"
    return f"cannot write output {path}: {error}"


@dataclass(frozen=True)
class Features:
    """A vggfeat file read back: rows aligned with paths, plus failures and settings."""

    paths: list[str]
    features: dict[str, np.ndarray]
    failed: dict[str, str]
    attributes: dict[str, Any]

    def __iter__(self):
        """``paths, features = vggfeat.load(path)``."""
        return iter((self.paths, self.features))


def load(path: str | os.PathLike) -> Features:
    """Read a vggfeat HDF5 file into memory.

    ``paths`` has one entry per row; ``features[name]`` is an (N, ...) array
    per stored layer; ``failed`` maps each unusable file to its reason.
    """
    import h5py

    with h5py.File(path, "r") as file:
        return Features(
            paths=list(file["paths"].asstr()[()]),
            features={name: dataset[()] for name, dataset in file["features"].items()},
            failed=dict(
                zip(
                    file["failed/paths"].asstr()[()],
                    file["failed/reasons"].asstr()[()],
                    strict=True,
                )
            ),
            attributes={
                key: value.decode() if isinstance(value, bytes) else value
                for key, value in file.attrs.items()
            },
        )
