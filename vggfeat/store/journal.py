"""A run's journal: its committed parts, each written whole and checked on every read.

Completed rows never wait only in memory for long: every few hundred images
they are committed as a *part* in ``<output>.parts/``::

    part-0003-000017.npz                 shard 3's 17th commit: rows and failures, in order
    part-0003-000018.npz.<pid>-<hex>.tmp the next one, being written by its writer alone
    part-0003-000009.npz.damaged         a part that failed its check, set aside

A part is written under a temporary name of its writer's own, fsync'ed and
renamed, so it is whole or absent. Every read checks it: its paths, stamps and
features must agree in number and shape, or the part is refused as damaged
(and the images in it are computed again). The one rule: what a part holds
counts only once the part is whole, and a part holds whole batches.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vggfeat.atomic import RESERVE_BYTES, TEMPORARY_SUFFIX, require_space, write_atomically
from vggfeat.errors import OutputError
from vggfeat.store.identity import Stamp
from vggfeat.store.layout import Layout, Rows

#: A part is committed after this many images, bytes or seconds, whichever comes first.
COMMIT_IMAGES = 256
COMMIT_BYTES = 64 << 20
COMMIT_SECONDS = 30.0

_PART = re.compile(r"part-(\d{4})-(\d{6})\.npz")
#: A temporary file of shard N's writer: a part, or the shard's record of being done.
_TEMPORARY = re.compile(r"(?:part-(\d{4})-\d{6}\.npz|shard-(\d{4})\.json)" + TEMPORARY_SUFFIX)


class PartDamaged(OutputError):
    """A part whose arrays do not agree, or that cannot be read at all."""

    def __init__(self, part: Path, reason: str) -> None:
        super().__init__(f"{part} is damaged ({reason}); its images are computed again")
        self.part = part
        self.reason = reason


class OutputChanged(OutputError):
    """A part vanished while being read: a run finished the output meanwhile."""


def shard_of(part: Path) -> int:
    """The shard that committed ``part``."""
    found = _PART.fullmatch(part.name)
    if not found:
        raise ValueError(f"{part.name} is not a part's name")
    return int(found[1])


class Journal:
    """The parts of the run ``run`` (its plan's id) in ``folder``, for the output ``output``
    laid out as ``layout``. Each part carries the run's id: a part of another run is
    refused as damaged, never merged."""

    def __init__(self, folder: Path, output: Path, layout: Layout, run: str) -> None:
        self.folder = folder
        self.output = output
        self.layout = layout
        self.run = run

    def parts(self) -> list[Path]:
        """Every committed part, in the order of shards and commits."""
        return sorted(p for p in self.folder.glob("part-*.npz") if _PART.fullmatch(p.name))

    def kept(self) -> str:
        """What a message says is kept: the committed work, or that there is none yet."""
        if self.parts():
            return f"completed work is kept in {self.folder}"
        return "no image of this run was finished yet"

    # Writing -------------------------------------------------------------------------------

    def write(self, shard: int, rows: Rows) -> Path:
        """Commit ``rows`` as shard ``shard``'s next part: whole, or not at all."""
        arrays = {**_arrays(rows, self.layout), "run": np.array(self.run)}
        need = sum(array.nbytes for array in arrays.values()) + RESERVE_BYTES
        kept = self.kept()
        require_space(self.folder, need, "commit the latest images", self.output, kept)
        numbers = [int(m[2]) for p in self.folder.glob(f"part-{shard:04d}-*.npz")
                   if (m := _PART.fullmatch(p.name))]  # fmt: skip
        part = self.folder / f"part-{shard:04d}-{1 + max(numbers, default=0):06d}.npz"
        members: dict[str, Any] = arrays
        write_atomically(part, lambda file: np.savez(file, **members), self.output, kept)
        return part

    def set_aside(self, part: Path) -> Path:
        """Rename a damaged part out of the journal, where a person can still look at it."""
        aside = part.with_name(part.name + ".damaged")
        with contextlib.suppress(FileNotFoundError):
            os.replace(part, aside)
        return aside

    # Reading -------------------------------------------------------------------------------

    def read(self, part: Path, features: bool = False) -> Rows:
        """A part's rows and failures, checked; its features too if asked (else none).

        Raises ``PartDamaged`` for a part whose arrays disagree or cannot be
        read, and ``OutputChanged`` for one that vanished (a run finishing).
        """
        with _part_errors(part):
            if not stat.S_ISREG(os.stat(part).st_mode):  # a FIFO would never answer
                raise ValueError("not a regular file")
            # Opened here, so that a file np.load cannot read is closed all the same.
            with part.open("rb") as handle, np.load(handle, allow_pickle=False) as data:
                # Parts of vggfeat 0.1 carry no run's id.
                if "run" in data.files and str(data["run"]) != self.run:
                    raise ValueError(f"it belongs to another run ({data['run']}), not this one")
                shapes = [_shape(data, f"features_{i}") for i in range(len(self.layout.layers))]
                rows = Rows(
                    paths=data["paths"].tolist(),
                    size=data["size"],
                    mtime_ns=data["mtime_ns"],
                    features=tuple(
                        data[f"features_{i}"] for i in range(len(shapes) if features else 0)
                    ),
                    failed_paths=data["failed_paths"].tolist(),
                    failed_reasons=data["failed_reasons"].tolist(),
                    failed_size=data["failed_size"],
                    failed_mtime_ns=data["failed_mtime_ns"],
                )
            _check(rows, shapes, self.layout)
        return rows

    def column(self, part: Path, index: int, rows: np.ndarray) -> np.ndarray:
        """Layer ``index``'s values for the given rows of ``part``."""
        with (
            _part_errors(part),
            part.open("rb") as handle,
            np.load(handle, allow_pickle=False) as data,
        ):
            return data[f"features_{index}"][rows]

    def done(self) -> Iterator[tuple[Path, Rows | PartDamaged]]:
        """Each part with its rows (no features), or the reason it is damaged."""
        for part in self.parts():
            try:
                yield part, self.read(part)
            except PartDamaged as damage:
                yield part, damage


def remove_leftovers(folder: Path, shard: int) -> None:
    """Remove what a killed writer of ``shard`` left half-written: its temporary files."""
    for leftover in folder.glob("*.tmp"):
        found = _TEMPORARY.fullmatch(leftover.name)
        if found and int(found[1] or found[2]) == shard:
            leftover.unlink(missing_ok=True)


def stamps_of(rows: Rows) -> dict[str, Stamp]:
    """Every path of a part, row or failure, with its stamp."""
    sizes = [*rows.size.tolist(), *rows.failed_size.tolist()]
    times = [*rows.mtime_ns.tolist(), *rows.failed_mtime_ns.tolist()]
    return dict(zip(rows.keys, map(Stamp, sizes, times), strict=True))


def _arrays(rows: Rows, layout: Layout) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "paths": _strings(rows.paths),
        "size": np.asarray(rows.size, np.int64),
        "mtime_ns": np.asarray(rows.mtime_ns, np.int64),
        "failed_paths": _strings(rows.failed_paths),
        "failed_reasons": _strings(rows.failed_reasons),
        "failed_size": np.asarray(rows.failed_size, np.int64),
        "failed_mtime_ns": np.asarray(rows.failed_mtime_ns, np.int64),
    }
    for index, values in enumerate(rows.features):
        arrays[f"features_{index}"] = values
    _check(rows, [a.shape for a in rows.features], layout)
    return arrays


def _strings(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")


def _shape(data: Any, name: str) -> tuple[int, ...]:
    """The shape of one array of an open ``.npz``, from its header alone."""
    with data.zip.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        return tuple(read(member)[0])


def _check(rows: Rows, shapes: list[tuple[int, ...]], layout: Layout) -> None:
    """Raise ``ValueError`` unless a part's arrays agree with each other and the layout."""
    count, failures = len(rows.paths), len(rows.failed_paths)
    if not all(isinstance(p, str) for p in rows.paths + rows.failed_paths + rows.failed_reasons):
        raise ValueError("a path or reason is not text")
    if not len(rows.size) == len(rows.mtime_ns) == count:
        raise ValueError(f"{count} paths but {len(rows.size)} sizes and {len(rows.mtime_ns)} times")
    if not len(rows.failed_reasons) == len(rows.failed_size) == len(rows.failed_mtime_ns):
        raise ValueError("its failures' arrays disagree in length")
    if len(rows.failed_reasons) != failures:
        raise ValueError(f"{failures} failed paths but {len(rows.failed_reasons)} reasons")
    if len(shapes) != len(layout.layers):
        raise ValueError(f"{len(shapes)} layers, not {len(layout.layers)}")
    for shape, spec in zip(shapes, layout.layers, strict=True):
        if tuple(shape) != (count, *spec.shape):
            raise ValueError(
                f"{count} paths but {spec.name} holds {'x'.join(map(str, shape))} values"
            )


@contextlib.contextmanager
def _part_errors(part: Path) -> Iterator[None]:
    """A part gone (a finishing run deleted it) or damaged, as one line."""
    try:
        yield
    except FileNotFoundError:
        if part.is_symlink():
            raise PartDamaged(part, "a symlink to nothing") from None
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
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if "pickle" in reason:  # numpy's advice to load it unsafely is not for this file
            reason = "it holds pickled Python objects, which vggfeat never writes"
        raise PartDamaged(part, reason or type(error).__name__) from None
