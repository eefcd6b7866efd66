"""The run: discover -> decode -> batch -> network -> store, with the stages kept busy together.

Decoding runs in a pool of threads (Pillow and TensorFlow both release the
GIL for their heavy work) a bounded number of images ahead of the network, so
memory stays flat however many images there are, and results are taken in
input order, so rows are in the order of discovery. Progress is reported as
events; nothing here prints.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from vggfeat.architecture import POOLINGS, TOP_IMAGE_SIZE, vgg
from vggfeat.errors import VggfeatError
from vggfeat.images import (
    RESAMPLING,
    RESIZE_MODES,
    Decoded,
    Failure,
    decode_image,
    discover,
    pixel_limit,
)
from vggfeat.network import (
    PRECISIONS,
    PREPROCESSING,
    Cut,
    FeatureNetwork,
    NetworkOutOfMemory,
    compute_dtype,
)
from vggfeat.runtime import gpus
from vggfeat.store import (
    COMMIT_IMAGES,
    COMPRESSIONS,
    STORED_DTYPES,
    FeatureSet,
    FeatureStore,
    Layout,
    PruneEverything,
    Settings,
    Shard,
    Stamp,
)
from vggfeat.weights import identify_weights

#: How much lower than the network decoding threads run when the network is on the CPU.
DECODE_NICENESS = 10


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
    """Where a run's wall time went, in seconds."""

    startup: float
    """Finding images, building the network, loading weights."""
    waiting: float
    """The network idle, waiting for images to be read and decoded."""
    network: float
    """The network computing (tracing the function once included)."""
    writing: float
    """Committing rows, and writing the output at the end."""


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
    seconds: float
    timings: Timings
    file_bytes: int
    batch_size: int
    """The batch size used at the end: lower than asked after running out of memory."""
    requested_batch_size: int

    @property
    def images_per_second(self) -> float:
        """Images handled per second once running (start-up not counted)."""
        running = self.timings.waiting + self.timings.network + self.timings.writing
        handled = self.computed + len(self.failures)
        return handled / running if running > 0 else 0.0


def extract(
    inputs: Sequence[str | os.PathLike] = (),
    output: str | os.PathLike = "features.h5",
    *,
    depth: int = 16,
    layers: Sequence[str] = ("fc7",),
    pool: str = "none",
    weights: str | os.PathLike = "imagenet",
    seed: int = 0,
    batch_size: int = 32,
    image_size: int = TOP_IMAGE_SIZE,
    resize: str = "squash",
    precision: str = "float32",
    dtype: str = "float32",
    compression: str = "none",
    files_from: Iterable[str] = (),
    workers: int | None = None,
    max_pixels: int | None = None,
    overwrite: bool = False,
    update: bool = False,
    prune: bool = False,
    yes: bool = False,
    shard: str | Shard | None = None,
    commit_every: int = COMMIT_IMAGES,
    on_progress: Callable[[Progress], None] | None = None,
    command: str | None = None,
) -> Summary:
    """Extract features of every image in ``inputs`` into the HDF5 file ``output``.

    Does what ``vggfeat extract`` does, with the same defaults. Completed
    images are committed every ``commit_every`` images (or 64 MB, or 30 s)
    and the output is written when all are done, so running it again on the
    same output after any interruption continues: images already stored (or
    recorded as failed) are skipped, whatever the spelling of their path.
    With ``update``, images whose size or modification time changed are read
    again; with ``prune``, rows of files that no longer exist are dropped
    (``yes`` confirms dropping every row). ``shard="K/N"`` does the K-th of N
    shares; the last shard to finish writes the output.

    Raises a ``VggfeatError`` subclass for anything the caller can fix, before
    anything is written, and ``Interrupted`` (a ``KeyboardInterrupt``) after
    Ctrl-C or SIGTERM, once completed work is safe.
    """
    started = time.perf_counter()
    architecture = vgg(depth)
    cuts = _cuts(architecture, layers)
    _check_choices(
        pool=pool, resize=resize, precision=precision, dtype=dtype, compression=compression
    )
    if batch_size < 1 or commit_every < 1 or (workers is not None and workers < 1):
        raise VggfeatError("--batch-size, --commit-every and --workers must be at least 1")
    if isinstance(shard, str):
        shard = Shard.parse(shard)
    architecture.check_image_size([cut.layer for cut in cuts], image_size)
    named = identify_weights(architecture, any(cut.layer.is_top for cut in cuts), weights, seed)
    paths = discover([os.fspath(p) for p in inputs], files_from)

    settings = Settings(
        depth=depth,
        layers=tuple(cut.label for cut in cuts),
        pooling=pool,
        weights=named.kind,
        weights_file=named.file,
        weights_sha256=named.sha256,
        seed=seed,
        image_size=image_size,
        resize=resize,
        compute_dtype=compute_dtype(precision, on_gpu=precision != "float32" and bool(gpus())),
        dtype=dtype,
    )
    layout = Layout(
        settings,
        tuple(_feature_sets(architecture.catalogue(image_size), cuts, pool)),
        compression,
        attributes={
            "precision": precision,
            "resampling": RESAMPLING,
            "preprocessing": PREPROCESSING,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command or shlex.join(sys.argv),
            **_versions(),
        },
    )
    store = FeatureStore.open(output, layout, overwrite=overwrite, shard=shard)
    store.commit_images = commit_every
    network = None
    runs: list[_Run] = []
    with _signals(), pixel_limit(max_pixels):
        try:
            pruned = _pruned(store, yes) if prune else set()
            work, already = _plan(store, paths, update)
            total = sum(len(todo) for _, todo in work)
            if on_progress:
                on_progress(Progress(0, 0, total, 0.0, already))
            if total:
                # A run smaller than one batch needs no padding up to the full batch.
                network = FeatureNetwork(
                    architecture,
                    cuts,
                    image_size,
                    min(batch_size, total),
                    pool,
                    weights,
                    seed,
                    precision,
                )
            learnt = {"weights_sha256": network.weights.sha256} if network else {}
            report = _Reporter(on_progress, runs, total, already)
            for index, todo in work:
                store.begin(index)
                if todo:
                    run = _Run(
                        network, store, todo, image_size, resize, max_pixels, workers, report
                    )
                    runs.append(run)
                    run.go()
                store.finish_shard(index, learnt)
            written = time.perf_counter()
            assembly = store.assemble(prune=pruned)
            writing = time.perf_counter() - written
            waiting_for = tuple(store.unfinished_shards()) if assembly is None else ()
            store.close()
        except (KeyboardInterrupt, Terminated) as stop:
            try:
                store.commit()
            finally:
                store.discard()
            code = 143 if isinstance(stop, Terminated) else 130
            raise Interrupted(code, store.parts) from None
        except BaseException:
            store.discard()
            raise
    seconds = time.perf_counter() - started
    waiting = sum(run.waiting for run in runs)
    computing = sum(run.computing for run in runs)
    committing = sum(run.writing for run in runs) + writing
    return Summary(
        output=store.path,
        computed=sum(run.stored for run in runs),
        failures=tuple(failure for run in runs for failure in run.failures),
        already=already,
        assembled=assembly is not None,
        stored=assembly.appended if assembly else 0,
        replaced=assembly.replaced if assembly else 0,
        dropped=assembly.dropped if assembly else 0,
        rows=assembly.rows if assembly else 0,
        waiting_for=waiting_for,
        shard=shard,
        seconds=seconds,
        timings=Timings(seconds - waiting - computing - committing, waiting, computing, committing),
        file_bytes=store.path.stat().st_size if store.path.exists() else 0,
        batch_size=network.batch_size if network else batch_size,
        requested_batch_size=min(batch_size, total) if total else batch_size,
    )


def _plan(
    store: FeatureStore, paths: list[str], update: bool
) -> tuple[list[tuple[int, list[str]]], int]:
    """The images each of this process's shards has to do, and how many of its share are done.

    Each shard's share is cut from the images the output does not hold yet, in
    discovery order; that is the same for every shard of a run, since the
    output is only written once all are done. Committed parts are then skipped.
    """
    unique: dict[str, str] = {}
    for path in paths:
        unique.setdefault(store.key(path), path)  # one image, however often it is named
    stored, committed = store.stored, store.committed
    basis = [key for key in unique if _needs_work(key, unique[key], stored, update)]
    count = store.plan.shards
    work = []
    share_sizes = 0
    for index in store.shards:
        share = Shard(index, count).share(basis)
        share_sizes += len(share)
        todo = [unique[key] for key in share if _needs_work(key, unique[key], committed, update)]
        work.append((index, todo))
    others = len(basis) - share_sizes
    already = len(unique) - others - sum(len(todo) for _, todo in work)
    return work, already


def _pruned(store: FeatureStore, yes: bool) -> set[str]:
    """Paths of the output whose files are gone; refuses to drop every row unless ``yes``."""
    gone = {key for key in store.stored if store.locate(key) is None}
    rows = store.stored_rows
    if rows and all(key in gone for key in rows) and not yes:
        raise PruneEverything(
            f"--prune would drop all {len(rows):,} rows of {store.path}: none of their files "
            f"exist as seen from {store.home}; check the file and its images are where they "
            "were, or add --yes to drop them"
        )
    return gone


class Terminated(BaseException):
    """SIGTERM arrived; the run stops as on Ctrl-C."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after committing its completed work.

    ``exit_code`` is 130 for Ctrl-C and 143 for SIGTERM; ``parts`` is the
    folder that holds the committed work, from which the same call continues.
    """

    def __init__(self, exit_code: int, parts: Path) -> None:
        super().__init__(exit_code, parts)
        self.exit_code = exit_code
        self.parts = parts


@contextlib.contextmanager
def _signals():
    """SIGTERM stops the run like Ctrl-C; a file-size limit fails a write instead of killing us."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(_signum, _frame):
        raise Terminated

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, terminate),
        signal.SIGXFSZ: signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _feature_sets(catalogue, cuts: list[Cut], pool: str) -> list[FeatureSet]:
    """The output's datasets: per cut, its name, layer, pooling and per-image shape."""
    sets = []
    for cut in cuts:
        shape = catalogue.facts(cut.layer).output_shape
        pooled = cut.pools(pool)
        sets.append(
            FeatureSet(
                cut.label,
                cut.layer.name,
                pool if pooled else "none",
                shape[-1:] if pooled else shape,
            )
        )
    return sets


def _needs_work(key: str, path: str, done: dict[str, Stamp], update: bool) -> bool:
    """Whether ``path`` (stored as ``key``) is new, or, with ``update``, changed since done."""
    if key not in done:
        return True
    if not update:
        return False
    try:
        info = os.stat(path)
    except OSError:
        return False  # gone: kept unless pruned
    return Stamp(info.st_size, info.st_mtime_ns) != done[key]


class _Reporter:
    """Progress over every share this process does, sent after each batch or failure."""

    def __init__(self, on_progress, runs: list[_Run], total: int, already: int) -> None:
        self.on_progress = on_progress
        self.runs = runs
        self.total = total
        self.already = already
        self.started = time.perf_counter()
        self.reported = 0

    def __call__(self) -> None:
        done = sum(run.stored + len(run.failures) for run in self.runs)
        if self.on_progress and done != self.reported:
            self.reported = done
            self.on_progress(
                Progress(
                    done=done,
                    failed=sum(len(run.failures) for run in self.runs),
                    total=self.total,
                    elapsed=time.perf_counter() - self.started,
                    already=self.already,
                )
            )


class _Run:
    """One pass over a share's images still to do; counts and times what it does."""

    def __init__(
        self, network, store, paths, image_size, resize, max_pixels, workers, report
    ) -> None:
        self.network: FeatureNetwork = network
        self.store: FeatureStore = store
        self.paths: list[str] = paths
        self.decode = lambda path: decode_image(path, image_size, resize, max_pixels)
        self.workers = workers or os.cpu_count() or 1
        self.report: Callable[[], None] = report
        self.stored = 0
        self.failures: list[Failure] = []
        self.waiting = self.computing = self.writing = 0.0

    def go(self) -> None:
        batch: list[Decoded] = []
        # Enough decoded images in flight to fill the next batch while this one computes.
        window = 2 * self.network.batch_size + self.workers
        # On a CPU the network's threads meet at barriers, and a decoding thread
        # that preempts one stalls them all; niced decoding fills their idle gaps instead.
        initializer = None if self.network.on_gpu else _yield_to_the_network
        with ThreadPoolExecutor(
            self.workers, thread_name_prefix="decode", initializer=initializer
        ) as pool:
            pending: deque[Future] = deque()
            upcoming = iter(self.paths)
            try:
                while True:
                    for path in upcoming:
                        pending.append(pool.submit(self.decode, path))
                        if len(pending) >= window:
                            break
                    if not pending:
                        break
                    waited = time.perf_counter()
                    result = pending.popleft().result()
                    self.waiting += time.perf_counter() - waited
                    if isinstance(result, Failure):
                        self.failures.append(result)
                        self.store.add_failures([result])
                        self.report()
                        continue
                    batch.append(result)
                    if len(batch) == self.network.batch_size:
                        self._compute(batch)
                        batch = []
                if batch:
                    self._compute(batch)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise

    def _compute(self, batch: list[Decoded]) -> None:
        begun = time.perf_counter()
        pixels = np.stack([image.pixels for image in batch])
        while True:
            try:
                features = self.network(pixels)
                break
            except NetworkOutOfMemory as error:
                if self.network.batch_size == 1:
                    raise VggfeatError(
                        "out of memory computing even one image at a time; use a smaller "
                        "--image-size, an earlier --layer, or free the GPU's memory"
                    ) from error
                # The same images again, in smaller batches, for the rest of the run.
                self.network.set_batch_size(self.network.batch_size // 2)
        computed = time.perf_counter()
        self.store.append(batch, features)
        self.computing += computed - begun
        self.writing += time.perf_counter() - computed
        self.stored += len(batch)
        self.report()


def _yield_to_the_network() -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads one by one)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)


def _cuts(architecture, names: Sequence[str]) -> list[Cut]:
    if not names:
        raise VggfeatError("name at least one --layer")
    cuts: list[Cut] = []
    for name in names:
        layer = architecture.layer(name)
        twin = next((cut for cut in cuts if cut.layer == layer), None)
        if twin:
            raise VggfeatError(f"--layer {name} and --layer {twin.label} are the same layer")
        cuts.append(Cut(name.strip(), layer))
    return cuts


def _check_choices(**chosen: str) -> None:
    allowed = {
        "pool": POOLINGS,
        "resize": RESIZE_MODES,
        "precision": PRECISIONS,
        "dtype": STORED_DTYPES,
        "compression": COMPRESSIONS,
    }
    for option, value in chosen.items():
        if value not in allowed[option]:
            raise VggfeatError(f"--{option} {value} is not one of {', '.join(allowed[option])}")


def _versions() -> dict[str, str]:
    """The versions that computed a file, read from package metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("vggfeat", "tensorflow", "keras"):
        try:
            found[f"{package}_version"] = version(package)
        except PackageNotFoundError:
            found[f"{package}_version"] = ""
    return found
