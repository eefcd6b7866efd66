"""The output file: its HDF5 layout, committed appends in place, and lazy reading.

Format 3 (a contract; README.md documents it)::

    /paths                (N,) UTF-8 strings of fixed width: each row's image, relative to
                          the folder holding the file, or absolute when it lies elsewhere
    /features/<name>      (N, ...) float32 or float16, one dataset per requested layer
    /source/size          (N,) int64, each file's size in bytes when it was read
    /source/mtime_ns      (N,) int64, its modification time, ns since the epoch
    /failed/paths         (M,) UTF-8 strings of fixed width, files that could not be used
    /failed/reasons       (M,) UTF-8 strings of fixed width, why, in words
    /failed/size, /failed/mtime_ns   (M,) int64, as for rows (-1 where unknown)
    /committed            (2,) int64: N and M, the rows and failures the file holds

Appending happens in place, so continuing a file of n rows with k new images
writes O(k) bytes. The file is opened for HDF5's single-writer/multiple-reader
(SWMR) mode, in which HDF5 orders its metadata writes so that the file stays
readable at every moment; a commit appends the data, flushes, then writes
``/committed`` and flushes again. A kill at any moment leaves a readable file
holding exactly the committed rows, plus, at worst, dead rows past
``/committed`` that the next writer cuts off. (Without SWMR ordering, kills
during appends left unreadable chunks in measurements here.)

A killed SWMR writer leaves HDF5's "open for writing" flag in the file; until
the next writer clears it, plain ``h5py.File`` refuses the file, and readers
open it with ``swmr=True``, as ``vggfeat.open`` does. Strings are of fixed
width because SWMR cannot append variable-length data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vggfeat.errors import VggfeatError

FORMAT_VERSION = 3
#: Widths in bytes /paths can have: the smallest that fits the longest path is chosen.
PATH_WIDTHS = (256, 1024, 4096)
REASON_WIDTH = 512
#: Target bytes per HDF5 chunk of features: big enough for fast appends, small for reads.
CHUNK_BYTES = 1 << 20
STRING_CHUNK_ROWS = 4096
#: Bytes of rows held in memory at once when copying a file.
COPY_BYTES = 64 << 20


class OutputError(VggfeatError):
    """An output that cannot be written, continued, locked or read."""


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
    compute_dtype: str
    dtype: str

    def differences(self, other: Settings, where: str = "in the file") -> list[str]:
        """Each setting that differs, as '--option our-value in the file, other-value now'."""
        ours, theirs = asdict(self), asdict(other)
        if self.weights != "random":
            del ours["seed"], theirs["seed"]  # a seed means nothing to other weights
        return [
            f"{_OPTIONS[key]} {_shown(ours[key])} {where}, {_shown(theirs[key])} now"
            for key in ours
            if ours[key] != theirs[key]
        ]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Settings:
        """Settings as ``asdict`` gave them, after a trip through JSON."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


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
    "compute_dtype": "computing in (--precision, --backend and the device decide)",
    "dtype": "--dtype",
}


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple | list) else str(value) or "none"


@dataclass(frozen=True)
class FeatureSet:
    """One dataset of the output: its name, the Keras layer, pooling, and per-image shape."""

    name: str
    keras_layer: str
    pooling: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """What a new output file is made of: settings, datasets and the run's attributes."""

    settings: Settings
    feature_sets: tuple[FeatureSet, ...]
    compression: str
    attributes: dict[str, Any]

    @property
    def row_bytes(self) -> int:
        itemsize = np.dtype(self.settings.dtype).itemsize
        return sum(math.prod(fs.shape) * itemsize for fs in self.feature_sets)


@dataclass(frozen=True)
class Rows:
    """Rows and failures on their way into a file; ``paths`` are stored paths (keys)."""

    paths: list[str]
    size: np.ndarray
    mtime_ns: np.ndarray
    features: tuple[np.ndarray, ...]
    """One (len(paths), ...) array per feature set."""
    failed_paths: list[str]
    failed_reasons: list[str]
    failed_size: np.ndarray
    failed_mtime_ns: np.ndarray

    @property
    def keys(self) -> list[str]:
        return [*self.paths, *self.failed_paths]

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


def path_width(longest: int) -> int:
    """The width /paths needs for a path of ``longest`` UTF-8 bytes."""
    for width in PATH_WIDTHS:
        if longest <= width:
            return width
    raise OutputError(f"a path of {longest:,} bytes is longer than any file system allows")


def encoded_length(paths: Sequence[str]) -> int:
    return max((len(p.encode()) for p in paths), default=0)


# Writing --------------------------------------------------------------------------------


def create(path: os.PathLike | str, layout: Layout, width: int) -> None:
    """Write an empty output file with every dataset and attribute, ready for appending."""
    import h5py

    text = h5py.string_dtype("utf-8", width)
    reasons = h5py.string_dtype("utf-8", REASON_WIDTH)
    strings = {"compression": "gzip", "compression_opts": 1}
    with h5py.File(path, "w", libver="latest") as file:
        file.attrs["format"] = "vggfeat"
        file.attrs["format_version"] = FORMAT_VERSION
        file.attrs["settings"] = json.dumps(asdict(layout.settings))
        for key, value in {**asdict(layout.settings), **layout.attributes}.items():
            file.attrs[key] = value
        file.create_dataset(
            "paths", (0,), text, maxshape=(None,), chunks=(STRING_CHUNK_ROWS,), **strings
        )
        file.create_dataset("failed/paths", (0,), text, maxshape=(None,), chunks=(1024,), **strings)
        file.create_dataset(
            "failed/reasons", (0,), reasons, maxshape=(None,), chunks=(1024,), **strings
        )
        for name in ("source/size", "source/mtime_ns", "failed/size", "failed/mtime_ns"):
            file.create_dataset(name, (0,), np.int64, maxshape=(None,), chunks=(4096,))
        dtype = np.dtype(layout.settings.dtype)
        options = {} if layout.compression == "none" else {"compression": layout.compression}
        for feature_set in layout.feature_sets:
            shape = tuple(feature_set.shape)
            rows = max(1, min(1024, CHUNK_BYTES // (math.prod(shape) * dtype.itemsize)))
            dataset = file.create_dataset(
                f"features/{feature_set.name}",
                (0, *shape),
                dtype,
                maxshape=(None, *shape),
                chunks=(rows, *shape),
                **options,
            )
            dataset.attrs["keras_layer"] = feature_set.keras_layer
            dataset.attrs["pooling"] = feature_set.pooling
        file.create_dataset("committed", data=np.zeros(2, np.int64))


class OutputWriter:
    """Adds rows to an output file opened for SWMR writing; ``commit`` makes them count.

    A row or failure whose path is already in the file replaces it in place;
    anything new is appended. A path moving between rows and failures cannot
    be done in place: ``moves`` finds those, and the caller rebuilds instead.
    """

    def __init__(self, file) -> None:
        self.file = file
        self.rows, self.failures = (int(n) for n in file["committed"][()])
        self.names = feature_names(file)
        self.features = [file[f"features/{name}"] for name in self.names]
        for name in ("paths", "source/size", "source/mtime_ns", *self._feature_names()):
            _truncate(file[name], self.rows)
        for name in ("failed/paths", "failed/reasons", "failed/size", "failed/mtime_ns"):
            _truncate(file[name], self.failures)
        self.width = file["paths"].dtype.itemsize
        self.row_of = {p: i for i, p in enumerate(read_strings(file["paths"], self.rows))}
        self.failure_of = {
            p: i for i, p in enumerate(read_strings(file["failed/paths"], self.failures))
        }

    def _feature_names(self) -> list[str]:
        return [f"features/{name}" for name in self.names]

    def moves(self, keys_rows: Sequence[str], keys_failed: Sequence[str]) -> set[str]:
        """Paths that would move from failures to rows or back."""
        return {p for p in keys_rows if p in self.failure_of} | {
            p for p in keys_failed if p in self.row_of
        }

    def add(self, rows: Rows) -> None:
        """Write ``rows``, replacing known paths in place; not counted until ``commit``."""
        if encoded_length(rows.keys) > self.width:
            raise OutputError("internal: a path is wider than /paths; rebuild the file")
        if self.moves(rows.paths, rows.failed_paths):
            raise OutputError("internal: a path moves between rows and failures; rebuild")
        file = self.file
        row_columns = [file["paths"], file["source/size"], file["source/mtime_ns"], *self.features]
        row_values = [_encoded(rows.paths), rows.size, rows.mtime_ns, *rows.features]
        self.rows += _place(row_columns, row_values, rows.paths, self.row_of, self.rows)
        failed_columns = [file[f"failed/{n}"] for n in ("paths", "reasons", "size", "mtime_ns")]
        failed_values = [
            _encoded(rows.failed_paths),
            _encoded([_fit(reason) for reason in rows.failed_reasons]),
            rows.failed_size,
            rows.failed_mtime_ns,
        ]
        self.failures += _place(
            failed_columns, failed_values, rows.failed_paths, self.failure_of, self.failures
        )

    def commit(self) -> None:
        """Make everything added count: data first, then the counts readers trust."""
        self.file.flush()
        self.file["committed"][...] = np.array([self.rows, self.failures], np.int64)
        self.file.flush()


def _place(columns, values, keys: list[str], index: dict[str, int], count: int) -> int:
    """Replace the rows of known ``keys`` in place, append the rest; how many were appended."""
    if not keys:
        return 0
    known = np.array([key in index for key in keys], bool)
    fresh = ~known
    appended = int(fresh.sum())
    # Paths last: a reader that looks at /paths alone never sees a row without its features.
    for column, value in sorted(
        zip(columns, values, strict=True), key=lambda c: c[0] is columns[0]
    ):
        # Fixed-width UTF-8 strings convert only from bytes of the dataset's own type.
        value = np.asarray(value, column.dtype if column.dtype.kind == "S" else None)
        if known.any():
            targets = np.array([index[key] for key, k in zip(keys, known, strict=True) if k])
            order = np.argsort(targets)
            column[targets[order].tolist()] = value[known][order]
        if appended:
            column.resize(count + appended, axis=0)
            column[count:] = value[fresh]
    for offset, key in enumerate(k for k, new in zip(keys, fresh, strict=True) if new):
        index[key] = count + offset
    return appended


def _truncate(dataset, count: int) -> None:
    if len(dataset) != count:
        dataset.resize(count, axis=0)


def _encoded(values: Sequence[str]) -> list[bytes]:
    return [value.encode() for value in values]


def _fit(reason: str) -> str:
    """A reason cut to the stored width, on a character boundary."""
    data = reason.encode()
    if len(data) <= REASON_WIDTH:
        return reason
    return data[: REASON_WIDTH - 3].decode(errors="ignore") + "..."


@contextmanager
def writing(path: os.PathLike | str) -> Iterator[OutputWriter]:
    """The output at ``path`` open for appending in place, as an ``OutputWriter``."""
    import h5py

    try:
        try:
            file = h5py.File(path, "r+", libver="latest")
        except OSError as error:
            if "already open for write" not in str(error):
                raise
            _clear_open_flag(path)
            file = h5py.File(path, "r+", libver="latest")
    except OSError as error:
        if "unable to lock file" not in str(error):
            raise
        raise OutputError(
            f"{path} is open in another program, whose HDF5 lock keeps it from being "
            "changed; close that program (vggfeat.open and vggfeat export do not lock) and "
            "run the same command again: completed work is kept"
        ) from None
    try:
        file.swmr_mode = True
        yield OutputWriter(file)
    finally:
        file.close()


def _clear_open_flag(path: os.PathLike | str) -> None:
    """Clear the flag a killed writer left, as HDF5's own ``h5clear -s`` does."""
    import h5py

    library = _hdf5_library()
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    clear = ctypes.c_bool(True)
    if library is None or library.H5Pset(
        ctypes.c_int64(fapl.id), b"clear_status_flags", ctypes.byref(clear)
    ):
        raise OutputError(
            f"output {path} was left open by a killed writer and this HDF5 library cannot "
            f"mark it closed; run 'h5clear -s {path}' and the same command again"
        )
    h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl).close()


def _hdf5_library() -> ctypes.CDLL | None:
    """The HDF5 library h5py runs on (the one in h5py's wheel, else the system's)."""
    import h5py

    bundled = glob.glob(
        os.path.join(os.path.dirname(h5py.__file__), "..", "h5py.libs", "libhdf5-*")
    )
    candidates = [*bundled, ctypes.util.find_library("hdf5")]
    for candidate in candidates:
        if candidate:
            try:
                return ctypes.CDLL(candidate)
            except OSError:
                continue
    return None


# Reading --------------------------------------------------------------------------------


def open_hdf5(path: os.PathLike | str):
    """An h5py file for reading, also while a writer appends or after one was killed."""
    import h5py

    # Without HDF5's lock: a reader must never keep a run from appending. (Opened plainly
    # first: SWMR reading would not notice a truncated file.)
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as error:
        if "already open for write" not in str(error):
            raise
        return h5py.File(path, "r", swmr=True, locking=False)


def feature_names(file) -> list[str]:
    """The names of a file's feature datasets, in the order of its --layer options."""
    return list(json.loads(file.attrs["settings"])["layers"])


def committed(file) -> tuple[int, int]:
    """(rows, failures) a file holds; older formats hold exactly their datasets' lengths."""
    if "committed" not in file:
        return len(file["paths"]), len(file["failed/paths"])
    rows, failures = (int(count) for count in file["committed"][()])
    if not (0 <= rows <= len(file["paths"]) and 0 <= failures <= len(file["failed/paths"])):
        raise ValueError(f"/committed says {rows} rows and {failures} failures, more than held")
    return rows, failures


def read_strings(dataset, count: int) -> list[str]:
    """The first ``count`` strings of a dataset, read in blocks."""
    values: list[str] = []
    for start in range(0, count, 65536):
        values.extend(decode_strings(dataset[start : min(count, start + 65536)]))
    return values


def decode_strings(raw: np.ndarray | list) -> list[str]:
    values = raw.tolist() if isinstance(raw, np.ndarray) else raw
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def stamps(file, group: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Sizes and modification times of a file's rows (group "source") or failures ("failed")."""
    if f"{group}/size" in file:
        return file[f"{group}/size"][:count], file[f"{group}/mtime_ns"][:count]
    return np.full(count, -1, np.int64), np.full(count, -1, np.int64)


def blocks(file, names: Sequence[str], rows: int, row_bytes: int) -> Iterator[Rows]:
    """A file's rows, without failures, in blocks of at most ``COPY_BYTES``."""
    step = max(1, COPY_BYTES // max(1, row_bytes))
    sizes, times = stamps(file, "source", rows)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        yield Rows(
            paths=decode_strings(file["paths"][start:stop]),
            size=sizes[start:stop],
            mtime_ns=times[start:stop],
            features=tuple(file[f"features/{name}"][start:stop] for name in names),
            failed_paths=[],
            failed_reasons=[],
            failed_size=np.zeros(0, np.int64),
            failed_mtime_ns=np.zeros(0, np.int64),
        )


class Column:
    """Rows of one dataset read on demand: ``len``, an index, a slice or an index list.

    Spans the committed rows of the output and, for an unfinished run, the rows
    committed in parts so far, without reading anything until indexed.
    """

    def __init__(
        self, segments: Sequence[tuple[int, Callable[[slice], Any]]], convert=None
    ) -> None:
        self._segments = list(segments)
        self._convert = convert
        self._length = sum(count for count, _ in self._segments)

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        step = 4096
        for start in range(0, len(self), step):
            yield from self[start : start + step]

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, stride = index.indices(len(self))
            if stride != 1:
                return self[range(start, stop, stride)]
            return self._slice(start, stop)
        if isinstance(index, int | np.integer):
            position = int(index) + len(self) if index < 0 else int(index)
            if not 0 <= position < len(self):
                raise IndexError(f"row {index} is out of range for {len(self)} rows")
            return self._slice(position, position + 1)[0]
        picked = [self[int(i)] for i in index]
        if self._convert is not None:
            return picked
        return np.stack(picked) if picked else self._slice(0, 0)

    def __array__(self, dtype=None, copy=None):
        values = np.asarray(self[:])
        return values.astype(dtype) if dtype is not None else values

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *np.shape(self._slice(0, min(1, len(self))))[1:])

    def _slice(self, start: int, stop: int):
        pieces = []
        offset = 0
        for count, read in self._segments:
            low, high = max(start, offset), min(stop, offset + count)
            if low < high:
                pieces.append(read(slice(low - offset, high - offset)))
            offset += count
        if self._convert is not None:
            return [value for piece in pieces for value in self._convert(piece)]
        if not pieces:
            return self._segments[0][1](slice(0, 0)) if self._segments else np.zeros(0)
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
