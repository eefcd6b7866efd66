"""A run: plan it, drive an engine through it, finish the output.

- **plan**: the settings the output records, the store opened (what is done,
  this process's shares of the rest);
- **drive**: the engine's results taken into the store in input order,
  committed as they come, progress reported as events;
- **finish**: the output written once every shard is done, and a summary.

Nothing here prints; the command line shows the events and the summary.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vggfeat.engine import Engine, Result
from vggfeat.images import RESAMPLING, Failure, discover, pixel_limit
from vggfeat.interrupts import Terminated, raise_kept_stop, stopping_on_signals
from vggfeat.options import ExtractOptions
from vggfeat.preprocessing import preprocessing
from vggfeat.runtime import require
from vggfeat.store import Assembly, Layout, RunWriter, Shard, output_path, parts_folder
from vggfeat.weights import (
    WeightsRecord,
    check_fits,
    fetch_weights,
    identify_weights,
    source_of,
)

#: Compressions offered for files written before, and what new files get instead: LZF is
#: h5py's own filter, which h5dump, R and the browser viewers cannot read.
WRITTEN_AS = {"lzf": "gzip"}


@dataclass(frozen=True)
class Progress:
    """Where a run stands: sent once before the first image, then after every batch."""

    done: int
    """Images handled in this run, stored or failed."""
    failed: int
    total: int
    """Images this run has to handle (those already done excluded)."""
    elapsed: float
    """Seconds since the first batch started."""
    already: int = 0
    """Images of this run's share already done by earlier runs."""


@dataclass(frozen=True)
class Timings:
    """Where a run's wall time went, in seconds: ``startup``, ``waiting``, ``network`` and
    ``writing`` add up to it. An engine that computes elsewhere (Ray) is timed as this
    process sees it: waiting for its results, and writing them."""

    startup: float
    """Finding images, building the network, loading weights; with an engine that computes
    elsewhere, until its first results came (its networks are built meanwhile)."""
    waiting: float
    """The network idle, waiting for images to be read and decoded; with an engine that
    computes elsewhere, waiting for its results (decoding and network both)."""
    network: float
    """The network computing in this process (tracing the function once included)."""
    writing: float
    """Committing rows, and writing the output at the end."""
    network_elsewhere: float | None = None
    """With an engine that computes elsewhere, its networks' computing time summed over
    them: they compute side by side, so it may well exceed the wall time. None otherwise."""


@dataclass(frozen=True)
class Summary:
    """What a run did."""

    output: Path
    computed: int
    """Images this run put through the network."""
    failures: tuple[Failure, ...]
    """Files this run could not use, with the reasons (also in ``/failed``)."""
    already: int
    """Images of this run's share done by earlier runs (in the file or committed)."""
    assembled: bool
    """Whether this run wrote the output; False while other shards are still running."""
    stored: int
    """Rows the output gained (new images, in this run or in other shards)."""
    replaced: int
    """Rows read again and replaced (``update``)."""
    dropped: int
    """Rows dropped: their files are gone (``prune``), or no longer decode (``update``)."""
    rows: int
    """Rows in the file now (0 while not assembled)."""
    waiting_for: tuple[int, ...]
    """Shards that have not done their share, when not assembled."""
    shard: Shard | None
    engine: str
    """``local`` or ``ray``."""
    rows_per_node: dict[str, int]
    """Images computed on each machine (``local`` for the local engine)."""
    computed_by: str
    """What computed this run's images: device, compute dtype, backend and version."""
    seconds: float
    timings: Timings
    file_bytes: int
    batch_size: int
    """The batch size used at the end: lower than chosen after running out of memory."""
    requested_batch_size: int
    """The batch size chosen at the start: asked for, or what fits."""
    notices: tuple[str, ...] = ()
    """Lines for the user that stopped nothing: a batch capped, a damaged part set aside."""
    missing: int | None = 0
    """Rows of the output whose files no longer exist (not counted: None)."""
    left_for_later: int = 0
    """Images found that an unfinished sharded run did not list: the next run adds them."""

    @property
    def images_per_second(self) -> float:
        """Images handled per second once running (start-up not counted)."""
        running = self.timings.waiting + self.timings.network + self.timings.writing
        handled = self.computed + len(self.failures)
        return handled / running if running > 0 else 0.0


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after committing its completed work.

    ``exit_code`` is 130 for Ctrl-C and 143 for SIGTERM; ``parts`` is the
    folder that holds the committed work, from which the same call continues.
    """

    def __init__(self, exit_code: int, parts: Path) -> None:
        super().__init__(exit_code, parts)
        self.exit_code = exit_code
        self.parts = parts


def extract(
    inputs: ExtractOptions | str | os.PathLike[str] | Iterable[str | os.PathLike[str]] = (),
    output: str | os.PathLike[str] = "features.h5",
    *,
    on_progress: Callable[[Progress], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    **options: Any,
) -> Summary:
    """Extract features of every image in ``inputs`` (a folder or an image file, or a list
    of them) into the HDF5 file ``output``.

    Takes an ``ExtractOptions``, or the inputs, the output and the same
    keywords (``layers=["fc7"]``, ``engine="ray"``, ...) to make one. Does what
    ``vggfeat extract`` does, with the same defaults. Completed images are
    committed every ``commit_every`` images (or 64 MB, or 30 s) and the output
    is written when all are done, so running it again on the same output after
    any interruption continues: images already stored (or recorded as failed)
    are skipped, whatever the spelling of their path. ``on_progress`` gets a
    ``Progress`` after every batch, ``on_notice`` a line for anything the user
    should know that stops nothing.

    Raises a ``VggfeatError`` subclass for anything the caller can fix, before
    anything is written, and ``Interrupted`` (a ``KeyboardInterrupt``) after
    Ctrl-C or SIGTERM, once completed work is safe.
    """
    if isinstance(inputs, ExtractOptions):
        if options or os.fspath(output) != "features.h5":
            raise TypeError("extract(options) takes no other options: they are in the object")
        chosen = inputs
    else:
        chosen = ExtractOptions.make(inputs, output, **options)
    return _Run(chosen, on_progress, on_notice).execute()


class _Run:
    """One call of ``extract``: plan, drive, finish."""

    def __init__(
        self,
        options: ExtractOptions,
        on_progress: Callable[[Progress], None] | None,
        on_notice: Callable[[str], None] | None,
    ) -> None:
        self.options = options
        self.on_progress = on_progress
        self.on_notice = on_notice
        self.notices: list[str] = []
        self.started = time.perf_counter()
        self.first_batch = self.started
        self.total = self.already = self.computed = 0
        self.failures: list[Failure] = []
        self.waiting = self.network = self.writing = self.network_elsewhere = 0.0

    def execute(self) -> Summary:
        weights, images = self._preflight()
        engine = self.options.engine.open()
        try:
            with stopping_on_signals(), pixel_limit(self.options.max_pixels):
                return self._run(engine, weights, images)
        finally:
            engine.close()

    def _preflight(self) -> tuple[WeightsRecord, list[str]]:
        """What can be refused before any backend or cluster starts: a missing package, a
        weights file that does not fit, inputs that do not exist. The weights, the images."""
        options = self.options
        options.engine.require()
        require(options.backend)
        weights = identify_weights(
            options.architecture, options.needs_top, options.weights, options.seed
        )
        check_fits(options.architecture, options.image_size, options.deepest, options.weights)
        return weights, discover(options.inputs, options.files_from)

    def _run(self, engine: Engine, weights: WeightsRecord, images: list[str]) -> Summary:
        """Plan, drive, finish; on a stop or an error, keep what is computed first."""
        writer: RunWriter | None = None
        try:
            writer = self._plan(engine, self._fetched(weights), images)
            pruned = writer.pruned(self.options.yes) if self.options.prune else set()
            self._drive(engine, writer)
            return self._finish(engine, writer, pruned)
        except (KeyboardInterrupt, Terminated) as stop:
            if writer is not None:
                self._keep_what_is_done(writer, stop)
            reason = engine.stop_reason()
            if reason is not None:
                raise reason from None
            code = 143 if isinstance(stop, Terminated) else 130
            raise Interrupted(code, parts_folder(output_path(self.options.output))) from None
        except BaseException as error:
            if writer is not None:
                self._keep_what_is_done(writer, error)
            raise

    # Plan ---------------------------------------------------------------------------------

    def _fetched(self, weights: WeightsRecord) -> WeightsRecord:
        """The weights' record, with their SHA-256 where only it pins their contents (timm's
        file, which no published hash does): then they are downloaded now, before the
        output's settings are made, if they are missing."""
        options = self.options
        if source_of(options.weights).pinned:
            return weights
        self._fetch()
        return identify_weights(
            options.architecture, options.needs_top, options.weights, options.seed
        )

    def _fetch(self) -> None:
        """Published weights downloaded if missing, announced first as a notice."""
        options = self.options
        fetch_weights(
            options.architecture, options.needs_top, options.weights, self._notice, options.backend
        )

    def _plan(self, engine: Engine, weights: WeightsRecord, images: list[str]) -> RunWriter:
        """The settings, and the store opened for them: what this process has to do."""
        options = self.options
        compute_dtype = engine.compute_dtype(options.precision, options.backend, options.device)
        settings = options.settings(weights, compute_dtype)
        chosen = preprocessing(settings.preprocessing)
        attributes = {
            "precision": options.precision,
            "resampling": RESAMPLING,
            "preprocessing": f"{chosen.name}: {chosen.description}",
            "weights_layout": weights.layout,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": options.command or shlex.join(sys.argv),
            **_versions(options.backend),
        }
        compression = WRITTEN_AS.get(options.compression, options.compression)
        layout = Layout(settings, options.layer_specs(), compression, attributes)
        writer = RunWriter.open(
            options.output,
            layout,
            images,
            overwrite=options.overwrite,
            shard=options.shard,
            update=options.update,
            prune=options.prune,
        )
        writer.commit_images = options.commit_every
        if compression != options.compression:
            self._notice(
                f"--compression {options.compression}: only h5py reads it; writing "
                f"{compression}, which every HDF5 reader has (a file already in "
                f"{options.compression} is continued in it)"
            )
        self._notice(*writer.notices)
        return writer

    # Drive --------------------------------------------------------------------------------

    def _drive(self, engine: Engine, writer: RunWriter) -> None:
        """Each of this process's shards through the engine, committed as it comes."""
        self.total = sum(len(work.paths) for work in writer.work)
        self.already = writer.already
        self._report()
        learnt: dict[str, object] = {"backend": self.options.backend}
        if self.total:
            layout = writer.plan.layout
            job = self.options.job(layout.layers, layout.settings)
            self._fetch()
            self._notice(*engine.start(job, self.total))
        self.first_batch = time.perf_counter()
        for work in writer.work:
            with self._writing():
                writer.begin(work.index)
            if work.paths:
                before = dict(engine.report().rows_per_node)
                self._take(engine, writer, work.paths)
                report = engine.report()
                # This shard's rows only: the output sums every shard's record.
                rows = {
                    node: count - before.get(node, 0)
                    for node, count in report.rows_per_node.items()
                    if count > before.get(node, 0)
                }
                learnt |= {
                    "engine": report.name,
                    "cluster": json.dumps(report.cluster),
                    "rows_per_node": json.dumps(rows),
                    "weights_sha256": report.weights_sha256,
                    "device": report.computed_by,
                    "backend_version": report.backend_version,
                }
            with self._writing():
                writer.finish_shard(work.index, learnt)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The block's time counted as writing."""
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.writing += time.perf_counter() - begun

    def _take(self, engine: Engine, writer: RunWriter, paths: list[str]) -> None:
        results = iter(engine.run(paths))
        try:
            self._take_each(engine, writer, results)
        finally:
            # Ended now, while the engine is up. Left to the garbage collector after the
            # engine is closed, a Ray stream reaches for Ray and starts a new instance.
            close = getattr(results, "close", None)
            if close is not None:
                close()

    def _take_each(self, engine: Engine, writer: RunWriter, results: Iterator[Result]) -> None:
        computes_here = engine.report().computes_here
        first = True
        while True:
            raise_kept_stop()
            asked = time.perf_counter()
            result = next(results, None)
            if result is None:
                return
            taken = time.perf_counter()
            here = 0.0
            if isinstance(result, Failure):
                self.failures.append(result)
                writer.add_failures([result])
            else:
                writer.append(result.sources, result.features)
                self.computed += len(result.sources)
                if computes_here:
                    # Computed while asked for the next result; that is not waiting.
                    here = result.seconds
                    self.network += here
                else:
                    self.network_elsewhere += result.seconds
            if computes_here or not first:
                self.waiting += max(0.0, taken - asked - here)
            # else the wait for an engine's first results is its networks being built
            # elsewhere: start-up, the wall time no other part takes.
            first = False
            self.writing += time.perf_counter() - taken
            self._report()

    def _report(self) -> None:
        if self.on_progress:
            self.on_progress(
                Progress(
                    done=self.computed + len(self.failures),
                    failed=len(self.failures),
                    total=self.total,
                    elapsed=time.perf_counter() - self.first_batch,
                    already=self.already,
                )
            )

    def _notice(self, *lines: str) -> None:
        for line in lines:
            self.notices.append(line)
            if self.on_notice:
                self.on_notice(line)

    def _keep_what_is_done(self, writer: RunWriter, stop: BaseException) -> None:
        """Commit what is computed and not committed yet; if that fails too, say so on the
        error that stopped the run, not in silence."""
        buffered = writer.buffered()
        try:
            writer.commit()
        except Exception as failure:
            stop.add_note(
                f"The last {buffered:,} images computed could not be kept ({failure}); the "
                "same command computes them again."
            )
        finally:
            writer.discard()

    # Finish -------------------------------------------------------------------------------

    def _finish(self, engine: Engine, writer: RunWriter, pruned: set[str]) -> Summary:
        written = time.perf_counter()
        said = len(writer.notices)
        assembly = writer.assemble(prune=pruned)
        self._notice(*writer.notices[said:])
        self.writing += time.perf_counter() - written
        missing = writer.missing_rows() if assembly is not None and not pruned else 0
        writer.close()
        return self._summary(engine, writer, assembly, missing)

    def _summary(
        self, engine: Engine, writer: RunWriter, assembly: Assembly | None, missing: int | None
    ) -> Summary:
        seconds = time.perf_counter() - self.started
        busy = self.waiting + self.network + self.writing
        report = engine.report()
        started = bool(self.total)
        return Summary(
            output=writer.path,
            computed=self.computed,
            failures=tuple(self.failures),
            already=self.already,
            assembled=assembly is not None,
            stored=assembly.appended if assembly else 0,
            replaced=assembly.replaced if assembly else 0,
            dropped=assembly.dropped if assembly else 0,
            rows=assembly.rows if assembly else 0,
            waiting_for=() if assembly else tuple(writer.unfinished_shards()),
            shard=self.options.shard,
            engine=report.name,
            computed_by=report.computed_by if started else "",
            rows_per_node=dict(report.rows_per_node),
            seconds=seconds,
            timings=Timings(
                max(0.0, seconds - busy),
                self.waiting,
                self.network,
                self.writing,
                None if report.computes_here else self.network_elsewhere,
            ),
            file_bytes=writer.path.stat().st_size if writer.path.exists() else 0,
            batch_size=report.batch_size,
            requested_batch_size=report.requested_batch_size,
            notices=tuple(self.notices),
            missing=missing,
            left_for_later=writer.left_for_later,
        )


def _versions(backend: str) -> dict[str, str]:
    """The versions that compute a file, read from package metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("vggfeat", "keras", backend):
        try:
            found[f"{package}_version"] = version(package)
        except PackageNotFoundError:
            found[f"{package}_version"] = ""
    return found
