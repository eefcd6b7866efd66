"""A run's plan: what every process of a run agrees on, recorded before any work is done.

Next to the journal's parts, the parts folder holds the run's record::

    run.json             the plan: settings and datasets, shards, overwrite or not, its id
    work-<id>.json       the images the run has to do, in discovery order, as keys; every
                         shard's share is cut from this list, the same for every process
    shard-0003.lock      held (flock) by the process working on shard 3; its PID inside
    shard-0003.json      written once shard 3 has done its share: what computed it
    assemble.lock        held by the process writing the output
    assembling.h5        a new output being built; discarded if interrupted

Every check that can refuse a command runs here before anything on disk changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vggfeat.atomic import TEMPORARY_SUFFIX, Lock, fsync_folder, why_unwritable, write_atomically
from vggfeat.errors import OptionError, OutputError
from vggfeat.store.hdf5 import FORMAT_VERSION, counts, open_hdf5, read_attributes
from vggfeat.store.identity import Stamp, parts_folder
from vggfeat.store.layout import Layout, Settings

#: What to do about an output that cannot be continued, after the reason.
OUTPUT_ADVICE = "; choose another -o, or --overwrite to replace it"
#: What to do about an output whose folder cannot be written.
WRITE_ELSEWHERE = "write the output elsewhere with -o"


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` (1-based) of the images a run has to do."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"3/16"`` as a shard; ``OptionError`` for anything else."""
        found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not found or not 1 <= int(found[1]) <= int(found[2]):
            raise OptionError(
                f"--shard {text} is not K/N with 1 <= K <= N; for example --shard 3/16"
            )
        return cls(int(found[1]), int(found[2]))

    def share(self, items: Sequence[str]) -> Sequence[str]:
        """This shard's contiguous share of ``items``, the same in every process."""
        count = len(items)
        return items[(self.index - 1) * count // self.count : self.index * count // self.count]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Plan:
    """The run recorded in ``run.json``: what every shard of it must agree on."""

    id: str
    layout: Layout
    shards: int
    overwrite: bool
    prune: bool = False
    """Whether the output drops the rows whose files are gone (vggfeat 0.1 did not say)."""

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, **self.layout.to_dict(), "shards": self.shards,
             "overwrite": self.overwrite, "prune": self.prune}
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Plan:
        values = json.loads(text)
        layout = Layout.from_dict(values)
        return cls(
            values["id"], layout, values["shards"], values["overwrite"], values.get("prune", False)
        )


def read_plan(folder: Path, output: Path) -> Plan | None:
    """The unfinished run in ``folder``, if any."""
    try:
        return Plan.from_json((folder / "run.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OutputError(
            f"the unfinished run in {folder} cannot be read ({error}); delete that folder "
            "to abandon it and run again"
        ) from None


def claim(folder: Path, output: Path, plan: Plan, work: list[str]) -> Plan:
    """Record ``plan`` and its ``work`` as the run's, unless another process recorded a
    plan first: then that one."""
    record = folder / "run.json"
    kept = "nothing was computed yet"
    work_file = _work_file(folder, plan)
    write_atomically(work_file, lambda f: f.write(json.dumps(work).encode()), output, kept)
    temporary = folder / f"run.json.{os.getpid()}.claim"
    write_atomically(temporary, lambda f: f.write(plan.to_json().encode()), output, kept)
    try:
        os.link(temporary, record)
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    fsync_folder(folder)
    recorded = read_plan(folder, output) or plan
    if recorded.id != plan.id:
        work_file.unlink(missing_ok=True)
    return recorded


def read_work(folder: Path, plan: Plan) -> list[str] | None:
    """The keys of the images ``plan`` has to do, in order; None for a run that vggfeat 0.1
    recorded, without a list."""
    path = _work_file(folder, plan)
    try:
        work = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise _unreadable(path, folder, error) from None
    if not isinstance(work, list) or not all(isinstance(key, str) for key in work):
        raise _unreadable(path, folder, "not a list of paths")
    return work


def _unreadable(path: Path, folder: Path, error: object) -> OutputError:
    return OutputError(
        f"the unfinished run's list of images {path} cannot be read ({error}); delete "
        f"{folder} to abandon the run and run again"
    )


def extend_work(folder: Path, output: Path, plan: Plan, work: list[str], kept: str) -> None:
    """Replace ``plan``'s list of images; only a process holding every shard may."""
    data = json.dumps(work).encode()
    write_atomically(_work_file(folder, plan), lambda f: f.write(data), output, kept)


def _work_file(folder: Path, plan: Plan) -> Path:
    return folder / f"work-{plan.id}.json"


# Shares of the work ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shares:
    """What one process of a run has to do, by the run's list of images."""

    work: list[tuple[int, list[str]]]
    """Each shard this process does, with the keys it still has to do, in order."""
    already: int
    """Of this process's images, those done: in the output, in parts, or another's share."""
    left_for_later: int
    """Images this process was given that the run did not list and cannot take in."""
    listed: list[str]
    """The run's list, with the images this process was given taken in where it may."""


def share_out(
    listed: list[str],
    shards: int,
    *,
    mine: list[int],
    unfinished: set[int],
    candidates: dict[str, str],
    in_parts: dict[str, Stamp],
    stored: dict[str, Stamp],
    update: bool,
    path_of: Callable[[str], str],
) -> Shares:
    """Each of ``mine`` (shards this process holds, unfinished) gets its contiguous share
    of ``listed``, less what is in parts. Images given to this process that the list lacks
    (added since the run started) join the list when the run is one shard held here; else
    the next run adds them."""
    known = set(listed)
    extras = [
        key
        for key, path in candidates.items()
        if key not in known and key not in in_parts and needs_work(path, stored.get(key), update)
    ]
    if extras and mine == [1] and shards == 1:
        listed, extras = [*listed, *extras], []
    work = []
    busy = set(extras)
    for index in range(1, shards + 1):
        share = Shard(index, shards).share(listed)
        if index in mine:
            todo = [key for key in share if needs_work(path_of(key), in_parts.get(key), update)]
            work.append((index, todo))
            busy.update(todo)
        elif index in unfinished:
            busy.update(share)  # another process's
    already = sum(1 for key in candidates if key not in busy)
    return Shares(work, already, len(extras), listed)


def needs_work(path: str, done: Stamp | None, update: bool) -> bool:
    """Whether the image at ``path`` is new, or, with ``update``, changed since ``done``."""
    if done is None:
        return True
    if not update:
        return False
    try:
        info = os.stat(path)
    except OSError:
        return False  # gone: kept unless pruned
    return Stamp(info.st_size, info.st_mtime_ns) != done


# Checks before anything changes ---------------------------------------------------------------


def check_output_folder(path: Path) -> None:
    """Refuse an output that is a folder, or whose folder is missing or not a folder."""
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
    if not os.access(parent, os.X_OK):  # where the output is cannot even be looked at
        raise OutputError(
            f"cannot write output {path}: no permission to write in {parent}; {WRITE_ELSEWHERE}"
        )


def check_writable(path: Path) -> None:
    """Refuse an output whose folder, or parts folder, this process cannot make files in:
    a read-only file system, or no permission."""
    folder = parts_folder(path)
    for place in (path.parent, *([folder] if folder.is_dir() else [])):
        refused = why_unwritable(place)
        if refused is not None:
            raise OutputError(f"cannot write output {path}: {refused}; {WRITE_ELSEWHERE}")


def check_output(path: Path, settings: Settings) -> None:
    """The output to continue is a vggfeat file of this format with the same settings."""
    attributes = read_attributes(path, OUTPUT_ADVICE)
    if int(attributes["format_version"]) < FORMAT_VERSION:
        raise OutputError(
            f"{path} was written by an older vggfeat (format {attributes['format_version']}); "
            f"this one reads it but continues only format {FORMAT_VERSION}: --overwrite "
            "recomputes it, -o writes a new file"
        )
    try:
        with open_hdf5(path) as file:
            counts(file)
    except (OSError, KeyError, ValueError) as error:
        raise OutputError(
            f"{path} is damaged ({str(error).strip().splitlines()[0]}); --overwrite replaces "
            "it, -o writes a new file"
        ) from None
    differences = stored_settings(attributes).differences(settings)
    if differences:
        raise OutputError(
            f"output {path} was written with other settings ({'; '.join(differences)}); "
            "run with the file's settings to continue it, --overwrite to replace it, "
            "or -o for a new file"
        )


def stored_settings(attributes: dict[str, Any]) -> Settings:
    return Settings.from_dict(json.loads(attributes["settings"]))


def abandoned(earlier: Plan, layout: Layout) -> bool:
    """Whether an unfinished run is to be thrown away: --overwrite with other settings."""
    return bool(earlier.layout.settings.differences(layout.settings))


def check_unfinished(
    earlier: Plan,
    path: Path,
    settings: Settings,
    overwrite: bool,
    shard_count: int | None,
    prune: bool,
) -> None:
    """Refuse a run that does not fit the unfinished one in the parts folder."""
    folder = parts_folder(path)
    differences = earlier.layout.settings.differences(settings, "in the unfinished run")
    how = "with --overwrite " if earlier.overwrite else ""
    if differences and not overwrite:
        command = earlier.layout.attributes.get("command", "")
        raise OutputError(
            f"output {path} has an unfinished run {how}with other settings "
            f"({'; '.join(differences)}) in {folder}; finish it first ({command}), "
            f"or --overwrite to replace it with this run, or delete {folder} to abandon it"
        )
    if differences:
        return  # --overwrite starts again
    if earlier.overwrite != overwrite:
        keep = f" and keep {path} as it is" if path.exists() else ""
        abandon = f"or, once no process runs it, delete {folder} to abandon it"
        if earlier.overwrite:
            raise OutputError(
                f"output {path} has an unfinished --overwrite run in {folder}; add --overwrite "
                f"to finish it, {abandon}{keep}"
            )
        what = "that adds to it" if path.exists() else "(without --overwrite) that writes it"
        raise OutputError(
            f"output {path} has an unfinished run {what} in {folder}; run without "
            f"--overwrite to finish it, {abandon}"
        )
    if earlier.prune != prune:
        kind, how = (
            ("a --prune run", "add --prune") if earlier.prune else ("a run", "leave out --prune")
        )
        raise OutputError(
            f"output {path} has {kind} unfinished in {folder}; {how} to finish it, or, once no "
            f"process runs it, delete {folder} to abandon it"
        )
    if shard_count is not None and shard_count != earlier.shards:
        raise OutputError(
            f"output {path} has an unfinished run split into {earlier.shards} shards; "
            f"run --shard K/{earlier.shards} for each K, or without --shard to finish them all"
        )


# Shards: their locks and records -------------------------------------------------------------


def lock_shards(folder: Path, path: Path, count: int, wanted: Iterable[int]) -> dict[int, Lock]:
    """Locks on the ``wanted`` shards of ``count``; refused at once if another process holds one."""
    locks: dict[int, Lock] = {}
    try:
        for index in wanted:
            lock = Lock.take(folder / f"shard-{index:04d}.lock")
            if lock is None:
                holder = Lock.holder(folder / f"shard-{index:04d}.lock")
                what = (
                    f"output {path} is in use"
                    if count == 1
                    else f"shard {index}/{count} of output {path} is being done"
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


def finished(folder: Path, shard: int) -> bool:
    return (folder / f"shard-{shard:04d}.json").exists()


def unfinish(folder: Path, shard: int) -> None:
    """Take back shard ``shard``'s record of being done: some of its work was lost."""
    (folder / f"shard-{shard:04d}.json").unlink(missing_ok=True)


def record_finished(
    folder: Path, shard: int, attributes: dict[str, Any], output: Path, kept: str
) -> None:
    """Record that ``shard`` has done its share, with what computed it."""
    data = json.dumps({"attributes": attributes}).encode()
    write_atomically(folder / f"shard-{shard:04d}.json", lambda f: f.write(data), output, kept)


def shard_records(folder: Path) -> list[dict[str, Any]]:
    """What each finished shard recorded about computing its share."""
    found = []
    for record in sorted(folder.glob("shard-[0-9][0-9][0-9][0-9].json")):
        try:
            learnt = json.loads(record.read_text()).get("attributes", {})
            if not isinstance(learnt, dict):
                raise TypeError("not an object")
            json.loads(learnt.get("rows_per_node", "{}")).items()
        except (OSError, ValueError, AttributeError, TypeError) as error:
            raise OutputError(
                f"{record} is damaged ({error}); delete it, and the same command "
                "finishes that shard again"
            ) from None
        found.append(learnt)
    return found


#: The files a run keeps in its parts folder; nothing else there is vggfeat's.
OWN_FILES = (
    "part-*.npz", "part-*.npz.damaged", "run.json", "run.json.*.claim", "work-*.json",
    "shard-*.json", "shard-*.lock", "assemble.lock", "assembling.h5",
)  # fmt: skip
#: The name of a file being written (``atomic.temporary_name``).
OWN_TEMPORARY = re.compile(".+" + TEMPORARY_SUFFIX)


def remove_folder(folder: Path) -> list[str]:
    """Remove a finished run's parts folder: the files vggfeat wrote there, then the folder,
    unless it holds others (someone's own, or a folder under one of our names); those it
    names and leaves as they are."""
    owned = [own for pattern in OWN_FILES for own in folder.glob(pattern)]
    owned += [entry for entry in folder.glob("*.tmp") if OWN_TEMPORARY.fullmatch(entry.name)]
    for own in owned:
        if own.is_symlink() or not own.is_dir():
            own.unlink(missing_ok=True)
    others = sorted(entry.name for entry in folder.iterdir()) if folder.exists() else []
    if not others:
        with contextlib.suppress(FileNotFoundError):
            folder.rmdir()
    return others


def clear(folder: Path) -> None:
    """Throw away an unfinished run's work: parts, records, its list, a half-built output."""
    for stale in [
        *folder.glob("part-*.npz"),
        *folder.glob("shard-*.json"),
        *folder.glob("work-*.json"),
        folder / "assembling.h5",
        folder / "run.json",
    ]:
        stale.unlink(missing_ok=True)
