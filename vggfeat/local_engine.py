"""The local engine: decoding threads a bounded number of images ahead of one network.

Pillow and TensorFlow both release the GIL for their heavy work, so the
threads and the network keep each other busy; results are taken in input
order, and memory stays flat however many images there are.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from vggfeat.engine import Computed, EngineOptions, EngineReport, Job, Result
from vggfeat.errors import VggfeatError
from vggfeat.images import Decoded, Failure
from vggfeat.memory import choose_batch, free_bytes
from vggfeat.network import CutNetwork, compute_dtype
from vggfeat.runtime import backend_version, choose_device, gpu_free_bytes

#: How much lower than the network decoding threads run when the network is on the CPU.
DECODE_NICENESS = 10


@dataclass(frozen=True)
class LocalOptions(EngineOptions):
    """The local engine has no options of its own: ``--workers`` and ``--device`` are the
    job's."""

    name = "local"

    def open(self) -> LocalEngine:
        return LocalEngine()


class LocalEngine:
    """Decoding in a pool of threads a bounded number of images ahead of one network."""

    name = "local"

    def __init__(self) -> None:
        self.network: CutNetwork | None = None
        self.job: Job | None = None
        self._report = EngineReport("local", cluster={"engine": "local"})

    def compute_dtype(self, precision: str, backend: str, device: str | None) -> str:
        if precision == "float32":
            return "float32"
        return compute_dtype(precision, choose_device(backend, device).kind, backend)

    def start(self, job: Job, images: int) -> list[str]:
        """Build the network with its weights, then compile it for the largest batch that is
        fast and fits in the memory left."""
        network = CutNetwork(
            job.architecture,
            list(job.cuts),
            job.image_size,
            job.weights,
            job.seed,
            job.precision,
            job.backend,
            job.device,
            job.compute_dtype,
            job.preprocessing,
        )
        free = gpu_free_bytes(network.device, job.backend) if network.on_gpu else free_bytes()
        choice = choose_batch(job.batch_size, network.device.kind, job.image_bytes(), free, images)
        network.set_batch_size(choice.size)
        self.network, self.job = network, job
        self._report.computed_by = network.description
        self._report.backend_version = backend_version(job.backend)
        self._report.weights_sha256 = network.weights.sha256
        self._report.requested_batch_size = choice.size
        return [choice.notice] if choice.notice else []

    def report(self) -> EngineReport:
        if self.network is not None:
            self._report.batch_size = self.network.batch_size
        return self._report

    def stop_reason(self) -> VggfeatError | None:
        return None  # only the user stops a local run

    def run(self, paths: Sequence[str]) -> Iterator[Result]:
        """A ``Computed`` per batch and a ``Failure`` per unusable image, in input order."""
        network, job = self.network, self.job
        if network is None or job is None:
            raise RuntimeError("internal: start the engine before running it")
        workers = job.workers or os.cpu_count() or 1
        batch: list[Decoded] = []
        # Enough decoded images in flight to fill the next batch while this one computes.
        window = 2 * network.batch_size + workers
        # On a CPU the network's threads meet at barriers, and a decoding thread
        # that preempts one stalls them all; niced decoding fills their idle gaps instead.
        initializer = None if network.on_gpu else _yield_to_the_network
        with ThreadPoolExecutor(
            workers, thread_name_prefix="decode", initializer=initializer
        ) as pool:
            pending: deque[Future[Decoded | Failure]] = deque()
            upcoming = iter(paths)
            try:
                while True:
                    for path in upcoming:
                        pending.append(pool.submit(job.decode, path))
                        if len(pending) >= window:
                            break
                    if not pending:
                        break
                    result = pending.popleft().result()
                    if isinstance(result, Failure):
                        yield result
                        continue
                    batch.append(result)
                    if len(batch) == network.batch_size:
                        yield self._compute(network, batch)
                        batch = []
                if batch:
                    yield self._compute(network, batch)
            finally:
                for future in pending:
                    future.cancel()

    def _compute(self, network: CutNetwork, batch: list[Decoded]) -> Computed:
        begun = time.perf_counter()
        features = network(np.stack([image.pixels for image in batch]))
        seconds = time.perf_counter() - begun
        per_node = self._report.rows_per_node
        per_node["local"] = per_node.get("local", 0) + len(batch)
        return Computed(tuple(image.source for image in batch), tuple(features), seconds)

    def close(self) -> None:
        """Nothing to release: the threads end with each run."""


def _yield_to_the_network() -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads one by one)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)
