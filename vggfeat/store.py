"""What is done: the run's journal of committed parts, shards, locks, and the output's assembly.

A run never leaves completed work only in memory for long: rows are committed
every few hundred images as *parts* in ``<output>.parts/``, each written to a
temporary name, flushed, fsync'ed and renamed, so a part is whole or absent::

    <output>.parts/
        run.json                the plan: settings, datasets, shards, overwrite or not
        shard-0003.lock         held (flock) by the process working on shard 3; its PID
        shard-0003.json         written once shard 3 has done its share
        part-0003-000017.npz    shard 3's 17th commit: rows and failures, in order
        assemble.lock           held by the process writing the output
        assembling.h5           a new output being built; discarded if interrupted

When every shard has done its share, one process assembles: it appends the
parts to the existing output in place (``output.py`` says how that survives a
kill), deleting each part once its rows count, or builds a new file next to
the parts and renames it over the output (a fresh output, ``--overwrite``,
``--prune``, a file whose failures became rows). Appending a part twice
changes nothing: a path already in the file is replaced, never added again.

An image is one row however its path is spelt: rows are keyed by the image's
path with every folder resolved (symlinks, ``..``, the working directory),
relative to the folder holding the output, or absolute when it lies elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from vggfeat.errors import OptionError
from vggfeat.images import Failure, Source
from vggfeat.interrupts import signals_deferred
from vggfeat.output import (
    FORMAT_VERSION,
    Column,
    FeatureSet,
    Layout,
    OutputError,
    Rows,
    Settings,
    blocks,
    committed,
    create,
    decode_strings,
    encoded_length,
    feature_names,
    open_hdf5,
    path_width,
    read_strings,
    stamps,
    writing,
)

COMPRESSIONS = ("none", "lzf", "gzip")
STORED_DTYPES = ("float32", "float16")
#: A part is committed after this many images, bytes or seconds, whichever comes first.
COMMIT_IMAGES = 256
COMMIT_BYTES = 64 << 20
COMMIT_SECONDS = 30.0
#: Free space always left on the output's disk, for HDF5's own bookkeeping and the system.
RESERVE_BYTES = 16 << 20

__all__ = [
    "COMPRESSIONS",
    "STORED_DTYPES",
    "FeatureSet",
    "FeatureStore",
    "Layout",
    "OutputError",
    "Settings",
    "Shard",
    "Stamp",
    "load",
    "open_features",
]


@dataclass(frozen=True)
class Stamp:
    """A file's size and modification time when it was read: what ``--update`` compares."""

    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` (1-based) of the images a run has to do."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"3/16"`` as a shard; raises ``VggfeatError`` for anything else."""
        found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not found or not 1 <= int(found[1]) <= int(found[2]):
            raise OptionError(
                f"--shard {text} is not K/N with 1 <= K <= N; for example --shard 3/16"
            )
        return cls(int(found[1]), int(found[2]))

    def share(self, items: Sequence[str]) -> list[str]:
        """This shard's contiguous share of ``items``, the same on every machine."""
        count = len(items)
        return list(
            items[(self.index - 1) * count // self.count : self.index * count // self.count]
        )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class OutputChanged(OutputError):
    """A part vanished while being read: a run finished the output meanwhile."""


class PruneEverything(OutputError):
    """``--prune`` would drop every row of a file: confirm with ``--yes``."""


@dataclass(frozen=True)
class Assembly:
    """What writing the output did."""

    appended: int
    replaced: int
    dropped: int
    rows: int
    failures: int


@dataclass
class _Plan:
    """The run recorded in ``run.json``: what every shard of it must agree on."""

    id: str
    layout: Layout
    shards: int
    overwrite: bool

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "settings": asdict(self.layout.settings),
                "feature_sets": [asdict(fs) for fs in self.layout.feature_sets],
                "compression": self.layout.compression,
                "attributes": self.layout.attributes,
                "shards": self.shards,
                "overwrite": self.overwrite,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> _Plan:
        values = json.loads(text)
        return cls(
            id=values["id"],
            layout=Layout(
                settings=Settings.from_dict(values["settings"]),
                feature_sets=tuple(
                    FeatureSet(fs["name"], fs["keras_layer"], fs["pooling"], tuple(fs["shape"]))
                    for fs in values["feature_sets"]
                ),
                compression=values["compression"],
                attributes=values["attributes"],
            ),
            shards=values["shards"],
            overwrite=values["overwrite"],
        )


@dataclass
class _Buffer:
    images: list[Source] = field(default_factory=list)
    features: list[list[np.ndarray]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images) + len(self.failures)


class FeatureStore:
    """One process's view of a run: what is done, its shards, and its writes.

    ``open`` checks everything that can refuse the command before it changes
    anything on disk, then holds an exclusive lock on each shard it works on
    (every unfinished shard for a plain run, one with ``--shard``).
    """

    def __init__(self, path: Path, plan: _Plan, locks: dict[int, Any], home: Path) -> None:
        self.path = path
        self.parts = parts_folder(path)
        self.plan = plan
        self.home = home
        self._locks = locks
        self._real_folders: dict[str, str] = {}
        self._buffer = _Buffer()
        self._last_commit = time.monotonic()
        self._shard = min(locks, default=1)
        self._next_part = self._first_free_part(self._shard)
        self.commit_images = COMMIT_IMAGES

    # Opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        layout: Layout,
        overwrite: bool = False,
        shard: Shard | None = None,
    ) -> FeatureStore:
        """Check ``path`` can take this run, then lock the shards this process will do.

        Raises ``OutputError`` (changing nothing on disk) when the output cannot
        be written, is another program's file or damaged, holds other settings,
        has an unfinished run of other settings, or its shard is in use.
        """
        path = output_path(path)
        _check_writable(path)
        if path.exists() and not overwrite:
            _check_output(path, layout.settings)
        parts = parts_folder(path)
        earlier = _read_plan(parts, path)
        if earlier is not None:
            _check_unfinished(earlier, path, layout.settings, overwrite, shard)

        try:
            parts.mkdir(exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot write output {path}: {error.strerror or error}") from error
        if earlier is not None and _abandoned(earlier, layout):
            # --overwrite with other settings: the unfinished run is thrown away.
            everything = range(1, earlier.shards + 1)
            held = _lock_shards(parts, path, earlier.shards, everything)
            _clear_parts(parts)
            (parts / "run.json").unlink(missing_ok=True)
            for lock in held.values():
                lock.close()
            earlier = None
        count = earlier.shards if earlier else shard.count if shard else 1
        wanted = [shard.index] if shard else range(1, count + 1)
        locks = _lock_shards(parts, path, count, wanted)
        try:
            for index in locks:
                # What a killed process of this shard was writing.
                for leftover in parts.glob(f"*-{index:04d}*.tmp"):
                    leftover.unlink(missing_ok=True)
            plan = _claim_plan(parts, path, _Plan(uuid.uuid4().hex, layout, count, overwrite))
            _check_unfinished(plan, path, layout.settings, overwrite, shard)
            if plan.shards != count:
                raise OutputError(
                    f"another run of {path} started at the same moment; run the command again"
                )
            for index in [i for i in locks if _finished(parts, i)]:
                locks.pop(index).close()
            _require_space(parts, RESERVE_BYTES, path, "start")
            return cls(path, plan, locks, _home(path))
        except BaseException:
            for lock in locks.values():
                lock.close()
            raise

    # What is done ----------------------------------------------------------------------

    def key(self, path: str) -> str:
        """The path under which ``path`` is stored: every folder resolved, relative to ``home``."""
        folder, name = os.path.split(os.path.abspath(path))
        real = self._real_folders.get(folder)
        if real is None:
            real = self._real_folders[folder] = os.path.realpath(folder)
        full = os.path.join(real, name)
        prefix = os.path.join(str(self.home), "")
        if full.startswith(prefix):
            full = full[len(prefix) :]
        return _printable(full)

    def locate(self, key: str) -> str | None:
        """Where the file stored as ``key`` is now, or None if it is gone."""
        return locate(key, self.home)

    @property
    def stored(self) -> dict[str, Stamp]:
        """Every path the output holds, as a row or a failure, with its stamp then."""
        rows, failures = self._stored
        return rows | failures

    @property
    def stored_rows(self) -> dict[str, Stamp]:
        """The paths the output holds as rows."""
        return self._stored[0]

    @cached_property
    def _stored(self) -> tuple[dict[str, Stamp], dict[str, Stamp]]:
        if not self.path.exists() or (self.plan.overwrite and not self._assembled()):
            return {}, {}
        found = []
        with open_hdf5(self.path) as file:
            for group, name, count in zip(
                ("source", "failed"), ("paths", "failed/paths"), committed(file), strict=True
            ):
                sizes, times = stamps(file, group, count)
                keys = read_strings(file[name], count)
                found.append(
                    dict(zip(keys, map(Stamp, sizes.tolist(), times.tolist()), strict=True))
                )
        return found[0], found[1]

    @cached_property
    def committed(self) -> dict[str, Stamp]:
        """Every path committed in parts so far, by any shard, with its stamp."""
        done: dict[str, Stamp] = {}
        for part in self._part_files():
            rows = _read_part(part)
            sizes = [*rows.size.tolist(), *rows.failed_size.tolist()]
            times = [*rows.mtime_ns.tolist(), *rows.failed_mtime_ns.tolist()]
            done.update(zip(rows.keys, map(Stamp, sizes, times), strict=True))
        return done

    @property
    def shards(self) -> list[int]:
        """The shards this process has to do, in order."""
        return sorted(self._locks)

    def begin(self, shard: int) -> None:
        """Commit what is buffered; the rows that follow belong to ``shard``."""
        self.commit()
        self._shard = shard
        self._next_part = self._first_free_part(shard)

    # Writing ---------------------------------------------------------------------------

    def append(self, images: Sequence[Source], features: Sequence[np.ndarray]) -> None:
        """Add one row per image; ``features`` holds one (len(images), ...) array per set.

        Commits a part when enough rows, bytes or time have gathered.
        """
        dtype = np.dtype(self.plan.layout.settings.dtype)
        self._buffer.images.extend(images)
        self._buffer.features.append([np.asarray(f, dtype) for f in features])
        self._commit_if_due()

    def add_failures(self, failures: Sequence[Failure]) -> None:
        """Record files that could not be used; committed like rows."""
        self._buffer.failures.extend(failures)
        self._commit_if_due()

    def _commit_if_due(self) -> None:
        if (
            len(self._buffer) >= self.commit_images
            or len(self._buffer.images) * self.plan.layout.row_bytes >= COMMIT_BYTES
            or time.monotonic() - self._last_commit >= COMMIT_SECONDS
        ):
            self.commit()

    def commit(self) -> None:
        """Write what is buffered as one part, atomically; nothing if nothing is buffered.

        Signals wait until the part is written and the buffer emptied, so a
        Ctrl-C handler that commits again never writes the same rows twice.
        """
        if not len(self._buffer):
            return
        with signals_deferred():
            buffer = self._buffer
            arrays = self._part_arrays(buffer)
            need = sum(a.nbytes for a in arrays.values()) + RESERVE_BYTES
            _require_space(self.parts, need, self.path, "commit the latest images")
            name = self.parts / f"part-{self._shard:04d}-{self._next_part:06d}.npz"
            _write_atomically(name, lambda file: np.savez(file, **arrays), self.path)
            self._next_part += 1
            self._buffer = _Buffer()
            self._last_commit = time.monotonic()

    def _part_arrays(self, buffer: _Buffer) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "paths": _strings([self.key(image.path) for image in buffer.images]),
            "size": np.array([image.size for image in buffer.images], np.int64),
            "mtime_ns": np.array([image.mtime_ns for image in buffer.images], np.int64),
            "failed_paths": _strings([self.key(f.path) for f in buffer.failures]),
            "failed_reasons": _strings([f.reason for f in buffer.failures]),
            "failed_size": np.array([f.size for f in buffer.failures], np.int64),
            "failed_mtime_ns": np.array([f.mtime_ns for f in buffer.failures], np.int64),
        }
        dtype = np.dtype(self.plan.layout.settings.dtype)
        for index, feature_set in enumerate(self.plan.layout.feature_sets):
            batches = [features[index] for features in buffer.features]
            arrays[f"features_{index}"] = (
                np.concatenate(batches) if batches else np.zeros((0, *feature_set.shape), dtype)
            )
        return arrays

    def finish_shard(self, shard: int, attributes: dict[str, Any]) -> None:
        """Commit, and record that ``shard`` has done its share, with what computed it."""
        self.commit()
        record = json.dumps({"attributes": attributes}).encode()
        _write_atomically(
            self.parts / f"shard-{shard:04d}.json", lambda file: file.write(record), self.path
        )

    def unfinished_shards(self) -> list[int]:
        """Shards of the run that have not done their share yet."""
        return [i for i in range(1, self.plan.shards + 1) if not _finished(self.parts, i)]

    def assemble(self, prune: set[str] | None = None) -> Assembly | None:
        """Write the output from the parts, once every shard is done; None if some are not.

        Only one process assembles: another that finishes at the same moment
        leaves it to the first. Removes the parts folder when done.
        """
        if self.unfinished_shards():
            return None
        try:
            lock = _take_lock(self.parts / "assemble.lock")
        except FileNotFoundError:
            return None  # another process assembled and removed the folder
        if lock is None:
            return None
        try:
            if not self.parts.exists():
                return None
            result = _Assembler(self, prune or set()).run()
        finally:
            lock.close()
        shutil.rmtree(self.parts, ignore_errors=True)
        return result

    def close(self) -> None:
        """Release the locks; committed parts stay for the next run to continue from."""
        for lock in self._locks.values():
            lock.close()
        self._locks = {}

    def discard(self) -> None:
        """Release the locks; remove the parts folder if it holds no work and no one uses it."""
        others = [i for i in range(1, self.plan.shards + 1) if i not in self._locks]
        held = [_take_lock(self.parts / f"shard-{i:04d}.lock") for i in others]
        try:
            idle = all(lock is not None for lock in held)
            if idle and not self._part_files() and not any(self.parts.glob("shard-*.json")):
                shutil.rmtree(self.parts, ignore_errors=True)
        finally:
            for lock in held:
                if lock is not None:
                    lock.close()
            self.close()

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.npz"))

    def _first_free_part(self, shard: int) -> int:
        numbers = [int(p.stem.split("-")[2]) for p in self.parts.glob(f"part-{shard:04d}-*.npz")]
        return 1 + max(numbers, default=0)

    def _assembled(self) -> bool:
        """Whether the output was already written by this run (a kill before cleaning up)."""
        try:
            return read_attributes(self.path).get("parts_id") == self.plan.id
        except OutputError:
            return False  # damaged: --overwrite replaces it


# Assembling ------------------------------------------------------------------------------


class _Assembler:
    """Writes one run's parts into the output: in place where it can, else a new file."""

    def __init__(self, store: FeatureStore, prune: set[str]) -> None:
        self.store = store
        self.prune = prune
        self.layout = store.plan.layout
        self.parts = store._part_files()
        # A path in several parts (re-read by --update) is a row or a failure as it was
        # committed last: True for a row.
        self.is_row: dict[str, bool] = {}
        for part in self.parts:
            rows = _read_part(part)
            self.is_row.update((key, True) for key in rows.paths)
            self.is_row.update((key, False) for key in rows.failed_paths)
        self.width = path_width(encoded_length(list(self.is_row)))

    def run(self) -> Assembly:
        path = self.store.path
        continuing = path.exists() and (not self.store.plan.overwrite or self.store._assembled())
        if not continuing:
            return self._build(source=None)
        if (not self.parts and not self.prune) or self.store._assembled():
            # Nothing to add, or a run killed after writing its output, before cleaning up.
            with open_hdf5(path) as file:
                return Assembly(0, 0, 0, *committed(file))
        with writing(path) as writer:
            moves = writer.moves(
                [key for key, row in self.is_row.items() if row],
                [key for key, row in self.is_row.items() if not row],
            )
            if moves or self.prune or writer.width < self.width:
                self.width = max(self.width, writer.width)
                drop = moves | self.prune
            else:
                return self._append(writer)
        return self._build(source=path, drop=drop)

    def _append(self, writer) -> Assembly:
        rows, replaced = writer.rows, self._replaced(writer.row_of)
        for part in self.parts:
            with signals_deferred():
                writer.add(self._latest(part))
                writer.commit()
                part.unlink()
        return Assembly(writer.rows - rows, replaced, 0, writer.rows, writer.failures)

    def _replaced(self, stored: dict[str, int]) -> int:
        """How many rows of the file the parts replace."""
        return sum(1 for key, row in self.is_row.items() if row and key in stored)

    def _build(self, source: Path | None, drop: set[str] = frozenset()) -> Assembly:
        """A new output from ``source``'s rows minus ``drop``, then the parts; renamed in."""
        path = self.store.path
        temporary = self.store.parts / "assembling.h5"
        temporary.unlink(missing_ok=True)
        need = sum(p.stat().st_size for p in self.parts) + RESERVE_BYTES
        need += source.stat().st_size if source else 0
        _require_space(self.store.parts, need, path, "write the output")
        dropped = 0
        try:
            if source is None:
                create(temporary, self._fresh_layout(), self.width)
            else:
                with open_hdf5(source) as file:
                    attributes = dict(file.attrs)
                create(temporary, self.layout, self.width)
                _copy_attributes(temporary, {**attributes, "parts_id": self.store.plan.id})
            with writing(temporary) as writer:
                if source is not None:
                    dropped = self._copy(source, writer, drop)
                kept, replaced = writer.rows, self._replaced(writer.row_of)
                for part in self.parts:
                    writer.add(self._latest(part))
                writer.commit()
                rows, failures = writer.rows, writer.failures
            appended = rows - kept
            _fsync(temporary)
            os.replace(temporary, path)
            _fsync_folder(path.parent)
        except (OSError, RuntimeError) as error:
            # HDF5 reports a failed write as OSError, or as RuntimeError when closing.
            temporary.unlink(missing_ok=True)
            raise _write_error(error, path, temporary) from error
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return Assembly(appended, replaced, dropped, rows, failures)

    def _copy(self, source: Path, writer, drop: set[str]) -> int:
        """Copy ``source``'s rows and failures minus ``drop``; how many rows were dropped."""
        names = [fs.name for fs in self.layout.feature_sets]
        none = np.zeros(0, bool)
        dropped = 0
        with open_hdf5(source) as file:
            rows, failures = committed(file)
            for block in blocks(file, names, rows, self.layout.row_bytes):
                keep = np.array([key not in drop for key in block.paths], bool)
                writer.add(block.select(keep, none))
                dropped += int((~keep).sum())
            sizes, times = stamps(file, "failed", failures)
            failed = Rows(
                paths=[],
                size=np.zeros(0, np.int64),
                mtime_ns=np.zeros(0, np.int64),
                features=tuple(
                    np.zeros((0, *fs.shape), self.layout.settings.dtype)
                    for fs in self.layout.feature_sets
                ),
                failed_paths=read_strings(file["failed/paths"], failures),
                failed_reasons=read_strings(file["failed/reasons"], failures),
                failed_size=sizes,
                failed_mtime_ns=times,
            )
            writer.add(
                failed.select(none, np.array([k not in drop for k in failed.failed_paths], bool))
            )
        return dropped

    def _latest(self, part: Path) -> Rows:
        """A part's rows and failures, less those a later part moved to the other kind.

        A row that a later part commits again stays: it keeps its place in the
        order, and the later part replaces it there.
        """
        rows = _read_part(part, len(self.layout.feature_sets))
        return rows.select(
            np.array([self.is_row[key] for key in rows.paths], bool),
            np.array([not self.is_row[key] for key in rows.failed_paths], bool),
        )

    def _fresh_layout(self) -> Layout:
        """The plan's layout, with what the shards learnt computing (versions, hashes)."""
        attributes = dict(self.layout.attributes)
        rows_per_node: dict[str, int] = {}
        for record in sorted(self.store.parts.glob("shard-*.json")):
            try:
                learnt = json.loads(record.read_text()).get("attributes", {})
                counts = json.loads(learnt.get("rows_per_node", "{}")).items()
            except (OSError, ValueError, AttributeError, TypeError) as error:
                raise OutputError(
                    f"{record} is damaged ({error}); delete it, and the same command "
                    "finishes that shard again"
                ) from None
            attributes.update({k: v for k, v in learnt.items() if v not in ("", None)})
            for node, rows in counts:
                rows_per_node[node] = rows_per_node.get(node, 0) + rows  # every shard's
        if rows_per_node:
            attributes["rows_per_node"] = json.dumps(rows_per_node)
        attributes["parts_id"] = self.store.plan.id
        return Layout(
            self.layout.settings, self.layout.feature_sets, self.layout.compression, attributes
        )


def _copy_attributes(path: Path, attributes: dict[str, Any]) -> None:
    import h5py

    with h5py.File(path, "r+") as file:
        for key, value in attributes.items():
            if key not in ("format_version",):
                file.attrs[key] = value


# Opening, step by step ----------------------------------------------------------------


#: What to do about an output that cannot be continued, after the reason.
OUTPUT_ADVICE = "; choose another -o, or --overwrite to replace it"


def output_path(path: str | os.PathLike) -> Path:
    """The output file, its own symlink resolved: one file has one parts folder and one lock."""
    path = Path(path)
    try:
        linked = path.is_symlink()
    except OSError:
        linked = False  # a folder we may not search: _check_writable says so
    return Path(os.path.realpath(path)) if linked else path


def parts_folder(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _home(path: Path) -> Path:
    """The folder stored paths are relative to: the output's, every link resolved."""
    return Path(os.path.realpath(path.absolute().parent))


def locate(key: str, home: Path) -> str | None:
    """Where the file stored as ``key`` (relative to ``home``) is now, or None if it is gone."""
    path = os.path.join(home, _unprintable(key))
    return path if os.path.lexists(path) else None


#: A backslash that could be read as an escape: before another, before \xNN, or before a byte
#: that is not UTF-8 (which becomes \xNN itself).
_AMBIGUOUS_BACKSLASH = re.compile(r"\\(?=\\|x[0-9a-fA-F]{2}|[\udc80-\udcff])")
_UNDECODABLE = re.compile(r"[\udc80-\udcff]")
_ESCAPE = re.compile(rb"\\\\|\\x([0-9a-fA-F]{2})")


def _printable(path: str) -> str:
    """A path as stored: valid UTF-8; a byte that is not shown as \\xNN, reversibly.

    So that no two names are stored alike, a backslash that could be read as
    part of an escape is doubled; any other backslash stays as it is.
    """
    path = _AMBIGUOUS_BACKSLASH.sub(r"\\\\", path)
    return _UNDECODABLE.sub(lambda m: f"\\x{ord(m[0]) - 0xDC00:02x}", path)


def _unprintable(stored: str) -> str:
    """The path ``_printable`` stored, as the file system names it."""
    if "\\" not in stored:
        return stored
    raw = _ESCAPE.sub(lambda m: b"\\" if m[1] is None else bytes([int(m[1], 16)]), stored.encode())
    return os.fsdecode(raw)


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


def read_attributes(path: Path, advice: str = OUTPUT_ADVICE) -> dict[str, Any]:
    """A vggfeat file's root attributes; ``OutputError`` if it is not one or cannot be read."""
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
        raise OutputError(
            f"{path} is damaged and cannot be read ({_first_line(error)}){advice}"
        ) from None
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


def _check_output(path: Path, settings: Settings) -> None:
    """The output to continue is a vggfeat file of this format with the same settings."""
    attributes = read_attributes(path)
    if int(attributes["format_version"]) < FORMAT_VERSION:
        raise OutputError(
            f"{path} was written by an older vggfeat (format {attributes['format_version']}); "
            f"this one reads it but continues only format {FORMAT_VERSION}: --overwrite "
            "recomputes it, -o writes a new file"
        )
    try:
        with open_hdf5(path) as file:
            committed(file)
    except (OSError, KeyError, ValueError) as error:
        raise OutputError(
            f"{path} is damaged ({_first_line(error)}); --overwrite replaces it, -o writes a "
            "new file"
        ) from None
    stored = Settings.from_dict(json.loads(attributes["settings"]))
    differences = stored.differences(settings)
    if differences:
        raise OutputError(
            f"output {path} was written with other settings ({'; '.join(differences)}); "
            "run with the file's settings to continue it, --overwrite to replace it, "
            "or -o for a new file"
        )


def _read_plan(parts: Path, path: Path) -> _Plan | None:
    try:
        return _Plan.from_json((parts / "run.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OutputError(
            f"the unfinished run in {parts} cannot be read ({error}); delete that folder "
            "to abandon it and run again"
        ) from None


def _abandoned(earlier: _Plan, layout: Layout) -> bool:
    """Whether an unfinished run is to be thrown away: --overwrite with other settings."""
    return bool(earlier.layout.settings.differences(layout.settings))


def _check_unfinished(
    earlier: _Plan, path: Path, settings: Settings, overwrite: bool, shard: Shard | None
) -> None:
    """Refuse a run that does not fit the unfinished one in the parts folder."""
    parts = parts_folder(path)
    differences = earlier.layout.settings.differences(settings, "in the unfinished run")
    how = "with --overwrite " if earlier.overwrite else ""
    if differences and not overwrite:
        command = earlier.layout.attributes.get("command", "")
        raise OutputError(
            f"output {path} has an unfinished run {how}with other settings "
            f"({'; '.join(differences)}) in {parts}; finish it first ({command}), "
            f"or --overwrite to replace it with this run, or delete {parts} to abandon it"
        )
    if differences:
        return  # --overwrite starts again
    if earlier.overwrite != overwrite:
        if earlier.overwrite:
            raise OutputError(
                f"output {path} has an unfinished --overwrite run in {parts}; add --overwrite "
                f"to finish it, or delete {parts} to abandon it and keep {path} as it is"
            )
        raise OutputError(
            f"output {path} has an unfinished run that adds to it in {parts}; run without "
            f"--overwrite to finish it, or delete {parts} to abandon it first"
        )
    if shard is not None and shard.count != earlier.shards:
        raise OutputError(
            f"output {path} has an unfinished run split into {earlier.shards} shards; "
            f"run --shard K/{earlier.shards} for each K, or without --shard to finish them all"
        )


def _claim_plan(parts: Path, path: Path, plan: _Plan) -> _Plan:
    """Record ``plan`` as the run's, unless another process recorded one first: then that one."""
    record = parts / "run.json"
    temporary = parts / f"run.json.{os.getpid()}.tmp"
    _write_atomically(temporary, lambda file: file.write(plan.to_json().encode()), path)
    try:
        os.link(temporary, record)
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(parts)
    return _read_plan(parts, path) or plan


def _finished(parts: Path, shard: int) -> bool:
    return (parts / f"shard-{shard:04d}.json").exists()


def _clear_parts(parts: Path) -> None:
    for stale in [*parts.glob("part-*.npz"), *parts.glob("shard-*.json")]:
        stale.unlink()
    (parts / "assembling.h5").unlink(missing_ok=True)


def _lock_shards(parts: Path, path: Path, count: int, wanted) -> dict[int, Any]:
    """Locks on the ``wanted`` shards of ``count``; refused at once if another process holds one."""
    locks: dict[int, Any] = {}
    try:
        for index in wanted:
            lock = _take_lock(parts / f"shard-{index:04d}.lock")
            if lock is None:
                holder = (parts / f"shard-{index:04d}.lock").read_text().strip() or "unknown"
                what = (
                    f"output {path} is in use"
                    if count == 1
                    else (f"shard {index}/{count} of output {path} is being done")
                )
                raise OutputError(
                    f"{what} by process {holder}; wait for it to finish, or choose another -o"
                )
            locks[index] = lock
    except BaseException:
        for lock in locks.values():
            lock.close()
        raise
    return locks


def _take_lock(path: Path):
    """An exclusive lock held by an open file, with our PID in it; None if another holds it."""
    lock = path.open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


# Parts ----------------------------------------------------------------------------------


def _read_part(part: Path, features: int = 0) -> Rows:
    """A part's rows and failures, with its first ``features`` feature arrays."""
    with _part_errors(part):
        if not stat.S_ISREG(os.stat(part).st_mode):  # a FIFO would never answer
            raise ValueError("not a regular file")
        with np.load(part, allow_pickle=False) as data:
            rows = Rows(
                paths=data["paths"].tolist(),
                size=data["size"],
                mtime_ns=data["mtime_ns"],
                features=tuple(data[f"features_{index}"] for index in range(features)),
                failed_paths=data["failed_paths"].tolist(),
                failed_reasons=data["failed_reasons"].tolist(),
                failed_size=data["failed_size"],
                failed_mtime_ns=data["failed_mtime_ns"],
            )
        _check_part(rows)
        return rows


def _check_part(rows: Rows) -> None:
    """Raise ``ValueError`` unless a part's arrays agree with each other."""
    count, failures = len(rows.paths), len(rows.failed_paths)
    agree = (
        all(isinstance(p, str) for p in rows.paths + rows.failed_paths + rows.failed_reasons)
        and len(rows.size) == len(rows.mtime_ns) == count
        and all(len(values) == count for values in rows.features)
        and len(rows.failed_reasons) == len(rows.failed_size) == failures
        and len(rows.failed_mtime_ns) == failures
    )
    if not agree:
        raise ValueError("its arrays disagree in length or type")


@contextlib.contextmanager
def _part_errors(part: Path) -> Iterator[None]:
    """A part gone (a finishing run deleted it) or damaged, as one line saying what to do."""
    try:
        yield
    except FileNotFoundError:
        if part.is_symlink():
            raise OutputError(
                f"{part} is damaged (a symlink to nothing); delete it, and extract computes "
                "its images again"
            ) from None
        raise OutputChanged(
            f"{part.parent} changed while it was read (a run is finishing its output); "
            "run the command again"
        ) from None
    except (
        OSError,
        ValueError,
        KeyError,
        IndexError,
        EOFError,
        TypeError,
        zipfile.BadZipFile,
    ) as error:
        raise OutputError(
            f"{part} is damaged ({error}); delete it, and extract computes its images again"
        ) from None


def _strings(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")


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


def _fsync(path: Path) -> None:
    with path.open("rb") as file:
        os.fsync(file.fileno())


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_error(error: Exception, output: Path, target: Path) -> OutputError:
    kept = _kept(output)
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
    reason = getattr(error, "strerror", None) or _first_line(error)
    return OutputError(f"cannot write {target}: {reason}; {kept}")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _require_space(folder: Path, need: int, output: Path, purpose: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(
            f"not enough free space to {purpose}: {_size(free)} free on the disk holding "
            f"{output}, about {_size(need)} needed; {_kept(output)}: free some space and run "
            "the same command to continue"
        )


def _kept(output: Path) -> str:
    """Where this run's completed work waits, if it has any yet."""
    if any(parts_folder(output).glob("part-*.npz")):
        return f"completed work is kept in {parts_folder(output)}"
    return "no image of this run was finished yet"


def _size(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


# Reading ---------------------------------------------------------------------------------


class FeatureFile:
    """A vggfeat file opened for reading; nothing is read until asked for.

    ``paths`` and ``features[name]`` are ``Column``s: ``len``, indexing and
    slicing read only the rows asked for. They cover the rows the file holds
    and then, for an unfinished run, the rows committed in parts so far
    (``pending`` of them). Use as a context manager.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.home = _home(path)
        self._file = None
        self._empty: dict[str, np.ndarray] = {}
        plan = _read_plan(parts_folder(path), path)
        # Parts are listed before the file is read: a run appending a part to the file
        # deletes the part after, so every row is then in one or the other (or both,
        # and read once). Listed after, a part appended in between would be missed.
        listed = sorted(parts_folder(path).glob("part-*.npz"))
        self.feature_sets: dict[str, FeatureSet] = {}
        """Each layer: its Keras layer, pooling and per-image shape."""
        if path.exists():
            self.attributes = read_attributes(path, advice="")
            try:
                self._file = open_hdf5(path)
                self.rows, self._failures = committed(self._file)
                self._layers = feature_names(self._file)
                for name in self._layers:
                    dataset = self._file[f"features/{name}"]
                    if len(dataset) < self.rows:
                        raise ValueError(f"features/{name} holds fewer than {self.rows} rows")
                    self.feature_sets[name] = FeatureSet(
                        name,
                        _text(dataset.attrs.get("keras_layer", "")),
                        _text(dataset.attrs.get("pooling", "")),
                        dataset.shape[1:],
                    )
            except (OSError, KeyError, RuntimeError, ValueError) as error:
                raise OutputError(f"{path} is damaged and cannot be read ({error})") from None
        elif plan is not None:
            self.attributes = {**asdict(plan.layout.settings), **plan.layout.attributes}
            self.rows = self._failures = 0
            self._layers = list(plan.layout.settings.layers)
            dtype = plan.layout.settings.dtype
            self._empty = {s.name: np.zeros((0, *s.shape), dtype) for s in plan.layout.feature_sets}
            self.feature_sets = {s.name: s for s in plan.layout.feature_sets}
        else:
            raise OutputError(f"{path} does not exist")
        # An unfinished --overwrite run's rows belong to another file, not to this one.
        ours = plan is not None and not (plan.overwrite and self._file is not None)
        try:
            self._pending = self._new_rows(listed if ours else [])
        except BaseException:
            self.close()
            raise
        self.pending = sum(len(new) for _, _, new in self._pending)

    def _new_rows(self, parts: list[Path]) -> list[tuple[Path, Rows, np.ndarray]]:
        """Per part: its rows, and the indices of those new to the file, each path once.

        A row an unfinished --update read again stays where the file has it,
        with the file's values, until the run finishes.
        """
        seen = set(read_strings(self._file["paths"], self.rows)) if self._file and parts else set()
        found = []
        for part in parts:
            rows = _read_part(part)
            new = [i for i, key in enumerate(rows.paths) if key not in seen]
            seen.update(rows.paths)
            found.append((part, rows, np.array(new, np.int64)))
        return found

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @cached_property
    def paths(self) -> Column:
        """Each row's image as stored: relative to the file's folder, or absolute."""
        segments: list[tuple[int, Callable[[slice], Any]]] = []
        if self._file is not None:
            dataset = self._file["paths"]
            segments.append((self.rows, lambda s: dataset[s]))
        for _, rows, new in self._pending:
            paths = [rows.paths[i] for i in new]
            segments.append((len(paths), lambda s, paths=paths: paths[s]))
        return Column(segments, convert=decode_strings)

    @cached_property
    def features(self) -> dict[str, Column]:
        """One ``Column`` per stored layer, (N, ...) float32 or float16."""
        columns = {}
        for index, name in enumerate(self._layers):
            segments: list[tuple[int, Callable[[slice], Any]]] = []
            if self._file is not None:
                dataset = self._file[f"features/{name}"]
                segments.append((self.rows, lambda s, d=dataset: d[s]))
            for part, _, new in self._pending:
                segments.append((len(new), _PartColumn(part, f"features_{index}", new)))
            if not segments:  # a run that has committed nothing yet: no rows, but a shape
                segments.append((0, lambda s, empty=self._empty[name]: empty[s]))
            columns[name] = Column(segments)
        return columns

    @cached_property
    def failed(self) -> dict[str, str]:
        """Each file that could not be used, with the reason."""
        failed: dict[str, str] = {}
        if self._file is not None:
            failed.update(
                zip(
                    read_strings(self._file["failed/paths"], self._failures),
                    read_strings(self._file["failed/reasons"], self._failures),
                    strict=True,
                )
            )
        for _, rows, _ in self._pending:
            failed.update(zip(rows.failed_paths, rows.failed_reasons, strict=True))
        return failed

    def locate(self, stored: str) -> str | None:
        """Where the image stored as ``stored`` is now, or None if it is gone."""
        return locate(stored, self.home)


@dataclass(frozen=True)
class _PartColumn:
    """The rows ``new`` of one array of a part, read when sliced."""

    part: Path
    name: str
    new: np.ndarray

    def __call__(self, rows: slice) -> np.ndarray:
        with _part_errors(self.part), np.load(self.part) as data:
            return data[self.name][self.new[rows]]


#: The attributes ``vggfeat show`` lists, in this order: the settings, then provenance.
SHOWN_ATTRIBUTES = (
    "depth", "layers", "pooling", "weights", "weights_file", "weights_sha256", "seed",
    "image_size", "resize", "resampling", "precision", "compute_dtype", "dtype", "backend",
    "backend_version", "device", "engine", "vggfeat_version", "keras_version", "created",
    "command", "format_version",
)  # fmt: skip


def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """What ``vggfeat show`` shows: counts, each layer, settings and provenance, failures.

    Raises ``OutputError`` (one line) for a file that is not vggfeat's or is damaged.
    """
    with open_features(path) as file:
        layers = []
        for name, column in file.features.items():
            dataset = file._file[f"features/{name}"] if file._file is not None else None
            feature_set = file.feature_sets[name]
            layers.append(
                {
                    "name": name,
                    "shape": list(column.shape[1:]),
                    "dtype": str(column[0:0].dtype),
                    "keras_layer": feature_set.keras_layer,
                    "pooling": feature_set.pooling,
                    "bytes_on_disk": dataset.id.get_storage_size() if dataset else 0,
                }
            )
        failed = file.failed
        by_reason: dict[str, int] = {}
        for reason in failed.values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
        shown = {key: file.attributes[key] for key in SHOWN_ATTRIBUTES if key in file.attributes}
        return {
            "path": str(path),
            "rows": file.rows,
            "pending": file.pending,
            "failures": len(failed),
            "layers": layers,
            "attributes": {k: _plain(v) for k, v in shown.items()},
            "failures_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
            "failed": failed,
        }


def _plain(value: Any) -> Any:
    """An attribute as JSON has it: NumPy values and tuples as lists and numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_features(path: str | os.PathLike) -> FeatureFile:
    """Open a vggfeat file for reading rows on demand: ``with vggfeat.open(p) as f: ...``.

    While a run is finishing the file, a part can vanish as it is read; the
    file is then opened again, a few times, before ``OutputChanged`` is raised.
    """
    if not os.fspath(path):
        raise OptionError("no file named: give the path of a vggfeat file")
    for attempt in range(4):
        try:
            return FeatureFile(output_path(path))
        except OutputChanged:
            if attempt == 3:
                raise
            time.sleep(0.25 * (attempt + 1))
    raise AssertionError("unreachable")


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

    def __getitem__(self, index: int):
        """``vggfeat.load(path)[0]`` is the paths, ``[1]`` the features."""
        return (self.paths, self.features)[index]


def load(path: str | os.PathLike) -> Features:
    """Read a vggfeat HDF5 file into memory (``vggfeat.open`` reads on demand).

    ``paths`` has one entry per row; ``features[name]`` is an (N, ...) array
    per stored layer; ``failed`` maps each unusable file to its reason.
    """
    with open_features(path) as file:
        return Features(
            paths=list(file.paths),
            features={name: column[:] for name, column in file.features.items()},
            failed=file.failed,
            attributes=file.attributes,
        )
