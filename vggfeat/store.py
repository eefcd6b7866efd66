"""The HDF5 output: its format, written so that no completed work is ever lost.

The final file (a contract; README.md documents it)::

    /paths                (N,) UTF-8 strings; row i of every dataset belongs to paths[i]
    /features/<name>      (N, ...) float32 or float16, one dataset per requested layer
    /source/size          (N,) int64, each file's size in bytes when it was read
    /source/mtime_ns      (N,) int64, its modification time, ns since the epoch
    /failed/paths         (M,) UTF-8 strings, files that could not be used
    /failed/reasons       (M,) UTF-8 strings, why, in words
    /failed/size, /failed/mtime_ns   (M,) int64, as for rows (-1 where unknown)

HDF5 does not protect a file while it is being written, so a run never writes
into the final file. Completed rows are committed every few hundred images as
*parts* in the folder ``<output>.parts/``: each part is written to a temporary
name, flushed, fsync'ed and renamed, so a part is either whole or absent. Only
when every image is done are the parts (after the rows of an existing output)
assembled into a new file, which is fsync'ed and renamed over the output. A
kill at any moment loses at most the images since the last part; the same
command then continues from the parts. Independent workers could each write
parts of their own for one final assembly.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vggfeat.errors import VggfeatError
from vggfeat.images import Decoded, Failure, describe_path

FORMAT_VERSION = 2
COMPRESSIONS = ("none", "lzf", "gzip")
STORED_DTYPES = ("float32", "float16")
#: Target bytes per HDF5 chunk of features: big enough for fast appends, small for reads.
CHUNK_BYTES = 1 << 20
#: A part is committed after this many images, bytes or seconds, whichever comes first.
COMMIT_IMAGES = 256
COMMIT_BYTES = 64 << 20
COMMIT_SECONDS = 30.0
#: Free space always left on the output's disk, for HDF5's own bookkeeping and the system.
RESERVE_BYTES = 16 << 20


class OutputError(VggfeatError):
    """An output that cannot be written, continued, or locked."""


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
    "precision": "--precision",
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
class Stamp:
    """A file's size and modification time when it was read: what ``--update`` compares."""

    size: int
    mtime_ns: int


class FeatureStore:
    """One run's writer: rows are buffered, committed as parts, and assembled at the end.

    Holds an exclusive lock on the output for its lifetime; a second writer is
    refused at once, and a lock left by a dead process is simply taken over.
    """

    def __init__(self, path: Path, plan: dict[str, Any], base: Path | None, lock) -> None:
        self.path = path
        self.parts = _parts_folder(path)
        self._plan = plan
        self._base = base
        self._lock = lock
        self._row_bytes = sum(
            math.prod(fs["shape"]) * np.dtype(plan["settings"]["dtype"]).itemsize
            for fs in plan["feature_sets"]
        )
        self._buffer: list[tuple[list[Decoded], list[np.ndarray]]] = []
        self._failures: list[Failure] = []
        self._buffered_rows = 0
        self._last_commit = time.monotonic()
        self._next_part = 1 + max((_part_number(p) for p in self._part_files()), default=0)
        self.commit_images = COMMIT_IMAGES

    # Opening -----------------------------------------------------------------------

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
        """Lock ``path`` for writing and prepare to continue or replace it.

        Raises ``OutputError`` when the output cannot be written, is in use by
        another process, is not a vggfeat file, or was written with other
        settings (unless ``overwrite``, which replaces it once the run completes).
        """
        path = Path(path)
        _check_writable(path)
        parts = _parts_folder(path)
        try:
            parts.mkdir(exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot write output {path}: {error.strerror or error}") from error
        lock = _lock(parts, path)
        try:
            plan = {
                "id": uuid.uuid4().hex,
                "settings": asdict(settings),
                "feature_sets": [asdict(fs) for fs in feature_sets],
                "attributes": attributes,
                "compression": compression,
                "overwrite": overwrite,
            }
            plan = _continue_parts(parts, path, plan, settings, overwrite)
            base = None if overwrite else _existing_output(path, settings, plan["id"], parts)
            _require_space(parts, RESERVE_BYTES, path, "start")
            return cls(path, plan, base, lock)
        except BaseException:
            lock.close()
            raise

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        """Facts known only once the network is built (versions, the weights' hash)."""
        self._plan["attributes"].update(attributes)

    @property
    def done(self) -> dict[str, Stamp]:
        """Every path already stored or recorded as failed, with its file's stamp then."""
        stamps: dict[str, Stamp] = {}
        if self._base is not None:
            import h5py

            with h5py.File(self._base, "r") as file:
                for group in (file, file["failed"]):
                    paths = group["paths"].asstr()[()]
                    sizes, times = _stamps_of(group, len(paths))
                    stamps.update(zip(paths, map(Stamp, sizes, times), strict=True))
        for part in self._part_files():
            with np.load(part) as data:
                for prefix in ("", "failed_"):
                    stamps.update(
                        zip(
                            data[f"{prefix}paths"].tolist(),
                            map(
                                Stamp,
                                data[f"{prefix}size"].tolist(),
                                data[f"{prefix}mtime_ns"].tolist(),
                            ),
                            strict=True,
                        )
                    )
        return stamps

    @property
    def rows(self) -> int:
        """Rows the output will hold once the buffered ones are committed (before pruning)."""
        base = 0
        if self._base is not None:
            import h5py

            with h5py.File(self._base, "r") as file:
                base = len(file["paths"])
        committed = 0
        for part in self._part_files():
            with np.load(part) as data:
                committed += len(data["paths"])
        return base + committed + self._buffered_rows

    # Writing -----------------------------------------------------------------------

    def append(self, images: Sequence[Decoded], features: Sequence[np.ndarray]) -> None:
        """Add one row per image; ``features`` holds one (len(images), ...) array per set.

        Commits a part when enough rows, bytes or time have gathered.
        """
        dtype = np.dtype(self._plan["settings"]["dtype"])
        self._buffer.append((list(images), [np.asarray(f, dtype) for f in features]))
        self._buffered_rows += len(images)
        if (
            self._buffered_rows >= self.commit_images
            or self._buffered_rows * self._row_bytes >= COMMIT_BYTES
            or time.monotonic() - self._last_commit >= COMMIT_SECONDS
        ):
            self.commit()

    def add_failures(self, failures: Sequence[Failure]) -> None:
        self._failures.extend(failures)

    def commit(self) -> None:
        """Write what is buffered as one part, atomically; nothing if nothing is buffered."""
        if not self._buffer and not self._failures:
            return
        images = [image for batch, _ in self._buffer for image in batch]
        arrays: dict[str, np.ndarray] = {
            "paths": _strings([describe_path(image.path) for image in images]),
            "size": np.array([image.size for image in images], np.int64),
            "mtime_ns": np.array([image.mtime_ns for image in images], np.int64),
            "failed_paths": _strings([describe_path(f.path) for f in self._failures]),
            "failed_reasons": _strings([f.reason for f in self._failures]),
            "failed_size": np.array([f.size for f in self._failures], np.int64),
            "failed_mtime_ns": np.array([f.mtime_ns for f in self._failures], np.int64),
        }
        dtype = np.dtype(self._plan["settings"]["dtype"])
        for index, feature_set in enumerate(self._plan["feature_sets"]):
            batches = [features[index] for _, features in self._buffer]
            arrays[f"features_{index}"] = (
                np.concatenate(batches) if batches else np.zeros((0, *feature_set["shape"]), dtype)
            )
        need = sum(a.nbytes for a in arrays.values()) + RESERVE_BYTES
        _require_space(self.parts, need, self.path, "commit the latest images")
        name = self.parts / f"part-{self._next_part:06d}.npz"
        _write_atomically(name, lambda file: np.savez(file, **arrays), self.path)
        self._next_part += 1
        self._buffer.clear()
        self._failures.clear()
        self._buffered_rows = 0
        self._last_commit = time.monotonic()

    def finish(self, prune: Callable[[str], bool] | None = None) -> int:
        """Commit, assemble the output, remove the parts; the number of rows written.

        Rows of an existing output come first, except those a part supersedes
        (the same path, read again by ``--update``) and those ``prune`` drops;
        then every part's rows, in the order they were committed.
        """
        self.commit()
        parts = self._part_files()
        if self._base is not None and not parts and not self._prunes(prune):
            rows = self.rows  # nothing new: the output stands as it is
        else:
            rows = _assemble(self.path, self._plan, self._base, parts, prune)
        shutil.rmtree(self.parts, ignore_errors=True)
        self.close()
        return rows

    def _prunes(self, prune: Callable[[str], bool] | None) -> bool:
        """Whether ``prune`` would drop any path of the existing output."""
        return prune is not None and any(prune(path) for path in self.done)

    def close(self) -> None:
        """Release the lock; committed parts stay for the next run to continue from."""
        self._lock.close()

    def discard(self) -> None:
        """Release the lock and remove the parts folder if this run left nothing in it."""
        if not self._part_files():
            shutil.rmtree(self.parts, ignore_errors=True)
        self.close()

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.npz"))


# Opening, step by step ----------------------------------------------------------------


def _parts_folder(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _check_writable(path: Path) -> None:
    if os.path.isdir(path):  # False, not an error, where the folder cannot be searched
        raise OutputError(
            f"output {path} is a folder; give a file name such as {path / 'features.h5'}"
        )
    parent = path.parent
    try:
        is_folder = stat.S_ISDIR(os.stat(parent).st_mode)
    except FileNotFoundError:
        raise OutputError(f"cannot write output {path}: {parent} does not exist") from None
    except OSError as error:
        raise OutputError(f"cannot write output {path}: {error.strerror or error}") from None
    if not is_folder:
        raise OutputError(f"cannot write output {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output {path}: no permission to write in {parent}")


def _lock(parts: Path, path: Path):
    """An exclusive lock on the output, held by an open file; refused at once if taken."""
    lock = (parts / "lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise OutputError(
            f"output {path} is in use by process {holder}; wait for it to finish, "
            "or choose another -o"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _continue_parts(
    parts: Path, path: Path, plan: dict[str, Any], settings: Settings, overwrite: bool
) -> dict[str, Any]:
    """The plan of the parts already in ``parts``, or ``plan`` written there for a fresh start."""
    for leftover in parts.glob("*.tmp"):
        leftover.unlink(missing_ok=True)  # a part or plan a killed run was writing
    record = parts / "run.json"
    if record.exists():
        earlier = json.loads(record.read_text())
        differences = Settings.from_dict(earlier["settings"]).differences(settings)
        if not differences and earlier["overwrite"] == overwrite:
            return earlier
        if differences and not overwrite:
            raise OutputError(
                f"output {path} has an unfinished run with other settings "
                f"({'; '.join(differences)}); run with those settings to finish it, "
                "or --overwrite to start again"
            )
    for stale in parts.glob("part-*.npz"):
        stale.unlink()
    _write_atomically(record, lambda file: file.write(json.dumps(plan).encode()), path)
    return plan


def _existing_output(path: Path, settings: Settings, plan_id: str, parts: Path) -> Path | None:
    """The output to continue, after checking it is a vggfeat file with the same settings."""
    import h5py

    if not path.exists():
        return None
    stored = None
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as file:
            if file.attrs.get("format") == "vggfeat" and "settings" in file.attrs:
                stored = Settings.from_dict(json.loads(file.attrs["settings"]))
                assembled = file.attrs.get("parts_id") == plan_id
    if stored is None:
        raise OutputError(
            f"output {path} exists and is not a vggfeat file; "
            "choose another -o, or --overwrite to replace it"
        )
    differences = stored.differences(settings)
    if differences:
        raise OutputError(
            f"output {path} was written with other settings ({'; '.join(differences)}); "
            "run with the file's settings to continue it, --overwrite to replace it, "
            "or -o for a new file"
        )
    if assembled:
        # A run was killed after its output was in place but before it removed its parts.
        for part in parts.glob("part-*.npz"):
            part.unlink()
    return path


# Writing safely -------------------------------------------------------------------------


def _write_atomically(target: Path, write: Callable[[Any], None], output: Path) -> None:
    """Write to a temporary name, flush and fsync, then rename: the file is whole or absent."""
    temporary = target.with_name(target.name + ".tmp")
    try:
        with temporary.open("wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
        _fsync_folder(target.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise _write_error(error, output, target) from error


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_error(error: Exception, output: Path, target: Path) -> OutputError:
    kept = f"completed work is kept in {_parts_folder(output)}"
    code = getattr(error, "errno", None)
    if code is None:  # HDF5 puts the system's errno in its message
        found = re.search(r"errno = (\d+)", str(error))
        code = int(found[1]) if found else None
    if code == errno.ENOSPC:
        free = shutil.disk_usage(target.parent).free
        return OutputError(
            f"no space left on the disk holding {output} ({_size(free)} free); {kept}: "
            "free some space and run the same command to continue"
        )
    if code == errno.EFBIG:
        return OutputError(
            f"file size limit reached writing {target} (see 'ulimit -f'); {kept}: "
            "raise the limit and run the same command to continue"
        )
    reason = getattr(error, "strerror", None) or error
    return OutputError(f"cannot write {target}: {reason}; {kept}")


def _require_space(folder: Path, need: int, output: Path, purpose: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(
            f"not enough free space to {purpose}: {_size(free)} free on the disk holding "
            f"{output}, about {_size(need)} needed; completed work is kept in "
            f"{_parts_folder(output)}: free some space and run the same command to continue"
        )


def _size(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _strings(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")


def _part_number(part: Path) -> int:
    return int(part.stem.split("-")[1])


def _stamps_of(group, count: int) -> tuple[list[int], list[int]]:
    if "size" in group and "mtime_ns" in group:
        return group["size"][()].tolist(), group["mtime_ns"][()].tolist()
    if "source" in group:
        return group["source/size"][()].tolist(), group["source/mtime_ns"][()].tolist()
    return [-1] * count, [-1] * count


# Assembling ------------------------------------------------------------------------------


def _assemble(
    path: Path,
    plan: dict[str, Any],
    base: Path | None,
    parts: list[Path],
    prune: Callable[[str], bool] | None,
) -> int:
    """Write the output from ``base`` and ``parts`` to a temporary file, then rename it in."""
    import h5py

    superseded: set[str] = set()
    for part in parts:
        with np.load(part) as data:
            superseded.update(data["paths"].tolist())
            superseded.update(data["failed_paths"].tolist())
    need = sum(p.stat().st_size for p in parts) + RESERVE_BYTES
    if base is not None:
        need += base.stat().st_size
    _require_space(path.parent, need, path, "assemble the output")
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(temporary, "w") as out:
            writer = _OutputWriter(out, plan)
            if base is not None:
                with h5py.File(base, "r") as file:
                    writer.copy_base(file, superseded, prune)
            for part in parts:
                with np.load(part) as data:
                    writer.add_part(data)
            rows = writer.rows
        with temporary.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    except (OSError, RuntimeError) as error:
        # HDF5 reports a failed write as OSError, or as RuntimeError when closing.
        temporary.unlink(missing_ok=True)
        raise _write_error(error, path, temporary) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return rows


class _OutputWriter:
    """Lays out a new output file and appends rows and failures to it."""

    def __init__(self, file, plan: dict[str, Any]) -> None:
        import h5py

        self.file = file
        text = h5py.string_dtype("utf-8")
        settings = plan["settings"]
        file.attrs["format"] = "vggfeat"
        file.attrs["format_version"] = FORMAT_VERSION
        file.attrs["settings"] = json.dumps(settings)
        file.attrs["parts_id"] = plan["id"]
        for key, value in {**settings, **plan["attributes"]}.items():
            file.attrs[key] = value
        file.create_dataset("paths", (0,), text, maxshape=(None,), chunks=(4096,))
        for name in ("source/size", "source/mtime_ns", "failed/size", "failed/mtime_ns"):
            file.create_dataset(name, (0,), np.int64, maxshape=(None,), chunks=(4096,))
        for name in ("failed/paths", "failed/reasons"):
            file.create_dataset(name, (0,), text, maxshape=(None,), chunks=(1024,))
        dtype = np.dtype(settings["dtype"])
        compression = plan["compression"]
        options = {} if compression == "none" else {"compression": compression}
        self.names = [feature_set["name"] for feature_set in plan["feature_sets"]]
        self.features = []
        for feature_set in plan["feature_sets"]:
            shape = tuple(feature_set["shape"])
            rows = max(1, min(1024, CHUNK_BYTES // (math.prod(shape) * dtype.itemsize)))
            dataset = file.create_dataset(
                f"features/{feature_set['name']}",
                (0, *shape),
                dtype,
                maxshape=(None, *shape),
                chunks=(rows, *shape),
                **options,
            )
            dataset.attrs["keras_layer"] = feature_set["keras_layer"]
            dataset.attrs["pooling"] = feature_set["pooling"]
            self.features.append(dataset)

    @property
    def rows(self) -> int:
        return len(self.file["paths"])

    def copy_base(self, base, superseded: set[str], prune) -> None:
        """Copy an earlier output's rows and failures, block by block, minus the dropped."""
        paths = base["paths"].asstr()[()]
        sizes, times = _stamps_of(base, len(paths))
        block = 4096
        for start in range(0, len(paths), block):
            chunk = paths[start : start + block]
            keep = np.array([p not in superseded and not (prune and prune(p)) for p in chunk], bool)
            features = [
                base[f"features/{name}"][start : start + block][keep] for name in self.names
            ]
            self._extend_rows(
                chunk[keep].tolist(),
                np.asarray(sizes[start : start + block])[keep],
                np.asarray(times[start : start + block])[keep],
                features,
            )
        failed = base["failed/paths"].asstr()[()]
        reasons = base["failed/reasons"].asstr()[()]
        failed_sizes, failed_times = _stamps_of(base["failed"], len(failed))
        keep = [i for i, p in enumerate(failed) if p not in superseded and not (prune and prune(p))]
        self._extend_failures(
            [failed[i] for i in keep],
            [reasons[i] for i in keep],
            [failed_sizes[i] for i in keep],
            [failed_times[i] for i in keep],
        )

    def add_part(self, data) -> None:
        self._extend_rows(
            data["paths"].tolist(),
            data["size"],
            data["mtime_ns"],
            [data[f"features_{index}"] for index in range(len(self.features))],
        )
        self._extend_failures(
            data["failed_paths"].tolist(),
            data["failed_reasons"].tolist(),
            data["failed_size"].tolist(),
            data["failed_mtime_ns"].tolist(),
        )

    def _extend_rows(self, paths, sizes, times, features) -> None:
        _extend(self.file["paths"], paths)
        _extend(self.file["source/size"], sizes)
        _extend(self.file["source/mtime_ns"], times)
        for dataset, values in zip(self.features, features, strict=True):
            _extend(dataset, values)

    def _extend_failures(self, paths, reasons, sizes, times) -> None:
        _extend(self.file["failed/paths"], paths)
        _extend(self.file["failed/reasons"], reasons)
        _extend(self.file["failed/size"], sizes)
        _extend(self.file["failed/mtime_ns"], times)


def _extend(dataset, values) -> None:
    if len(values) == 0:
        return
    start = len(dataset)
    dataset.resize(start + len(values), axis=0)
    dataset[start:] = values


# Reading ---------------------------------------------------------------------------------


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
