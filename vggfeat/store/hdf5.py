"""The output file: its HDF5 layout, committed appends in place, and reading it.

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
    /runs                 (R,) UTF-8 JSON objects of fixed width, one per run that wrote
                          rows: when, what computed them, the command, rows added
                          (added in vggfeat 0.2; an older file gains it when continued)

Appending happens in place, so continuing a file of n rows with k new images
writes O(k) bytes. The file is opened for HDF5's single-writer/multiple-reader
(SWMR) mode, in which HDF5 orders its metadata writes so that the file stays
readable at every moment; a commit appends the data, flushes, then writes
``/committed`` and flushes again. A kill at any moment leaves a readable file
holding exactly the committed rows, plus, at worst, dead rows past
``/committed`` that the next writer cuts off.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy as np

from vggfeat.errors import OptionError, OutputError
from vggfeat.heads import Pooling
from vggfeat.store.identity import Stamp
from vggfeat.store.layout import Layout, Rows
from vggfeat.text import storable

FORMAT_VERSION = 3
#: Widths in bytes /paths can have: the smallest that fits the longest path is chosen.
PATH_WIDTHS = (256, 1024, 4096)
REASON_WIDTH = 512
RUN_WIDTH = 4096
#: h5py's objects, which have no type information of their own.
H5File = Any
H5Dataset = Any
#: Target bytes per HDF5 chunk of features: big enough for fast appends, small for reads.
CHUNK_BYTES = 1 << 20
STRING_CHUNK_ROWS = 4096
#: Bytes of rows held in memory at once when copying a file.
COPY_BYTES = 64 << 20


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

    text = _text(width)
    reasons = _text(REASON_WIDTH)
    strings = {"compression": "gzip", "compression_opts": 1}
    with h5py.File(path, "w", libver="latest") as file:
        file.attrs["format"] = "vggfeat"
        file.attrs["format_version"] = FORMAT_VERSION
        file.attrs["settings"] = json.dumps(asdict(layout.settings))
        for key, value in {**asdict(layout.settings), **layout.attributes}.items():
            # A flag as a number: HDF5 has no boolean, and h5py's enum puzzles other readers.
            file.attrs[key] = (
                storable(value)
                if isinstance(value, str)
                else int(value)
                if isinstance(value, bool)
                else value
            )
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
        for spec in layout.layers:
            rows = max(1, min(1024, CHUNK_BYTES // (math.prod(spec.shape) * dtype.itemsize)))
            dataset = file.create_dataset(
                f"features/{spec.name}",
                (0, *spec.shape),
                dtype,
                maxshape=(None, *spec.shape),
                chunks=(rows, *spec.shape),
                **options,
            )
            dataset.attrs["keras_layer"] = spec.keras_layer
            head = Pooling.parse(spec.pooling)
            for key, value in head.attributes(layout.map_shape(spec)).items():
                dataset.attrs[key] = value
        file.create_dataset("committed", data=np.zeros(2, np.int64))
        _create_runs(file)


def _create_runs(file: H5File) -> None:
    file.create_dataset(
        "runs",
        (0,),
        _text(RUN_WIDTH),
        maxshape=(None,),
        chunks=(16,),
        compression="gzip",
        compression_opts=1,
    )


class Appender:
    """Adds rows to an output file opened for SWMR writing; ``commit`` makes them count.

    A row or failure whose path is already in the file replaces it in place;
    anything new is appended. A path moving between rows and failures cannot
    be done in place: ``moves`` finds those, and the caller rebuilds instead.
    """

    def __init__(self, file: H5File) -> None:
        self.file = file
        self.rows, self.failures = (int(n) for n in file["committed"][()])
        self.names = layer_names(file)
        self.features = [file[f"features/{name}"] for name in self.names]
        for dataset in (file["paths"], file["source/size"], file["source/mtime_ns"]):
            _truncate(dataset, self.rows)
        for dataset in self.features:
            _truncate(dataset, self.rows)
        for name in ("failed/paths", "failed/reasons", "failed/size", "failed/mtime_ns"):
            _truncate(file[name], self.failures)
        self.width = text_width(file["paths"])
        self.row_of = {p: i for i, p in enumerate(read_strings(file["paths"], self.rows))}
        self.failure_of = {
            p: i for i, p in enumerate(read_strings(file["failed/paths"], self.failures))
        }

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
            _encoded([_fit(reason, REASON_WIDTH) for reason in rows.failed_reasons]),
            rows.failed_size,
            rows.failed_mtime_ns,
        ]
        self.failures += _place(
            failed_columns, failed_values, rows.failed_paths, self.failure_of, self.failures
        )

    def add_run(self, record: dict[str, Any]) -> None:
        """Append one run's provenance to ``/runs``; written with the next flush."""
        runs = self.file["runs"]
        runs.resize(len(runs) + 1, axis=0)
        runs[-1] = run_entry(record)

    def commit(self) -> None:
        """Make everything added count: data first, then the counts readers trust."""
        self.file.flush()
        self.file["committed"][...] = np.array([self.rows, self.failures], np.int64)
        self.file.flush()


def run_entry(record: dict[str, Any]) -> bytes:
    """A run's record as a ``/runs`` entry: JSON that fits, a long command shortened."""
    record = {key: storable(v) if isinstance(v, str) else v for key, v in record.items()}
    entry = json.dumps(record, ensure_ascii=False).encode()
    command = str(record.get("command", ""))
    if len(entry) > RUN_WIDTH:
        # Removing k bytes of the command removes at least k bytes of its JSON.
        keep = max(0, len(command.encode()) - (len(entry) - RUN_WIDTH))
        entry = json.dumps({**record, "command": _fit(command, keep)}, ensure_ascii=False).encode()
    if len(entry) > RUN_WIDTH:
        raise OutputError("internal: a run's record does not fit /runs")
    return entry


def _place(
    columns: list[H5Dataset],
    values: list[Any],
    keys: list[str],
    index: dict[str, int],
    count: int,
) -> int:
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


def _truncate(dataset: H5Dataset, count: int) -> None:
    if len(dataset) != count:
        dataset.resize(count, axis=0)


def _text(width: int) -> Any:
    """Fixed-width UTF-8 text of up to ``width`` bytes, null-terminated: HDF5's tools
    print it as written (the null-padded text of earlier files prints every pad byte
    as ``\\000``); h5py reads both alike, and a file keeps the kind it was made with."""
    import h5py

    kind = h5py.h5t.C_S1.copy()
    kind.set_size(width + 1)
    kind.set_strpad(h5py.h5t.STR_NULLTERM)
    kind.set_cset(h5py.h5t.CSET_UTF8)
    return h5py.Datatype(kind)


def text_width(dataset: H5Dataset) -> int:
    """The bytes of text each string of ``dataset`` can hold: a null-terminated string
    keeps one byte for its null."""
    import h5py

    kind = dataset.id.get_type()
    return int(kind.get_size()) - (kind.get_strpad() == h5py.h5t.STR_NULLTERM)


def _encoded(values: Sequence[str]) -> list[bytes]:
    return [storable(value).encode() for value in values]


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` UTF-8 bytes, on a character boundary."""
    text = storable(text)
    data = text.encode()
    if len(data) <= width:
        return text
    return data[: max(0, width - 3)].decode(errors="ignore") + "..."


@contextmanager
def appending(path: os.PathLike | str) -> Iterator[Appender]:
    """The output at ``path`` open for appending in place."""
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
        if "runs" not in file:  # a file of vggfeat 0.1; SWMR writing cannot add a dataset
            _create_runs(file)
            file.flush()
        file.swmr_mode = True
        yield Appender(file)
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
    for candidate in [*bundled, ctypes.util.find_library("hdf5")]:
        if candidate:
            try:
                return ctypes.CDLL(candidate)
            except OSError:
                continue
    return None


# Reading --------------------------------------------------------------------------------


def open_hdf5(path: os.PathLike | str) -> H5File:
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


def layer_names(file: H5File) -> list[str]:
    """The names of a file's feature datasets, in the order of its --layer options."""
    return list(json.loads(file.attrs["settings"])["layers"])


def head_of(attributes: Any) -> str:
    """A feature dataset's head as its attributes record it: ``gem(p=3, eps=1e-06)``."""
    known = {key: attributes[key] for key in attributes if key.startswith("pooling")}
    known = {k: v.decode() if isinstance(v, bytes) else v for k, v in known.items()}
    try:
        return str(Pooling.from_attributes(known))
    except OptionError:  # a head of a later vggfeat: shown as recorded
        return str(known.get("pooling", ""))


def counts(file: H5File) -> tuple[int, int]:
    """(rows, failures) a file holds; older formats hold exactly their datasets' lengths."""
    if "committed" not in file:
        return len(file["paths"]), len(file["failed/paths"])
    rows, failures = (int(count) for count in file["committed"][()])
    if not (0 <= rows <= len(file["paths"]) and 0 <= failures <= len(file["failed/paths"])):
        raise ValueError(f"/committed says {rows} rows and {failures} failures, more than held")
    return rows, failures


def read_runs(file: H5File) -> list[dict[str, Any]]:
    """Each run's record in ``/runs``, oldest first; an entry a kill left blank is skipped."""
    found = []
    for entry in read_strings(file["runs"], len(file["runs"])) if "runs" in file else []:
        try:
            record = json.loads(entry)
        except ValueError:
            continue
        if isinstance(record, dict):
            found.append(record)
    return found


def read_strings(dataset: H5Dataset, count: int) -> list[str]:
    """The first ``count`` strings of a dataset, read in blocks."""
    values: list[str] = []
    for start in range(0, count, 65536):
        values.extend(decode_strings(dataset[start : min(count, start + 65536)]))
    return values


def decode_strings(raw: np.ndarray | list) -> list[str]:
    values = raw.tolist() if isinstance(raw, np.ndarray) else raw
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def stamps(file: H5File, group: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Sizes and modification times of a file's rows (group "source") or failures ("failed")."""
    if f"{group}/size" in file:
        return file[f"{group}/size"][:count], file[f"{group}/mtime_ns"][:count]
    return np.full(count, -1, np.int64), np.full(count, -1, np.int64)


def blocks(file: H5File, names: Sequence[str], rows: int, row_bytes: int) -> Iterator[Rows]:
    """A file's rows, without failures, in blocks of at most ``COPY_BYTES``."""
    step = max(1, COPY_BYTES // max(1, row_bytes))
    sizes, times = stamps(file, "source", rows)
    none = np.zeros(0, np.int64)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        yield Rows(
            paths=decode_strings(file["paths"][start:stop]),
            size=sizes[start:stop],
            mtime_ns=times[start:stop],
            features=tuple(file[f"features/{name}"][start:stop] for name in names),
            failed_paths=[],
            failed_reasons=[],
            failed_size=none,
            failed_mtime_ns=none,
        )


def failures(file: H5File, layout: Layout) -> Rows:
    """A file's failures, as rows without features."""
    _, count = counts(file)
    size, mtime_ns = stamps(file, "failed", count)
    return Rows.failures_only(
        layout,
        read_strings(file["failed/paths"], count),
        read_strings(file["failed/reasons"], count),
        size,
        mtime_ns,
    )


def read_attributes(path: os.PathLike | str, advice: str = "") -> dict[str, Any]:
    """A vggfeat file's root attributes; ``OutputError`` if it is not one or cannot be read.

    ``advice`` follows the reason in the message: what to do about it.
    """
    import h5py

    try:
        if not h5py.is_hdf5(path):
            raise OutputError(f"{path} is not a vggfeat file (not HDF5){advice}")
        with open_hdf5(path) as file:
            attributes = {
                key: value.decode() if isinstance(value, bytes) else value
                for key, value in file.attrs.items()
            }
    except (OSError, KeyError, RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OutputError(f"{path} is damaged and cannot be read ({reason}){advice}") from None
    if attributes.get("format") != "vggfeat" or "settings" not in attributes:
        raise OutputError(f"{path} is not a vggfeat file{advice}")
    try:
        version = int(attributes.get("format_version", 0))
    except (TypeError, ValueError):
        raise OutputError(f"{path} is damaged: its format_version is not a number") from None
    if version > FORMAT_VERSION:
        raise OutputError(
            f"{path} is in format {version}, newer than this vggfeat reads ({FORMAT_VERSION}); "
            "upgrade vggfeat (pip install -U vggfeat)"
        )
    return attributes


def stored_stamps(path: os.PathLike | str) -> tuple[dict[str, Stamp], dict[str, Stamp]]:
    """Every key a file holds as a row, and as a failure, with its (size, mtime_ns)."""
    found = []
    with open_hdf5(path) as file:
        for group, name, count in zip(
            ("source", "failed"), ("paths", "failed/paths"), counts(file), strict=True
        ):
            sizes, times = stamps(file, group, count)
            keys = read_strings(file[name], count)
            found.append(dict(zip(keys, map(Stamp, sizes.tolist(), times.tolist()), strict=True)))
    return found[0], found[1]
