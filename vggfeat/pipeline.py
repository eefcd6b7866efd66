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
    allow_pixels,
    decode_image,
    discover,
)
from vggfeat.network import PRECISIONS, PREPROCESSING, Cut, FeatureNetwork, NetworkOutOfMemory
from vggfeat.runtime import tensorflow
from vggfeat.store import (
    COMMIT_IMAGES,
    COMPRESSIONS,
    STORED_DTYPES,
    FeatureSet,
    FeatureStore,
    Settings,
    Stamp,
)
from vggfeat.weights import identify_weights

#: How much lower than the network decoding threads run when the network is on the CPU.
DECODE_NICENESS = 10


@dataclass(frozen=True)
class Progress:
    """Where a run stands, sent after every batch."""

    done: int
    """Images handled in this run, stored or failed."""
    failed: int
    total: int
    """Images this run has to handle (those already in the file excluded)."""
    elapsed: float
    """Seconds since the first batch started."""


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
    """Appending rows to the HDF5 file."""


@dataclass(frozen=True)
class Summary:
    """What a run did."""

    output: Path
    stored: int
    """Rows written by this run."""
    failures: tuple[Failure, ...]
    """Files this run could not use, with the reasons (also in ``/failed``)."""
    skipped: int
    """Images already in the file from an earlier run."""
    rows: int
    """Rows in the file now."""
    seconds: float
    timings: Timings
    file_bytes: int
    batch_size: int
    """The batch size used at the end: lower than asked after running out of memory."""
    requested_batch_size: int

    @property
    def images_per_second(self) -> float:
        """Images handled per second once running (start-up not counted)."""
        running = self.seconds - self.timings.startup
        handled = self.stored + len(self.failures)
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
    commit_every: int = COMMIT_IMAGES,
    on_progress: Callable[[Progress], None] | None = None,
    command: str | None = None,
) -> Summary:
    """Extract features of every image in ``inputs`` into the HDF5 file ``output``.

    Does what ``vggfeat extract`` does, with the same defaults. Completed
    images are committed every ``commit_every`` images (or 64 MB, or 30 s) and
    the output is assembled when all are done, so running it again on the same
    output after any interruption continues: images already stored (or
    recorded as failed) are skipped. With ``update``, images whose size or
    modification time changed are read again; with ``prune``, rows of files
    that no longer exist are dropped.

    Raises a ``VggfeatError`` subclass for anything the caller can fix, before
    any network is built where that can be known, and ``Interrupted`` (a
    ``KeyboardInterrupt``) after Ctrl-C or SIGTERM, once completed work is safe.
    """
    started = time.perf_counter()
    architecture = vgg(depth)
    cuts = _cuts(architecture, layers)
    _check_choices(
        pool=pool, resize=resize, precision=precision, dtype=dtype, compression=compression
    )
    if batch_size < 1 or commit_every < 1 or (workers is not None and workers < 1):
        raise VggfeatError("--batch-size, --commit-every and --workers must be at least 1")
    architecture.check_image_size([cut.layer for cut in cuts], image_size)
    named = identify_weights(architecture, any(cut.layer.is_top for cut in cuts), weights, seed)
    paths = discover([os.fspath(p) for p in inputs], files_from)
    allow_pixels(max_pixels)

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
        precision=precision,
        dtype=dtype,
    )
    store = FeatureStore.open(
        output,
        settings,
        _feature_sets(architecture.catalogue(image_size), cuts, pool),
        attributes={
            "resampling": RESAMPLING,
            "preprocessing": PREPROCESSING,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command or shlex.join(sys.argv),
        },
        compression=compression,
        overwrite=overwrite,
    )
    store.commit_images = commit_every
    network = None
    with _signals():
        try:
            done = store.done
            todo = [path for path in paths if _needs_work(path, done, update)]
            if todo:
                # A run smaller than one batch needs no padding up to the full batch.
                network = FeatureNetwork(
                    architecture,
                    cuts,
                    image_size,
                    min(batch_size, len(todo)),
                    pool,
                    weights,
                    seed,
                    precision,
                )
                store.set_attributes(
                    _versions()
                    | {
                        "weights_sha256": network.weights.sha256,
                        "compute_dtype": network.compute_dtype,
                    }
                )
            run = _Run(network, store, todo, image_size, resize, max_pixels, workers, on_progress)
            if network is not None:
                run.go()
            rows = store.finish(prune=_vanished if prune else None)
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
    return Summary(
        output=store.path,
        stored=run.stored,
        failures=tuple(run.failures),
        skipped=len(paths) - len(todo),
        rows=rows,
        seconds=seconds,
        timings=Timings(seconds - run.seconds, run.waiting, run.computing, run.writing),
        file_bytes=store.path.stat().st_size,
        batch_size=network.batch_size if network else batch_size,
        requested_batch_size=min(batch_size, len(todo)) if todo else batch_size,
    )


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


def _needs_work(path: str, done: dict[str, Stamp], update: bool) -> bool:
    """Whether ``path`` is new, or, with ``update``, changed since it was stored."""
    if path not in done:
        return True
    if not update:
        return False
    try:
        info = os.stat(path)
    except OSError:
        return False  # gone: kept unless pruned
    return Stamp(info.st_size, info.st_mtime_ns) != done[path]


def _vanished(path: str) -> bool:
    return not os.path.lexists(path)


class _Run:
    """One pass over the images still to do; counts and times what it does."""

    def __init__(
        self, network, store, paths, image_size, resize, max_pixels, workers, on_progress
    ) -> None:
        self.network: FeatureNetwork = network
        self.store: FeatureStore = store
        self.paths: list[str] = paths
        self.decode = lambda path: decode_image(path, image_size, resize, max_pixels)
        self.workers = workers or os.cpu_count() or 1
        self.on_progress = on_progress
        self.stored = 0
        self.failures: list[Failure] = []
        self.reported = 0
        self.waiting = self.computing = self.writing = self.seconds = 0.0

    def go(self) -> None:
        started = time.perf_counter()
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
                        continue
                    batch.append(result)
                    if len(batch) == self.network.batch_size:
                        self._compute(batch, started)
                        batch = []
                if batch:
                    self._compute(batch, started)
                self._report(started)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
            finally:
                self.seconds = time.perf_counter() - started

    def _compute(self, batch: list[Decoded], started: float) -> None:
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
        self._report(started)

    def _report(self, started: float) -> None:
        done = self.stored + len(self.failures)
        if self.on_progress and done != self.reported:
            self.reported = done
            self.on_progress(
                Progress(
                    done=done,
                    failed=len(self.failures),
                    total=len(self.paths),
                    elapsed=time.perf_counter() - started,
                )
            )


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
    from importlib.metadata import version

    import keras

    tf = tensorflow()
    return {
        "vggfeat_version": version("vggfeat"),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }
