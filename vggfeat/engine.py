"""Engines: what moves the decoding and the network work, here in threads or on a Ray cluster.

An engine takes image paths and yields, in the same order, a ``Computed``
batch of rows or a ``Failure`` for each image. It knows nothing of the
output: the plan (which images) and the store (what is done) stay with the
driver, so every engine writes the same file.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from vggfeat.architecture import vgg
from vggfeat.images import Decoded, Failure, Source, decode_image
from vggfeat.network import Cut, FeatureNetwork
from vggfeat.runtime import backend_version

ENGINES = ("local", "ray")
#: Seconds without an image done after which a Ray run stops rather than hang.
STALL_SECONDS = 300.0
#: How much lower than the network decoding threads run when the network is on the CPU.
DECODE_NICENESS = 10


@dataclass(frozen=True)
class Job:
    """Everything an engine needs to decode images and build the network, anywhere."""

    depth: int
    layers: tuple[str, ...]
    image_size: int
    batch_size: int | None
    """Images per network call; None: what suits the device (``BATCH_SIZES``)."""
    pool: str
    weights: str
    """``imagenet``, ``random`` or a path (the local engine reads it itself)."""
    seed: int
    precision: str
    resize: str
    max_pixels: int | None
    workers: int | None
    backend: str = "tensorflow"
    device: str | None = None
    """``cpu``, ``gpu`` or ``gpu:N``; None: the first GPU, else the CPU."""
    compute_dtype: str | None = None
    """What the layers compute in, as the output's settings say; None: from ``precision``."""

    def network(self, most: int | None = None, weights=None) -> FeatureNetwork:
        """The job's network, built here (weights: the job's, or ones already read), for
        at most ``most`` images."""
        return FeatureNetwork(
            vgg(self.depth),
            self.cuts(),
            self.image_size,
            self.batch_size,
            self.pool,
            self.weights if weights is None else weights,
            self.seed,
            self.precision,
            self.backend,
            self.device,
            self.compute_dtype,
            most,
        )

    def cuts(self) -> list[Cut]:
        architecture = vgg(self.depth)
        return [Cut(name, architecture.layer(name)) for name in self.layers]

    def feature_shapes(self) -> list[tuple[int, ...]]:
        """Each layer's per-image feature shape, as stored."""
        catalogue = vgg(self.depth).catalogue(self.image_size)
        return [cut.feature_shape(catalogue, self.pool) for cut in self.cuts()]

    def decode(self, path: str) -> Decoded | Failure:
        return decode_image(path, self.image_size, self.resize, self.max_pixels)


@dataclass(frozen=True)
class Computed:
    """A batch of rows: one ``Source`` per image, one (n, ...) array per layer."""

    sources: tuple[Source, ...]
    features: tuple[np.ndarray, ...]
    seconds: float
    """Time the network spent on the batch."""
    node: str = "local"
    """Which machine computed it."""


Result = Computed | Failure


@dataclass
class EngineStats:
    """What an engine reports once done: where the rows were computed, and on what."""

    rows_per_node: dict[str, int] = field(default_factory=dict)
    description: dict[str, object] = field(default_factory=dict)


class LocalEngine:
    """Decoding in a pool of threads a bounded number of images ahead of one network.

    Pillow and TensorFlow both release the GIL for their heavy work, so the
    threads and the network keep each other busy; results are taken in input
    order, and memory stays flat however many images there are.
    """

    name = "local"
    computes_here = True

    def __init__(self, job: Job, count: int) -> None:
        self.job = job
        # A run smaller than one batch needs no padding up to the full batch.
        self.network = job.network(most=count)
        self.workers = job.workers or os.cpu_count() or 1
        self.weights_sha256 = self.network.weights.sha256
        self.stats = EngineStats(description={"engine": "local"})
        self.computed_by = {
            "device": self.network.description,
            "backend_version": backend_version(job.backend),
        }

    @property
    def batch_size(self) -> int:
        return self.network.batch_size

    @property
    def requested_batch_size(self) -> int:
        return self.network.requested_batch_size

    def run(self, paths: Sequence[str]) -> Iterator[Result]:
        """A ``Computed`` per batch and a ``Failure`` per unusable image, in input order."""
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
            upcoming = iter(paths)
            try:
                while True:
                    for path in upcoming:
                        pending.append(pool.submit(self.job.decode, path))
                        if len(pending) >= window:
                            break
                    if not pending:
                        break
                    result = pending.popleft().result()
                    if isinstance(result, Failure):
                        yield result
                        continue
                    batch.append(result)
                    if len(batch) == self.network.batch_size:
                        yield self._compute(batch)
                        batch = []
                if batch:
                    yield self._compute(batch)
            finally:
                for future in pending:
                    future.cancel()

    def _compute(self, batch: list[Decoded]) -> Computed:
        begun = time.perf_counter()
        features = self.network(np.stack([image.pixels for image in batch]))
        seconds = time.perf_counter() - begun
        self.stats.rows_per_node["local"] = self.stats.rows_per_node.get("local", 0) + len(batch)
        return Computed(tuple(image.source for image in batch), tuple(features), seconds)

    def close(self) -> None:
        """Nothing to release: the threads end with each run."""


def _yield_to_the_network() -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads one by one)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)
