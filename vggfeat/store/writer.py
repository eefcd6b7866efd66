"""The store's face to a run: what is done, this process's shares of the work, its commits.

``RunWriter.open`` runs every check that can refuse the command before
anything on disk changes, records the run's plan and its list of images (or
joins the run already recorded), and holds an exclusive lock on each shard it
works on: every unfinished shard for a plain run, one with ``--shard``.

A run with nothing to do on a finished output touches nothing: no folder, no
record, no lock, so any number of such runs (shards included) can start at once,
and one on a read-only file system answers as anywhere else.
A process that joins a run at the moment another finishes it, and removes its
folder, plans again.

Rows arrive a batch at a time. A batch joins the buffer whole, already in the
stored dtype, and the buffer is committed whole as one part: there is no
moment at which a part could hold paths without their features.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vggfeat.atomic import RESERVE_BYTES, Lock, refusal, require_space
from vggfeat.errors import OutputError
from vggfeat.images import Failure, Source
from vggfeat.interrupts import signals_deferred
from vggfeat.store.assemble import Assembler, Assembly, assembled_by
from vggfeat.store.hdf5 import counts, open_hdf5, read_attributes, stored_stamps
from vggfeat.store.identity import Identity, Stamp, home_of, output_path, parts_folder
from vggfeat.store.journal import (
    COMMIT_BYTES,
    COMMIT_IMAGES,
    COMMIT_SECONDS,
    Journal,
    PartDamaged,
    remove_leftovers,
    shard_of,
    stamps_of,
)
from vggfeat.store.layout import Layout, Rows
from vggfeat.store.plan import (
    WRITE_ELSEWHERE,
    Plan,
    Shard,
    abandoned,
    check_output,
    check_output_folder,
    check_unfinished,
    check_writable,
    claim,
    clear,
    extend_work,
    finished,
    lock_shards,
    needs_work,
    read_plan,
    read_work,
    record_finished,
    remove_folder,
    share_out,
    stored_settings,
    unfinish,
)

#: Rows of the output not among a run's inputs that are checked for a file that is gone.
MISSING_CHECKS = 100_000


@dataclass(frozen=True)
class _Request:
    """What a process asks of the store: the output, how it is laid out, the images this
    run was given, and how (``--overwrite``, ``--shard``, ``--update``, ``--prune``)."""

    path: Path
    layout: Layout
    images: Sequence[str]
    overwrite: bool
    shard: Shard | None
    update: bool
    prune: bool


class _FolderGone(Exception):
    """The parts folder went while this process joined its run: another wrote the output."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class PruneEverything(OutputError):
    """``--prune`` would drop every row of a file: confirm with ``--yes``."""


@dataclass(frozen=True)
class Batch:
    """Computed rows on their way to a part: one source per image, one array per layer."""

    sources: tuple[Source, ...]
    features: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class ShardWork:
    """The images one shard of this process still has to do, as paths to read."""

    index: int
    paths: list[str]


@dataclass
class _Buffer:
    batches: list[Batch] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(b.sources) for b in self.batches) + len(self.failures)


class RunWriter:
    """One process's share of a run: what is done, what it has to do, and its commits."""

    def __init__(
        self,
        path: Path,
        plan: Plan,
        locks: dict[int, Lock],
        identity: Identity,
        stored: tuple[dict[str, Stamp], dict[str, Stamp]],
    ) -> None:
        self.path = path
        self.folder = parts_folder(path)
        self.plan = plan
        self.identity = identity
        self.journal = Journal(self.folder, path, plan.layout, plan.id)
        self.stored_rows, self.stored_failed = stored
        self.notices: list[str] = []
        """Things a person should know that stop nothing (a damaged part set aside, say)."""
        self.commit_images = COMMIT_IMAGES
        self.work: list[ShardWork] = []
        self.already = self.left_for_later = 0
        self._locks = locks
        self._candidates: dict[str, str] = {}
        self._in_parts: dict[str, Stamp] = {}
        self._buffer = _Buffer()
        self._last_commit = time.monotonic()
        self._shard = min(locks, default=1)
        self._idle = False

    # Opening ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        output: str | os.PathLike,
        layout: Layout,
        images: Sequence[str],
        *,
        overwrite: bool = False,
        shard: Shard | None = None,
        update: bool = False,
        prune: bool = False,
    ) -> RunWriter:
        """Check ``output`` can take this run, plan it, and lock the shards this process does.

        ``images`` are the paths this run was given, in discovery order. Raises
        ``OutputError`` (changing nothing on disk) when the output cannot be
        written, is another program's file or damaged, holds other settings,
        has an unfinished run of other settings, or its shard is in use.
        """
        request = _Request(output_path(output), layout, images, overwrite, shard, update, prune)
        for attempt in range(3):
            try:
                return cls._open(request)
            except _FolderGone as gone:
                if attempt == 2:
                    raise gone.error from None
        raise AssertionError("unreachable")

    @classmethod
    def _open(cls, request: _Request) -> RunWriter:
        path = request.path
        check_output_folder(path)
        if path.exists() and not request.overwrite:
            check_output(path, request.layout.settings)
            stored = stored_settings(read_attributes(path))
            request = replace(request, layout=request.layout.named_as(stored))
        folder = parts_folder(path)
        earlier = read_plan(folder, path)
        if earlier is not None:
            count = request.shard.count if request.shard else None
            settings = request.layout.settings
            check_unfinished(earlier, path, settings, request.overwrite, count, request.prune)
        elif path.exists() and not request.overwrite:
            idle = cls._nothing_to_do(request)
            if idle is not None:
                return idle  # writes nothing: its folder may be read-only
        check_writable(path)
        try:
            return cls._locked(request, earlier)
        except (FileNotFoundError, OutputError) as error:
            if os.path.lexists(folder):
                raise
            # The run this process joined was finished, its folder removed, meanwhile.
            raise _FolderGone(error) from error

    @classmethod
    def _locked(cls, request: _Request, earlier: Plan | None) -> RunWriter:
        """The run planned (or joined), with this process's shards locked."""
        path, shard = request.path, request.shard
        folder = parts_folder(path)
        try:
            folder.mkdir(exist_ok=True)
        except OSError as error:
            refused = refusal(path.parent, error.errno)
            reason = f"{refused}; {WRITE_ELSEWHERE}" if refused else error.strerror or error
            raise OutputError(f"cannot write output {path}: {reason}") from None
        if earlier is not None and abandoned(earlier, request.layout):
            # --overwrite with other settings: the unfinished run is thrown away.
            every = lock_shards(folder, path, earlier.shards, range(1, earlier.shards + 1))
            clear(folder)
            for lock in every.values():
                lock.close()
            earlier = None
        shards = earlier.shards if earlier else (shard.count if shard else 1)
        locks = lock_shards(folder, path, shards, [shard.index] if shard else range(1, shards + 1))
        try:
            writer = cls._planned(request, earlier, locks, shards)
            require_space(folder, RESERVE_BYTES, "start", path, writer.journal.kept())
            return writer
        except BaseException:
            for lock in locks.values():
                lock.close()
            raise

    @classmethod
    def _planned(
        cls, request: _Request, earlier: Plan | None, locks: dict[int, Lock], shards: int
    ) -> RunWriter:
        """The run planned: its record claimed (or joined), damaged parts set aside, and
        this process's shares of the work."""
        path = request.path
        folder = parts_folder(path)
        for index in locks:
            remove_leftovers(folder, index)
        rebuilt = request.overwrite and not (earlier and assembled_by(path, earlier))
        identity, stored, candidates, basis = _survey(request, rebuilt)
        ours = Plan(uuid.uuid4().hex, request.layout, shards, request.overwrite, request.prune)
        plan = claim(folder, path, ours, basis)
        check_unfinished(
            plan, path, request.layout.settings, request.overwrite, None, request.prune
        )
        if plan.shards != shards:
            raise OutputError(
                f"another run of {path} started at the same moment; run the command again"
            )
        writer = cls(path, plan, locks, identity, stored)
        writer._candidates = candidates
        writer._read_journal()
        for index in [i for i in locks if finished(folder, i)]:
            locks.pop(index).close()
        writer._share_out(request.update, basis)
        return writer

    @classmethod
    def _nothing_to_do(cls, request: _Request) -> RunWriter | None:
        """A writer with nothing to do and nothing on disk, when every image is in the
        output as it is (and, with ``prune``, every row's file is there); None when there
        is work."""
        identity, stored, candidates, basis = _survey(request, False)
        if basis:
            return None
        if request.prune and any(identity.locate(key) is None for key in stored[0] | stored[1]):
            return None
        shards = request.shard.count if request.shard else 1
        plan = Plan(uuid.uuid4().hex, request.layout, shards, False)  # never recorded
        writer = cls(request.path, plan, {}, identity, stored)
        writer._candidates = candidates
        writer._idle = True
        writer.already = len(candidates)
        return writer

    def _read_journal(self) -> None:
        """What the whole parts hold; damaged ones are moved out of the journal, so that
        their images are computed again."""
        for part, read in self.journal.done():
            if not isinstance(read, PartDamaged):
                self._in_parts.update(stamps_of(read))
                continue
            shard = shard_of(part)
            borrowed = (
                None if shard in self._locks else Lock.take(self.folder / f"shard-{shard:04d}.lock")
            )
            if shard not in self._locks and borrowed is None:
                continue  # its shard's process is running: it sees to the part itself
            try:
                aside = self.journal.set_aside(part)
                unfinish(self.folder, shard)
            finally:
                if borrowed is not None:
                    borrowed.close()
            self.notices.append(f"{read.part} is damaged ({read.reason}); set aside as "
                                f"{aside.name} until the output is written, its images are "
                                "computed again")  # fmt: skip

    def _share_out(self, update: bool, basis: list[str]) -> None:
        """This process's shares of the run's list of images, and how many are done.

        A run recorded by vggfeat 0.1 has no list: this run's own ``basis`` stands in.
        """
        listed = read_work(self.folder, self.plan)
        shares = share_out(
            basis if listed is None else listed,
            self.plan.shards,
            mine=[i for i in sorted(self._locks) if not finished(self.folder, i)],
            unfinished=set(self.unfinished_shards()),
            candidates=self._candidates,
            in_parts=self._in_parts,
            stored=self.stored_rows | self.stored_failed,
            update=update,
            path_of=self._path,
        )
        holds_all = len(self._locks) == self.plan.shards
        if shares.listed != listed and (listed is not None or holds_all):
            extend_work(self.folder, self.path, self.plan, shares.listed, self.journal.kept())
        self.work = [ShardWork(i, [self._path(key) for key in keys]) for i, keys in shares.work]
        self.already, self.left_for_later = shares.already, shares.left_for_later

    def _path(self, key: str) -> str:
        """The path to read the image of ``key`` from: as given, where this run was given it."""
        return self._candidates.get(key) or self.identity.path(key)

    # What is done -----------------------------------------------------------------------------

    @property
    def in_parts(self) -> dict[str, Stamp]:
        """Every key committed in whole parts when the run was opened, with its stamp."""
        return self._in_parts

    @property
    def shards(self) -> list[int]:
        """The shards this process has to do, in order."""
        return sorted(self._locks)

    def gone(self) -> set[str]:
        """Keys of the output (rows and failures) whose files no longer exist."""
        stored = self.stored_rows | self.stored_failed
        return {key for key in stored if self.identity.locate(key) is None}

    def pruned(self, yes: bool) -> set[str]:
        """What ``--prune`` drops; refuses to drop every row unless ``yes``."""
        gone = self.gone()
        rows = self.stored_rows
        if rows and all(key in gone for key in rows) and not yes:
            raise PruneEverything(
                f"--prune would drop all {len(rows):,} rows of {self.path}: none of their files "
                f"exist as seen from {self.identity.home}; check the file and its images are "
                "where they were, or add --yes to drop them"
            )
        return gone

    def missing_rows(self) -> int | None:
        """Rows of the output, not among this run's images, whose files are gone; None when
        there are too many such rows to look at each."""
        others = [key for key in self.stored_rows if key not in self._candidates]
        if len(others) > MISSING_CHECKS:
            return None
        return sum(1 for key in others if self.identity.locate(key) is None)

    # Writing -------------------------------------------------------------------------------

    def begin(self, shard: int) -> None:
        """Commit what is buffered; the rows that follow belong to ``shard``."""
        self.commit()
        self._shard = shard

    def append(self, sources: Sequence[Source], features: Sequence[np.ndarray]) -> None:
        """Add one row per source; ``features`` holds one (len(sources), ...) array per layer.

        The batch is converted to the stored dtype before it joins the buffer,
        so an interrupt during the conversion leaves the buffer as it was.
        Commits a part when enough rows, bytes or time have gathered.
        """
        dtype = np.dtype(self.plan.layout.settings.dtype)
        batch = Batch(tuple(sources), tuple(np.asarray(f, dtype) for f in features))
        if any(len(values) != len(batch.sources) for values in batch.features):
            raise ValueError("internal: a batch's features do not match its images")
        self._buffer.batches.append(batch)
        self._commit_if_due()

    def add_failures(self, failures: Sequence[Failure]) -> None:
        """Record files that could not be used; committed like rows."""
        self._buffer.failures.extend(failures)
        self._commit_if_due()

    def _commit_if_due(self) -> None:
        images = sum(len(batch.sources) for batch in self._buffer.batches)
        if (
            len(self._buffer) >= self.commit_images
            or images * self.plan.layout.row_bytes >= COMMIT_BYTES
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
            self.journal.write(self._shard, self._rows(self._buffer))
            self._buffer = _Buffer()
            self._last_commit = time.monotonic()

    def buffered(self) -> int:
        """Images and failures computed but not committed yet."""
        return len(self._buffer)

    def _rows(self, buffer: _Buffer) -> Rows:
        sources = [s for batch in buffer.batches for s in batch.sources]
        layout = self.plan.layout
        features = tuple(
            np.concatenate([b.features[i] for b in buffer.batches])
            if buffer.batches
            else np.zeros((0, *spec.shape), layout.settings.dtype)
            for i, spec in enumerate(layout.layers)
        )
        return Rows(
            paths=[self.identity.key(source.path) for source in sources],
            size=np.array([source.size for source in sources], np.int64),
            mtime_ns=np.array([source.mtime_ns for source in sources], np.int64),
            features=features,
            failed_paths=[self.identity.key(f.path) for f in buffer.failures],
            failed_reasons=[f.reason for f in buffer.failures],
            failed_size=np.array([f.size for f in buffer.failures], np.int64),
            failed_mtime_ns=np.array([f.mtime_ns for f in buffer.failures], np.int64),
        )

    def finish_shard(self, shard: int, attributes: dict[str, object]) -> None:
        """Commit, and record that ``shard`` has done its share, with what computed it."""
        self.commit()
        record_finished(self.folder, shard, attributes, self.path, self.journal.kept())

    def unfinished_shards(self) -> list[int]:
        """Shards of the run that have not done their share yet; none once the run is over
        (its folder removed by the process that wrote the output)."""
        if self._idle or not self.folder.exists():
            return []
        return [i for i in range(1, self.plan.shards + 1) if not finished(self.folder, i)]

    def assemble(self, prune: set[str] | None = None) -> Assembly | None:
        """Write the output from the parts, once every shard is done; None if some are not.

        Only one process assembles: another that finishes at the same moment
        leaves it to the first. Removes the parts folder when done.
        """
        if self._idle:
            return self._as_it_is()
        if self.unfinished_shards():
            return None
        try:
            lock = Lock.take(self.folder / "assemble.lock")
        except FileNotFoundError:
            return self._as_it_is()  # another process assembled and removed the folder
        if lock is None:
            return None
        try:
            if not self.folder.exists():
                return self._as_it_is()
            try:
                result = Assembler(self.plan, self.journal, self.path, prune or set()).run()
            except PartDamaged as damage:
                self.journal.set_aside(damage.part)
                unfinish(self.folder, shard_of(damage.part))
                raise OutputError(
                    f"{damage.part} is damaged ({damage.reason}); it was set aside, and the "
                    "same command computes its images again"
                ) from None
        finally:
            lock.close()
        self._remove_folder()
        return result

    def _as_it_is(self) -> Assembly | None:
        """The output as written, by another process or earlier: nothing added now."""
        if not self.path.exists():
            return None
        with open_hdf5(self.path) as file:
            return Assembly(0, 0, 0, *counts(file))

    def _remove_folder(self) -> None:
        others = remove_folder(self.folder)
        if others:
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            self.notices.append(
                f"{self.folder} holds files vggfeat did not write ({', '.join(others[:3])}"
                f"{more}); they are left as they are, and the folder with them"
            )

    def close(self) -> None:
        """Release the locks; committed parts stay for the next run to continue from."""
        for lock in self._locks.values():
            lock.close()
        self._locks = {}

    def discard(self) -> None:
        """Release the locks; remove the parts folder if it holds no work and no one uses it."""
        if self._idle:
            return
        others = [i for i in range(1, self.plan.shards + 1) if i not in self._locks]
        held = [Lock.take(self.folder / f"shard-{i:04d}.lock") for i in others]
        try:
            idle = all(lock is not None for lock in held)
            if idle and not self.journal.parts() and not any(self.folder.glob("shard-*.json")):
                self._remove_folder()
        finally:
            for lock in held:
                if lock is not None:
                    lock.close()
            self.close()


def _survey(
    request: _Request, rebuilt: bool
) -> tuple[Identity, tuple[dict[str, Stamp], dict[str, Stamp]], dict[str, str], list[str]]:
    """How this run names its images, what the output holds (rows, failures), this run's
    images by key, and the keys that need work, in the run's order."""
    path = request.path
    empty: dict[str, Stamp] = {}
    stored = (empty, empty) if rebuilt or not path.exists() else stored_stamps(path)
    identity = Identity(home_of(path))
    candidates: dict[str, str] = {}
    for image in request.images:
        candidates.setdefault(identity.key(image), image)  # one image, however named
    done = stored[0] | stored[1]
    update = request.update
    basis = [key for key, image in candidates.items() if needs_work(image, done.get(key), update)]
    return identity, stored, candidates, basis
