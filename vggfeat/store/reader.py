"""Reading a vggfeat file lazily (``vggfeat.open``) or whole (``vggfeat.load``).

A reader sees the rows the file holds and then, for a run that has not
finished, the rows committed in its parts so far, each image once. It takes no
HDF5 lock, so it never keeps a run from appending, and it never writes. A
damaged part is left out and named in ``damaged``; the next ``extract``
computes its images again.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from vggfeat.architecture import vgg
from vggfeat.errors import OptionError, OutputError, VggfeatError
from vggfeat.heads import split_label
from vggfeat.store.hdf5 import (
    counts,
    decode_strings,
    head_of,
    layer_names,
    open_hdf5,
    read_attributes,
    read_runs,
    read_strings,
)
from vggfeat.store.identity import Identity, home_of, output_path, parts_folder
from vggfeat.store.journal import Journal, OutputChanged, PartDamaged
from vggfeat.store.layout import LayerSpec, Rows, canonical_label
from vggfeat.store.plan import read_plan


class Column:
    """Rows of one dataset read on demand: ``len``, an index, a slice or an index list.

    Spans the committed rows of the output and, for an unfinished run, the rows
    committed in parts so far, without reading anything until indexed.
    """

    def __init__(
        self,
        segments: Sequence[tuple[int, Callable[[slice], Any]]],
        convert: Callable[[Any], list[str]] | None = None,
    ) -> None:
        self._segments = list(segments)
        self._convert = convert
        self._length = sum(count for count, _ in self._segments)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Any]:
        step = 4096
        for start in range(0, len(self), step):
            yield from self[start : start + step]

    def __getitem__(self, index: Any) -> Any:
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

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = np.asarray(self[:])
        return values.astype(dtype) if dtype is not None else values

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *np.shape(self._slice(0, min(1, len(self))))[1:])

    def _slice(self, start: int, stop: int) -> Any:
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


@dataclass(frozen=True)
class _Pending:
    """One part of an unfinished run: its rows, and the indices of those new to the file."""

    journal: Journal
    part: Path
    rows: Rows
    new: np.ndarray


class FeatureFile:
    """A vggfeat file opened for reading; nothing is read until asked for.

    ``paths`` and ``features[name]`` are ``Column``s: ``len``, indexing and
    slicing read only the rows asked for. They cover the rows the file holds
    and then, for an unfinished run, the rows committed in parts so far
    (``pending`` of them). Use as a context manager.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity = Identity(home_of(path))
        self._file: Any = None
        self._empty: dict[str, np.ndarray] = {}
        self.damaged: list[str] = []
        """A line for each part of an unfinished run left out as damaged."""
        self.layers: dict[str, LayerSpec] = {}
        """Each layer: its Keras layer, head (``gem(p=3, eps=1e-06)``) and per-image shape."""
        plan = read_plan(parts_folder(path), path)
        # Parts are listed before the file is read: a run appending a part to the file
        # deletes the part after, so every row is then in one or the other (or both,
        # and read once). Listed after, a part appended in between would be missed.
        journal = Journal(parts_folder(path), path, plan.layout, plan.id) if plan else None
        listed = journal.parts() if journal else []
        if path.exists():
            self.attributes = read_attributes(path)
            self._open_file()
        elif plan is not None:
            self.attributes = {**asdict(plan.layout.settings), **plan.layout.attributes}
            self.rows = self._failures = 0
            self._names = list(plan.layout.settings.layers)
            dtype = plan.layout.settings.dtype
            self._empty = {s.name: np.zeros((0, *s.shape), dtype) for s in plan.layout.layers}
            self.layers = {s.name: s for s in plan.layout.layers}
        else:
            raise OutputError(f"{path} does not exist")
        # An unfinished --overwrite run's rows belong to another file, not to this one.
        ours = plan is not None and not (plan.overwrite and self._file is not None)
        try:
            self._pending = self._new_rows(journal, listed if ours else [])
        except BaseException:
            self.close()
            raise
        self.pending = sum(len(p.new) for p in self._pending)

    def _open_file(self) -> None:
        try:
            self._file = open_hdf5(self.path)
            self.rows, self._failures = counts(self._file)
            self._names = layer_names(self._file)
            for name in self._names:
                dataset = self._file[f"features/{name}"]
                if len(dataset) < self.rows:
                    raise ValueError(f"features/{name} holds fewer than {self.rows} rows")
                self.layers[name] = LayerSpec(
                    name,
                    _text(dataset.attrs.get("keras_layer", "")),
                    head_of(dataset.attrs),
                    dataset.shape[1:],
                )
        except (OSError, KeyError, RuntimeError, ValueError) as error:
            self.close()
            raise OutputError(f"{self.path} is damaged and cannot be read ({error})") from None

    def _new_rows(self, journal: Journal | None, parts: list[Path]) -> list[_Pending]:
        """Per part: its rows, and the indices of those new to the file, each path once.

        A row an unfinished --update read again stays where the file has it,
        with the file's values, until the run finishes.
        """
        if journal is None or not parts:
            return []
        seen = set(read_strings(self._file["paths"], self.rows)) if self._file else set()
        found = []
        for part in parts:
            try:
                rows = journal.read(part)
            except PartDamaged as damage:
                self.damaged.append(str(damage))
                continue
            new = [i for i, key in enumerate(rows.paths) if key not in seen]
            seen.update(rows.paths)
            found.append(_Pending(journal, part, rows, np.array(new, np.int64)))
        return found

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc: object) -> None:
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
            segments.append((self.rows, self._file["paths"].__getitem__))
        for pending in self._pending:
            paths = [pending.rows.paths[i] for i in pending.new]
            segments.append((len(paths), paths.__getitem__))
        return Column(segments, convert=decode_strings)

    @cached_property
    def features(self) -> dict[str, Column]:
        """One ``Column`` per stored layer, (N, ...) float32 or float16."""
        columns = {}
        for index, name in enumerate(self._names):
            segments: list[tuple[int, Callable[[slice], Any]]] = []
            if self._file is not None:
                segments.append((self.rows, self._file[f"features/{name}"].__getitem__))
            for pending in self._pending:
                segments.append((len(pending.new), _PartColumn(pending, index)))
            if not segments:  # a run that has committed nothing yet: no rows, but a shape
                segments.append((0, self._empty[name].__getitem__))
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
        for pending in self._pending:
            failed.update(zip(pending.rows.failed_paths, pending.rows.failed_reasons, strict=True))
        return failed

    @cached_property
    def runs(self) -> list[dict[str, Any]]:
        """Each run that wrote rows to the file, oldest first: when, how, rows added."""
        return read_runs(self._file) if self._file is not None else []

    def choose_layer(self, layer: str | None) -> str:
        """The dataset ``layer`` names, under any of its spellings (``fc2`` for ``fc7``,
        ``block5_pool:GeM`` for ``pool5:gem``); the file's only one when None.
        ``OptionError`` (naming ``--layer``) when it names none, or several."""
        names = list(self._names)
        if layer is None:
            if len(names) == 1:
                return names[0]
            raise OptionError(
                f"{self.path} holds {len(names)} layers ({', '.join(names)}): "
                "choose one with --layer"
            )
        if layer in names:
            return layer
        with contextlib.suppress(VggfeatError, KeyError, ValueError):
            found = self._same_layer(layer)
            if found is not None:
                return found
        close = difflib.get_close_matches(layer, names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise OptionError(f"--layer {layer}: {hint}{self.path} holds {', '.join(names)}")

    def _same_layer(self, layer: str) -> str | None:
        """The dataset ``layer`` means under another spelling: ``fc2`` for ``fc7``,
        ``block5_pool:GeM`` for ``pool5:gem``, and ``pool5:gem`` for a ``pool5`` that
        ``--pool gem`` made. None if none; ``OptionError`` if the layer has several."""
        architecture = vgg(int(self.attributes["depth"]))
        wanted = canonical_label(architecture, layer)
        canonical = {canonical_label(architecture, name): name for name in self.layers}
        if wanted in canonical:
            return canonical[wanted]
        base, head = split_label(wanted)
        same = [name for label, name in canonical.items() if split_label(label)[0] == base]
        if head is not None:
            by_head = [n for n in same if self.layers[n].pooling.split("(")[0] == head]
            return by_head[0] if len(by_head) == 1 else None
        if len(same) == 1:  # conv5_3 for the file's one conv5_3 dataset, conv5_3:none
            return same[0]
        if len(same) > 1:
            raise OptionError(
                f"--layer {layer}: {self.path} holds {len(same)} datasets of {base} "
                f"({', '.join(same)}): choose one"
            )
        return None

    def storage_bytes(self, name: str) -> int:
        """Bytes layer ``name`` takes on disk in the file (0 before the file exists)."""
        return self._file[f"features/{name}"].id.get_storage_size() if self._file else 0

    def locate(self, stored: str) -> str | None:
        """Where the image stored as ``stored`` is now, or None if it is gone."""
        return self._identity.locate(stored)


@dataclass(frozen=True)
class _PartColumn:
    """The new rows of one layer of a pending part, read when sliced."""

    pending: _Pending
    index: int

    def __call__(self, rows: slice) -> np.ndarray:
        pending = self.pending
        return pending.journal.column(pending.part, self.index, pending.new[rows])


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
    runs: list[dict[str, Any]]

    def __iter__(self) -> Iterator[Any]:
        """``paths, features = vggfeat.load(path)``."""
        return iter((self.paths, self.features))

    def __getitem__(self, index: int) -> Any:
        """``vggfeat.load(path)[0]`` is the paths, ``[1]`` the features."""
        return (self.paths, self.features)[index]


def load(path: str | os.PathLike) -> Features:
    """Read a vggfeat HDF5 file into memory (``vggfeat.open`` reads on demand).

    ``paths`` has one entry per row; ``features[name]`` is an (N, ...) array
    per stored layer; ``failed`` maps each unusable file to its reason;
    ``runs`` says which runs wrote the rows. A run finishing the file as it is
    read (a part gone) makes it read again, a few times, as ``open`` does.
    """
    for attempt in range(4):
        try:
            with open_features(path) as file:
                return Features(
                    paths=list(file.paths),
                    features={name: column[:] for name, column in file.features.items()},
                    failed=file.failed,
                    attributes=file.attributes,
                    runs=file.runs,
                )
        except OutputChanged:
            if attempt == 3:
                raise
            time.sleep(0.25 * (attempt + 1))
    raise AssertionError("unreachable")
