"""The output written from a run's parts, once every shard is done.

An existing output is continued in place: each part is appended, committed
(``hdf5.py`` says how that survives a kill) and then deleted. Where that
cannot be done (a fresh output, ``--overwrite``, ``--prune``, a path moving
between rows and failures, paths wider than the file's) a new file is built
next to the parts from the old one's rows and the parts, and renamed over the
output only when complete. Appending a part twice changes nothing: a path
already in the file is replaced, never added again. Either way the run's own
record joins ``/runs``, once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vggfeat.atomic import RESERVE_BYTES, fsync_file, fsync_folder, require_space, write_error
from vggfeat.errors import OutputError
from vggfeat.interrupts import signals_deferred
from vggfeat.store.hdf5 import (
    Appender,
    appending,
    blocks,
    counts,
    create,
    encoded_length,
    failures,
    open_hdf5,
    path_width,
    read_attributes,
    read_runs,
)
from vggfeat.store.journal import Journal
from vggfeat.store.layout import Layout, Rows
from vggfeat.store.plan import Plan, shard_records

#: The provenance a run's entry in ``/runs`` keeps, from the plan and the shards' records.
RUN_FACTS = ("command", "vggfeat_version", "keras_version", "backend", "backend_version",
             "device", "engine", "precision", "weights_sha256")  # fmt: skip


@dataclass(frozen=True)
class Assembly:
    """What writing the output did."""

    appended: int
    replaced: int
    dropped: int
    rows: int
    failures: int


def assembled_by(path: Path, plan: Plan) -> bool:
    """Whether ``path`` was already built from ``plan``'s parts (a kill before cleaning up)."""
    try:
        return read_attributes(path).get("parts_id") == plan.id
    except OutputError:
        return False  # damaged: --overwrite replaces it


class Assembler:
    """Writes one run's parts into the output: in place where it can, else a new file."""

    def __init__(self, plan: Plan, journal: Journal, path: Path, prune: set[str]) -> None:
        self.plan = plan
        self.layout = plan.layout
        self.journal = journal
        self.path = path
        self.prune = prune
        self.parts = journal.parts()
        # A path in several parts (re-read by --update) is a row or a failure as it was
        # committed last: True for a row.
        self.is_row: dict[str, bool] = {}
        for part in self.parts:
            rows = journal.read(part)
            self.is_row.update((key, True) for key in rows.paths)
            self.is_row.update((key, False) for key in rows.failed_paths)
        self.width = path_width(encoded_length(list(self.is_row)))
        self.provenance = _provenance(plan, journal.folder)

    def run(self) -> Assembly:
        continuing = self.path.exists() and (
            not self.plan.overwrite or assembled_by(self.path, self.plan)
        )
        if not continuing:
            return self._build(source=None)
        if assembled_by(self.path, self.plan) or (not self.parts and not self.prune):
            # A run killed after writing its output, before cleaning up; or nothing to add.
            with open_hdf5(self.path) as file:
                return Assembly(0, 0, 0, *counts(file))
        with appending(self.path) as appender:
            row_keys = [key for key, row in self.is_row.items() if row]
            moves = appender.moves(row_keys, [k for k, row in self.is_row.items() if not row])
            if not (moves or self.prune or appender.width < self.width):
                return self._append(appender)
            self.width = max(self.width, appender.width)
        return self._build(source=self.path, drop=moves | self.prune)

    def _append(self, appender: Appender) -> Assembly:
        rows, replaced = appender.rows, self._replaced(appender.row_of)
        appended = sum(1 for key, row in self.is_row.items() if row and key not in appender.row_of)
        if self.plan.id not in {run.get("id") for run in read_runs(appender.file)}:
            # First, so that a kill part-way leaves the run on record, with what it adds.
            appender.add_run(self._run_record(appended, replaced, 0))
            appender.commit()
        for part in self.parts:
            with signals_deferred():
                appender.add(self._latest(part))
                appender.commit()
                part.unlink()
        return Assembly(appender.rows - rows, replaced, 0, appender.rows, appender.failures)

    def _replaced(self, stored: dict[str, int]) -> int:
        """How many rows of the file the parts replace."""
        return sum(1 for key, row in self.is_row.items() if row and key in stored)

    def _build(
        self, source: Path | None, drop: set[str] | frozenset[str] = frozenset()
    ) -> Assembly:
        """A new output from ``source``'s rows minus ``drop``, then the parts; renamed in."""
        temporary = self.journal.folder / "assembling.h5"
        temporary.unlink(missing_ok=True)
        need = sum(p.stat().st_size for p in self.parts) + RESERVE_BYTES
        need += source.stat().st_size if source else 0
        kept = self.journal.kept()
        require_space(self.journal.folder, need, "write the output", self.path, kept)
        try:
            create(temporary, self._new_layout(source), self.width)
            with appending(temporary) as appender:
                dropped, runs = self._copy(source, appender, drop) if source else (0, [])
                kept_rows, replaced = appender.rows, self._replaced(appender.row_of)
                for part in self.parts:
                    appender.add(self._latest(part))
                appended = appender.rows - kept_rows
                for run in runs:
                    appender.add_run(run)
                appender.add_run(self._run_record(appended, replaced, dropped))
                appender.commit()
                rows, failed = appender.rows, appender.failures
            fsync_file(temporary)
            os.replace(temporary, self.path)
            fsync_folder(self.path.parent)
        except (OSError, RuntimeError) as error:
            # HDF5 reports a failed write as OSError, or as RuntimeError when closing.
            temporary.unlink(missing_ok=True)
            raise write_error(error, temporary, self.path, kept) from error
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return Assembly(appended, replaced, dropped, rows, failed)

    def _new_layout(self, source: Path | None) -> Layout:
        """The new file's layout: the first run's attributes where there is an older file."""
        attributes = dict(self.provenance)
        if source is not None:
            with open_hdf5(source) as file:
                first = {key: value for key, value in file.attrs.items() if key != "settings"}
            attributes = {k: v for k, v in first.items() if k not in ("format", "format_version")}
        attributes["parts_id"] = self.plan.id
        return Layout(self.layout.settings, self.layout.layers, self.layout.compression, attributes)

    def _copy(
        self, source: Path, appender: Appender, drop: set[str] | frozenset[str]
    ) -> tuple[int, list[dict[str, Any]]]:
        """Copy ``source``'s rows, failures and runs, minus ``drop``: (rows dropped, runs)."""
        names = [spec.name for spec in self.layout.layers]
        none = np.zeros(0, bool)
        dropped = 0
        with open_hdf5(source) as file:
            rows, _ = counts(file)
            for block in blocks(file, names, rows, self.layout.row_bytes):
                keep = np.array([key not in drop for key in block.paths], bool)
                appender.add(block.select(keep, none))
                dropped += int((~keep).sum())
            failed = failures(file, self.layout)
            appender.add(failed.select(none, np.array([k not in drop for k in failed.keys], bool)))
            return dropped, read_runs(file)

    def _latest(self, part: Path) -> Rows:
        """A part's rows and failures, less those a later part moved to the other kind.

        A row that a later part commits again stays: it keeps its place in the
        order, and the later part replaces it there.
        """
        rows = self.journal.read(part, features=True)
        return rows.select(
            np.array([self.is_row[key] for key in rows.paths], bool),
            np.array([not self.is_row[key] for key in rows.failed_paths], bool),
        )

    def _run_record(self, appended: int, replaced: int, dropped: int) -> dict[str, Any]:
        """This run's entry in ``/runs``."""
        facts = {key: self.provenance[key] for key in RUN_FACTS if key in self.provenance}
        per_node = json.loads(self.provenance.get("rows_per_node", "{}"))
        return {
            "id": self.plan.id,
            "started": self.provenance.get("created", ""),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            **facts,
            "rows_per_node": per_node,
            "rows_added": appended,
            "rows_replaced": replaced,
            "rows_dropped": dropped,
        }


def _provenance(plan: Plan, folder: Path) -> dict[str, Any]:
    """The plan's attributes, with what the shards learnt computing (versions, hashes)."""
    attributes = dict(plan.layout.attributes)
    rows_per_node: dict[str, int] = {}
    for learnt in shard_records(folder):
        attributes.update({k: v for k, v in learnt.items() if v not in ("", None)})
        for node, rows in json.loads(learnt.get("rows_per_node", "{}")).items():
            rows_per_node[node] = rows_per_node.get(node, 0) + rows  # every shard's
    if rows_per_node:
        attributes["rows_per_node"] = json.dumps(rows_per_node)
    return attributes
