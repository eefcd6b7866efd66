"""The run: discover -> decode -> batch -> network -> store, with the stages kept busy together.

Decoding runs in a pool of threads (Pillow and TensorFlow both release the
GIL for their heavy work) a bounded number of images ahead of the network, so
memory stays flat however many images there are, and results are taken in
input order, so rows are in the order of discovery. Progress is reported as
events; nothing here prints.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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
from vggfeat.network import PRECISIONS, PREPROCESSING, Cut, FeatureNetwork
from vggfeat.runtime import tensorflow
from vggfeat.store import COMPRESSIONS, STORED_DTYPES, FeatureSet, FeatureStore, Settings
from vggfeat.weights import file_sha256, published_file


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
    weights: str = field(default="")

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
    on_progress: Callable[[Progress], None] | None = None,
    command: str | None = None,
) -> Summary:
    """Extract features of every image in ``inputs`` into the HDF5 file ``output``.

    Does what ``vggfeat extract`` does, with the same defaults. Running it
    again on the same output continues: images already stored (or recorded
    as failed) are skipped. Raises a ``VggfeatError`` subclass for anything the
    caller can fix, before any network is built where that can be known.
    """
    started = time.perf_counter()
    architecture = vgg(depth)
    cuts = _cuts(architecture, layers)
    _check_choices(
        pool=pool, resize=resize, precision=precision, dtype=dtype, compression=compression
    )
    if batch_size < 1 or (workers is not None and workers < 1):
        raise VggfeatError("--batch-size and --workers must be at least 1")
    architecture.check_image_size([cut.layer for cut in cuts], image_size)
    weights_kind, weights_file, weights_sha256 = _weights_identity(architecture, cuts, weights)
    paths = discover([os.fspath(p) for p in inputs], files_from)
    allow_pixels(max_pixels)

    catalogue = architecture.catalogue(image_size)
    settings = Settings(
        depth=depth,
        layers=tuple(cut.label for cut in cuts),
        pooling=pool,
        weights=weights_kind,
        weights_file=weights_file,
        weights_sha256=weights_sha256,
        seed=seed,
        image_size=image_size,
        resize=resize,
        precision=precision,
        dtype=dtype,
    )
    feature_sets = [
        FeatureSet(
            cut.label,
            cut.layer.name,
            pool if cut.pools(pool) else "none",
            catalogue.facts(cut.layer).output_shape[-1:]
            if cut.pools(pool)
            else catalogue.facts(cut.layer).output_shape,
        )
        for cut in cuts
    ]
    store = FeatureStore.open(
        output,
        settings,
        feature_sets,
        attributes={
            "resampling": RESAMPLING,
            "preprocessing": PREPROCESSING,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command or shlex.join(sys.argv),
        },
        compression=compression,
        overwrite=overwrite,
    )
    try:
        done = store.done
        todo = [path for path in paths if path not in done]
        if not todo:
            return _nothing_to_do(store, len(paths), started)
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
    except BaseException:
        store.discard()
        raise
    try:
        store.set_attributes(_versions() | {"weights_sha256": network.weights.sha256})
        run = _Run(network, store, todo, image_size, resize, max_pixels, workers, on_progress)
        run.go()
    finally:
        store.close()
    seconds = time.perf_counter() - started
    return Summary(
        output=store.path,
        stored=run.stored,
        failures=tuple(run.failures),
        skipped=len(paths) - len(todo),
        rows=run.rows,
        seconds=seconds,
        timings=Timings(seconds - run.seconds, run.waiting, run.computing, run.writing),
        file_bytes=store.path.stat().st_size,
        weights=network.weights.file or network.weights.kind,
    )


def _nothing_to_do(store: FeatureStore, skipped: int, started: float) -> Summary:
    """Every image is already in the file: close it without building a network."""
    rows = store.rows
    store.close()
    seconds = time.perf_counter() - started
    return Summary(
        output=store.path,
        stored=0,
        failures=(),
        skipped=skipped,
        rows=rows,
        seconds=seconds,
        timings=Timings(seconds, 0.0, 0.0, 0.0),
        file_bytes=store.path.stat().st_size,
    )


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
        self.rows = store.rows
        self.reported = 0
        self.waiting = self.computing = self.writing = self.seconds = 0.0

    def go(self) -> None:
        started = time.perf_counter()
        batch: list[Decoded] = []
        # Enough decoded images in flight to fill the next batch while this one computes.
        window = 2 * self.network.batch_size + self.workers
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
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
        features = self.network(np.stack([image.pixels for image in batch]))
        computed = time.perf_counter()
        self.store.append([image.path for image in batch], features)
        self.computing += computed - begun
        self.writing += time.perf_counter() - computed
        self.stored += len(batch)
        self.rows += len(batch)
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


def _weights_identity(architecture, cuts: list[Cut], weights) -> tuple[str, str, str]:
    """(kind, file name, SHA-256) of the weights, known before the network is built."""
    if weights == "random":
        return "random", "", ""
    if weights == "imagenet":
        top = any(cut.layer.is_top for cut in cuts)
        return "imagenet", published_file(architecture, top).fname, ""
    path = Path(weights)
    if not path.is_file():
        raise VggfeatError(
            f"weights file {path} does not exist; --weights takes imagenet, random or a path"
        )
    return "file", path.name, file_sha256(path)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import keras

    tf = tensorflow()
    return {
        "vggfeat_version": version("vggfeat"),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }
