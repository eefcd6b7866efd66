"""Features out of a vggfeat file, into the formats other tools read.

    export("features.h5", sys.stdout.buffer, "npy")           # numpy.load reads it
    export("features.h5", "features.csv", "csv", normalize="l2")

One row per image, in the file's row order (that of ``/paths``), streamed in
chunks of about ``CHUNK_BYTES``: memory stays flat however large the layer.
Each format is a small writer in ``FORMATS``; a layer with several feature
axes (an unpooled conv map, (H, W, C)) is flattened in C order, index
``(h * W + w) * C + c``, for every format but ``npy``, which keeps the shape.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from vggfeat.atomic import refusal, try_lock
from vggfeat.errors import OptionError, OutputError, VggfeatError
from vggfeat.interrupts import raise_kept_stop
from vggfeat.store import LayerSpec, open_features, output_path, parts_folder
from vggfeat.text import tsv_field

#: About this many bytes of features are read, converted and written at a time.
CHUNK_BYTES = 16 << 20
NORMALIZATIONS = ("l2",)


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote: rows of one layer, each ``shape``, as ``dtype``."""

    rows: int
    layer: str
    shape: tuple[int, ...]
    dtype: str
    format: str
    pending: int
    pooling: str = "none"
    """The layer's head, as the file records it: ``gem(p=3, eps=1e-06)``."""
    """Of ``rows``, those committed by a run that has not finished yet."""
    damaged: tuple[str, ...] = ()
    """A line for each part of an unfinished run left out as damaged."""


class _Writer:
    """One format: ``begin`` once, ``write`` per chunk of rows, ``end`` once."""

    binary_values = False
    """Whether the values are raw bytes, not text, so a terminal is no place for them."""

    def __init__(
        self, out: _Named, layer: LayerSpec, shape: tuple[int, ...], options: _Options
    ) -> None:
        self.out = out
        self.layer = layer.name
        self.pooling = layer.pooling
        self.shape = shape
        self.width = math.prod(shape)
        self.options = options

    def dtype(self, stored: np.dtype) -> np.dtype:
        """The dtype the values are written in."""
        return np.dtype(np.float32)

    def begin(self, rows: int, dtype: np.dtype) -> None:
        pass

    def write(self, paths: list[str], values: np.ndarray) -> None:
        raise NotImplementedError

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class _Options:
    paths: bool
    header: bool


class _Npy(_Writer):
    """NumPy's ``.npy``: the header for all rows, then the rows as they come."""

    binary_values = True

    def dtype(self, stored: np.dtype) -> np.dtype:
        return stored.newbyteorder("<")

    def begin(self, rows: int, dtype: np.dtype) -> None:
        header = {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": (rows, *self.shape),
        }
        np.lib.format.write_array_header_1_0(self.out, header)

    def write(self, paths: list[str], values: np.ndarray) -> None:
        self.out.write(np.ascontiguousarray(values).tobytes())


class _Fvecs(_Writer):
    """The ``.fvecs`` of ANN benchmarks and faiss: per row, int32 width, float32 values."""

    binary_values = True

    def write(self, paths: list[str], values: np.ndarray) -> None:
        record = np.dtype([("width", "<i4"), ("values", "<f4", (self.width,))])
        rows = np.empty(len(values), record)
        rows["width"] = self.width
        rows["values"] = values.reshape(len(values), self.width)
        self.out.write(rows.tobytes())


class _Text(_Writer):
    """A line per row: the path (unless --no-paths), then every value."""

    separator = ","

    def dtype(self, stored: np.dtype) -> np.dtype:
        return stored

    def begin(self, rows: int, dtype: np.dtype) -> None:
        if self.options.header:
            names = [f"{self.layer}_{index}" for index in range(self.width)]
            self.out.write(self.separator.join(self._path_column() + names).encode() + b"\n")

    def _path_column(self) -> list[str]:
        return ["path"] if self.options.paths else []

    def write(self, paths: list[str], values: np.ndarray) -> None:
        lines = _formatted(values, self.separator)
        if self.options.paths:
            lines = [
                f"{self.quote(path)}{self.separator}{numbers}"
                for path, numbers in zip(paths, lines, strict=True)
            ]
        self.out.write(("\n".join(lines) + "\n").encode("utf-8"))

    def quote(self, path: str) -> str:
        """A path as one CSV field: quoted, with quotes doubled, where RFC 4180 needs it."""
        if any(character in path for character in ',"\r\n') or path != path.strip(" "):
            return '"' + path.replace('"', '""') + '"'
        return path


class _Tsv(_Text):
    separator = "\t"

    def quote(self, path: str) -> str:
        return tsv_field(path)


class _Jsonl(_Text):
    """A JSON object per line: ``{"path": ..., "<layer>": [values]}``."""

    def begin(self, rows: int, dtype: np.dtype) -> None:
        pass

    def write(self, paths: list[str], values: np.ndarray) -> None:
        key = json.dumps(self.layer)
        lines = []
        for path, numbers in zip(paths, _formatted(values, ", ", json=True), strict=True):
            path_field = f'"path": {json.dumps(path, ensure_ascii=False)}, '
            lines.append(f"{{{path_field if self.options.paths else ''}{key}: [{numbers}]}}")
        self.out.write(("\n".join(lines) + "\n").encode("utf-8"))


class _Parquet(_Writer):
    """Apache Parquet through pyarrow: a ``path`` column and a fixed-size list column."""

    binary_values = True

    def begin(self, rows: int, dtype: np.dtype) -> None:
        pa, parquet = _pyarrow()
        fields = [pa.field("path", pa.string())] if self.options.paths else []
        fields.append(pa.field(self.layer, pa.list_(pa.float32(), self.width)))
        metadata = {
            "vggfeat.layer": self.layer,
            "vggfeat.pooling": self.pooling,
            "vggfeat.shape": json.dumps(list(self.shape)),
        }
        self.schema = pa.schema(fields, metadata=metadata)
        self.writer = parquet.ParquetWriter(self.out, self.schema)

    def write(self, paths: list[str], values: np.ndarray) -> None:
        pa, _ = _pyarrow()
        flat = pa.array(values.reshape(-1), pa.float32())
        columns = [pa.FixedSizeListArray.from_arrays(flat, self.width)]
        if self.options.paths:
            columns.insert(0, pa.array(paths, pa.string()))
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))

    def end(self) -> None:
        self.writer.close()


FORMATS: dict[str, type[_Writer]] = {
    "npy": _Npy,
    "csv": _Text,
    "tsv": _Tsv,
    "jsonl": _Jsonl,
    "fvecs": _Fvecs,
    "parquet": _Parquet,
}
#: What an output's extension says about its format, for ``-o`` without ``--format``.
EXTENSIONS = {"npy": "npy", "csv": "csv", "tsv": "tsv", "txt": "tsv", "jsonl": "jsonl",
              "fvecs": "fvecs", "parquet": "parquet"}  # fmt: skip


def format_of(destination: str) -> str | None:
    """The format an output's name implies (``x.csv``: csv), or None."""
    return EXTENSIONS.get(Path(destination).suffix.lower().lstrip("."))


def is_binary(format: str) -> bool:
    """Whether ``format`` writes bytes a terminal would show as garbage."""
    return FORMATS[format].binary_values


def export(
    path: str | os.PathLike,
    out: str | os.PathLike | IO[bytes],
    format: str,
    layer: str | None = None,
    normalize: str | None = None,
    paths: bool = True,
    header: bool = True,
    paths_to: str | os.PathLike | None = None,
) -> Exported:
    """Write one layer of the vggfeat file at ``path`` to ``out`` as ``format``.

    ``out`` is a binary stream (``sys.stdout.buffer``) or a path: a regular
    file is written under a temporary name beside it and renamed into place
    when complete (with ``paths_to``: both files, or neither), a device or
    FIFO straight through. ``layer`` may be left out when the file holds one,
    and may be any name of the layer (``fc2`` for ``fc7``). ``normalize="l2"`` scales each
    (flattened) row to unit length, in float32; an all-zero row stays zero.
    ``paths=False`` leaves the path column out of the text and Parquet
    formats; ``header=False`` the header line out of csv and tsv.
    ``paths_to`` also writes each row's path, one a line, tsv-escaped.
    """
    if format not in FORMATS:
        raise OptionError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if normalize not in (None, *NORMALIZATIONS):
        raise OptionError(f"--normalize {normalize!r}: choose {', '.join(NORMALIZATIONS)}")
    if format == "parquet":
        _pyarrow()
    source = output_path(path)
    _check_targets(source, out, paths_to)
    with open_features(source) as file:
        name = file.choose_layer(layer)
        column = file.features[name]
        shape = tuple(column.shape[1:])
        writer_type = FORMATS[format]
        paths_output = (
            _written(paths_to, "--paths-to") if paths_to is not None else contextlib.nullcontext()
        )
        with _written(out, "-o") as stream, paths_output as paths_stream:
            writer = writer_type(stream, file.layers[name], shape, _Options(paths, header))
            stored = np.dtype(file.attributes.get("dtype", "float32"))
            dtype = np.dtype(np.float32) if normalize else writer.dtype(stored)
            rows = len(column)
            writer.begin(rows, dtype)
            # Text takes several times the room of the values while it is formatted.
            budget = CHUNK_BYTES // (1 if writer.binary_values else 8)
            for start, stop in _chunks(rows, math.prod(shape) * dtype.itemsize, budget):
                raise_kept_stop()  # a Ctrl-C that landed where it could not be raised
                try:
                    values = np.asarray(column[start:stop])
                    chunk_paths = file.paths[start:stop]
                except (OSError, KeyError, ValueError) as error:
                    raise OutputError(
                        f"{source} is damaged: rows {start:,} to {stop:,} cannot be read ({error})"
                    ) from None
                values = unit_length(values) if normalize else values.astype(dtype, copy=False)
                writer.write(chunk_paths, values)
                if paths_stream is not None:
                    lines = "".join(tsv_field(p) + "\n" for p in chunk_paths)
                    paths_stream.write(lines.encode("utf-8"))
            writer.end()
            # Both outputs whole before either is renamed into place: both, or neither.
            for written in (stream, paths_stream):
                if written is not None:
                    written.flush()
        return Exported(
            rows,
            name,
            shape,
            str(dtype),
            format,
            file.pending,
            file.layers[name].pooling,
            tuple(file.damaged),
        )


def _formatted(values: np.ndarray, separator: str, json: bool = False) -> list[str]:
    """Each row's values as text, with the significant digits that read back the very
    float32 (9) or float16 (5); for JSON, which has neither, NaN and infinities are null."""
    digits = 5 if values.dtype == np.float16 else 9
    rows = values.reshape(len(values), -1)
    step = 8192  # values formatted at once: a 100,000-value row is not one huge tuple
    line = separator.join([f"%.{digits}g"] * step)
    lines = []
    for row in rows:
        pieces = []
        for start in range(0, len(row), step):
            piece = row[start : start + step].astype(np.float64).tolist()
            if json and not all(map(math.isfinite, piece)):
                pieces.append(
                    separator.join(
                        f"%.{digits}g" % v if math.isfinite(v) else "null" for v in piece
                    )
                )
            elif len(piece) == step:
                pieces.append(line % tuple(piece))
            else:
                pieces.append(separator.join([f"%.{digits}g"] * len(piece)) % tuple(piece))
        lines.append(separator.join(pieces))
    return lines


def _chunks(rows: int, row_bytes: int, budget: int) -> Iterator[tuple[int, int]]:
    step = max(1, budget // max(1, row_bytes))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def unit_length(values: np.ndarray) -> np.ndarray:
    """Each row over its Euclidean length, in float32; an all-zero row stays zero, and a
    row holding NaN or an infinity has no length: it comes out NaN."""
    values = values.astype(np.float32)
    flat = values.reshape(len(values), -1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        # Scaled by the largest value first, so that squares neither overflow (1e30)
        # nor vanish (1e-30).
        largest = np.max(np.abs(flat), axis=1, keepdims=True) if flat.size else flat[:, :1]
        np.divide(flat, largest, out=flat, where=largest > 0)
        norms = np.linalg.norm(flat, axis=1, keepdims=True)
        np.divide(flat, norms, out=flat, where=norms > 0)
    flat[~np.isfinite(norms[:, 0])] = np.nan
    return values


@contextlib.contextmanager
def _written(target: str | os.PathLike | IO[bytes], option: str) -> Iterator[_Named]:
    """Where one output goes (given as ``option``), as a stream whose write errors name it.

    A stream stays as it is. A path to a device, a FIFO or anything else that
    is not a regular file (``/dev/null``, ``/dev/stdout``) is written straight
    through. Any other path, followed through symlinks, is written to
    ``.vggfeat-export-*.partial`` beside it and renamed into place when the
    block completes; removed if it does not, and taken over by the next export
    to the same path if the process was killed.
    """
    if not isinstance(target, str | os.PathLike):
        named = _Named(target, "standard output")
        yield named
        named.flush()
        return
    shown = os.fspath(target)
    if not _regular_or_new(shown, option):
        with _naming(shown):
            device: IO[bytes] = open(shown, "wb")  # noqa: SIM115
        with _closed(device):
            yield _Named(device, shown)
            with _naming(shown):
                device.flush()
        return
    final = Path(os.path.realpath(shown))
    digest = hashlib.sha256(os.fsencode(final.name)).hexdigest()[:16]
    partial = final.with_name(f".vggfeat-export-{digest}.partial")
    stream = _claim(partial, shown, option)
    with contextlib.suppress(OSError):  # a file replaced keeps its permissions
        os.chmod(partial, stat.S_IMODE(os.stat(final).st_mode))
    try:
        with _closed(stream):
            yield _Named(stream, shown)
            with _naming(shown):
                stream.flush()
                os.replace(partial, final)  # while still holding the claim
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _closed(stream: IO[bytes]) -> Iterator[None]:
    """Close ``stream`` after the block; after a failed write, quietly (closing would
    flush what did not fit again, and raise again)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            stream.close()
        raise
    stream.close()


def _regular_or_new(path: str, option: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True  # not there yet (or a dangling symlink): a new file
    except OSError as error:  # a symlink loop, a folder that cannot be looked in
        raise _cannot_write(path, Path(os.path.abspath(path)).parent, error, option) from None


def _claim(partial: Path, shown: str, option: str) -> IO[bytes]:
    """The partial file, opened, locked and emptied; refused while another export holds it."""
    try:
        descriptor = try_lock(partial, os.O_WRONLY | os.O_CREAT)
    except OSError as error:
        raise _cannot_write(shown, partial.parent, error, option) from None
    if descriptor is None:
        raise VggfeatError(f"another export is writing {shown}; wait for it, or name another file")
    os.ftruncate(descriptor, 0)
    return open(descriptor, "wb", buffering=1 << 20)


def _cannot_write(shown: str, folder: Path, error: OSError, option: str) -> VggfeatError:
    """An output (given as ``option``) that could not be opened in ``folder``, in one line:
    a read-only file system or no permission said so, with what to do."""
    refused = refusal(folder, error.errno)
    if refused is not None:
        return OutputError(f"cannot write {shown}: {refused}; write it elsewhere with {option}")
    return VggfeatError(f"cannot write {shown}: {error.strerror or error}")


@contextlib.contextmanager
def _naming(shown: str) -> Iterator[None]:
    """An ``OSError`` while writing, but a closed pipe, as a ``VggfeatError`` naming ``shown``."""
    try:
        yield
    except BrokenPipeError:
        raise
    except VggfeatError:
        raise
    except OSError as error:
        raise VggfeatError(f"cannot write {shown}: {error.strerror or error}") from None


class _Named:
    """A binary stream whose write errors say which output failed (a full disk, say)."""

    def __init__(self, stream: IO[bytes], shown: str) -> None:
        self._stream = stream
        self._shown = shown

    def write(self, data: bytes | bytearray | memoryview) -> int:
        # A full disk can take part of a large write and say so only in the count.
        view = memoryview(data).cast("B")
        with _naming(self._shown):
            while view:
                written = self._stream.write(view)
                if not written:
                    raise OSError(errno.ENOSPC, "no more bytes could be written")
                view = view[written:]
        return len(data)

    def flush(self) -> None:
        with _naming(self._shown):
            self._stream.flush()

    @property
    def closed(self) -> bool:
        return self._stream.closed


def _check_targets(
    source: Path,
    out: str | os.PathLike | IO[bytes],
    paths_to: str | os.PathLike | None,
) -> None:
    """Refuse outputs that would overwrite the file being read, or each other."""
    named = [os.fspath(t) for t in (out, paths_to) if isinstance(t, str | os.PathLike)]
    for target in named:
        if target.endswith(os.sep):
            raise OptionError(f"{target} names a folder; name the file to write")
        if _same_path(target, source):
            raise OptionError(f"{target} is the file being exported; name another")
        folder = Path(os.path.realpath(target)).parent
        if _same_path(folder, parts_folder(source)) or _is_parts_folder(folder):
            raise OptionError(f"{target} is inside a .parts folder, vggfeat's own work")
    if len(named) == 2 and _same_path(*named):
        raise OptionError(f"-o and --paths-to both name {named[0]}; name two files")
    if paths_to is not None and not isinstance(out, str | os.PathLike):
        same = False
        with contextlib.suppress(OSError, AttributeError, ValueError):  # not there, no file
            same = os.path.samestat(os.stat(paths_to), os.fstat(out.fileno()))
        if same:
            raise OptionError(
                f"--paths-to {os.fspath(paths_to)} is where the rows go too; name another file, "
                "or leave it out: the text formats write each path on its row"
            )


def _is_parts_folder(folder: Path) -> bool:
    """Whether ``folder`` is a run's parts folder: ``<output>.parts`` with a plan in it."""
    return folder.name.endswith(".parts") and (folder / "run.json").is_file()


def _same_path(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two names are one file: the same once resolved, or the same inode."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(first, second)
    return False


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise OptionError("--format parquet needs pyarrow: pip install pyarrow") from None
    return pyarrow, pyarrow.parquet
