"""The Ray engine: decoding as CPU tasks across a cluster, the network in a pool of actors.

Ray Data streams the images through two stages: decoding, as Ray tasks
wherever there are CPUs, and the network, in an autoscaling pool of actors
that each build the network once (one per GPU where there are GPUs). Results
come back to the driver in input order (``preserve_order``), where the store
commits them as the local engine's are: the output is written from the
driver alone, and what is done is known to the store alone.

The pool autoscales from one actor, because a fixed pool that no longer fits
the cluster after a node is lost waits forever (measured here); a watchdog
stops the run when the driver has waited ``stall_timeout`` seconds for the
next results, keeping what was committed. The time the driver spends writing
is not waiting. A local instance (no ``--ray-address``) lives in a folder of
its own, and ``ray_reaper.py`` ends it with the driver, even after ``kill -9``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from vggfeat.engine import Computed, EngineOptions, EngineReport, Job, Result
from vggfeat.errors import OptionError, VggfeatError
from vggfeat.images import Decoded, Failure, Source, pixel_limit
from vggfeat.memory import ACTIVATION_FACTOR, BATCH_SIZES
from vggfeat.ray_cluster import Session, Watchdog, check_address, first_line, node_id
from vggfeat.runtime import BACKEND_NAMES, backend_version

INSTALL = "pip install 'ray[data]>=2.60,<3'"
#: Seconds without results, start-up included, after which a run stops rather than hang.
STALL_SECONDS = 300.0
#: Images per decoding task: enough to amortise a task, few enough to spread them.
DECODE_BATCH = 16
#: Ray's logical CPUs a decoding task and a network actor reserve. Half each, so that a
#: node with one CPU holds an actor and a decoding task: with one each it would hold
#: either, and a one-CPU cluster would wait forever.
DECODE_CPUS = ACTOR_CPUS = 0.5
#: What a network actor holds besides its weights and activations: the backend itself.
ACTOR_BASE_BYTES = 512 << 20


class StalledError(VggfeatError):
    """No results came for ``--stall-timeout`` seconds."""


def require_ray() -> None:
    """Fail at once, naming the install command, when Ray is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise VggfeatError(f"--engine ray needs Ray, which is not installed: {INSTALL}") from None


@dataclass(frozen=True)
class RayOptions(EngineOptions):
    """``--engine ray``'s own options."""

    name = "ray"
    address: str | None = None
    """``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; None: a local instance of our own."""
    actors: int | None = None
    """Networks at most; None: one per GPU, else one per 4 CPUs."""
    gpus_per_actor: float | None = None
    """None: 1 where the cluster has GPUs, else 0."""
    stall_timeout: float = STALL_SECONDS
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.address not in (None, "auto"):
            check_address(self.address)
        if self.actors is not None and self.actors < 1:
            raise OptionError("--actors must be at least 1")
        if self.gpus_per_actor is not None and not 0 <= self.gpus_per_actor < math.inf:
            raise OptionError("--gpus-per-actor must be 0 or more, fractions allowed (0.5)")
        if not 0 < self.stall_timeout < math.inf:
            raise OptionError("--stall-timeout must be a number of seconds more than 0")

    def require(self) -> None:
        require_ray()

    def open(self) -> RayEngine:
        return RayEngine(self)


class RayEngine:
    """Runs a job's decoding and network on Ray; yields results in input order."""

    name = "ray"

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self._session: Session | None = None
        self._watchdog: Watchdog | None = None
        self.job: Job | None = None
        self._report = EngineReport("ray", computes_here=False)

    def _connected(self) -> Session:
        if self._session is None:
            self._session = Session.connect(self.options)
        return self._session

    def compute_dtype(self, precision: str, backend: str, device: str | None) -> str:
        """float32 unless ``mixed``: then float16 on GPU actors; on CPU actors, bfloat16 with
        TensorFlow where every node's CPU does it fast, else float32."""
        if precision == "float32":
            return "float32"
        session = self._connected()
        if session.gpus_per_actor(self.options):
            return "float16"
        fast = backend == "tensorflow" and all(session.on_every_node(_has_fast_bfloat16))
        return "bfloat16" if fast else "float32"

    def start(self, job: Job, images: int) -> list[str]:
        session = self._connected()
        gpus = session.gpus_per_actor(self.options)
        if gpus > session.gpus:
            raise VggfeatError(
                f"--gpus-per-actor {gpus:g}: the cluster has {session.gpus:g} GPUs; "
                "use --gpus-per-actor 0 to run the network on CPUs"
            )
        actors = self.options.actors or (
            max(1, int(session.gpus / gpus)) if gpus else max(1, int(session.cpus) // 4)
        )
        self.weights, weights_sha256 = _prepare_weights(job)
        kind = "gpu" if gpus else "cpu"
        wanted = min(job.batch_size or BATCH_SIZES[kind], max(1, images))
        batch, notices = self._fitting_batch(job, wanted, session.largest_memory())
        self.job = replace(job, batch_size=batch)
        self.gpus, self.actors = gpus, actors
        report = self._report
        report.computed_by = (
            f"a Ray cluster of {_count(session.nodes, 'node')} "
            f"(up to {_count(actors, 'network')}), {job.compute_dtype}, "
            f"{BACKEND_NAMES[job.backend]} {backend_version(job.backend)}"
        )
        report.backend_version = backend_version(job.backend)
        report.weights_sha256 = weights_sha256
        report.batch_size = report.requested_batch_size = batch
        report.cluster = {
            "engine": "ray",
            "address": self.options.address or "local instance",
            "nodes": session.nodes,
            "cpus": session.cpus,
            "gpus": session.gpus,
            "actors": actors,
            "gpus_per_actor": gpus,
        }
        return notices

    def _fitting_batch(self, job: Job, wanted: int, memory: float) -> tuple[int, list[str]]:
        """The largest batch up to ``wanted`` whose actor fits in the largest node's memory."""
        fixed = _actor_memory(job, 0)
        per_image = _actor_memory(job, 1) - fixed
        fits = int((memory - fixed) // per_image) if memory else wanted
        if fits >= wanted:
            return wanted, []
        if fits < 1:
            raise VggfeatError(
                "no node of the Ray cluster has the memory for one network at this cut; use "
                "a smaller --image-size or an earlier --layer"
            )
        return fits, [
            f"a network with batches of {wanted} needs more memory than any node of the Ray "
            f"cluster has: computing {fits} images at a time"
        ]

    def report(self) -> EngineReport:
        return self._report

    def stop_reason(self) -> VggfeatError | None:
        if self._watchdog is not None and self._watchdog.stalled:
            return self._stalled()
        return None

    def _stalled(self) -> StalledError:
        return StalledError(
            f"no image was done for {self.options.stall_timeout:g} s (--stall-timeout): the "
            "Ray cluster may have lost the nodes it needs; completed work is kept, run the "
            "same command to continue"
        )

    def run(self, paths: Sequence[str]) -> Iterator[Result]:
        """A ``Computed`` per run of usable images and a ``Failure`` per other, in input order."""
        import ray
        import ray.data

        job, session = self.job, self._session
        if job is None or session is None:
            raise RuntimeError("internal: start the engine before running it")
        session.check_visible(paths)
        items = [{"path": path, "file": os.path.abspath(path)} for path in paths]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // DECODE_BATCH))
        decoded = dataset.map_batches(
            _decode_batch,
            fn_kwargs={"job": job},
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
        )
        computed = decoded.map_batches(
            _NetworkActor,
            fn_constructor_kwargs={"job": job, "weights": self.weights},
            batch_size=job.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=self.actors),
            num_gpus=self.gpus or None,
            num_cpus=ACTOR_CPUS,
            # The memory a network needs. Asking for it also keeps Ray Data from
            # fusing decoding into the actors, where a network would wait for it.
            memory=_actor_memory(job, job.batch_size or 1),
        )
        self._watchdog = watchdog = Watchdog(self.options.stall_timeout)
        try:
            with watchdog:
                batches = iter(computed.iter_batches(batch_size=None, batch_format="numpy"))
                try:
                    while True:
                        with watchdog.waiting():
                            batch = next(batches, None)
                        if batch is None:
                            return
                        yield from self._results(batch, session)
                finally:
                    _end_stream(batches)
        except KeyboardInterrupt:
            if not watchdog.stalled:
                raise
            raise self._stalled() from None
        except ray.exceptions.RayError as error:
            raise VggfeatError(_ray_failure(error)) from None

    def _results(self, batch: dict[str, np.ndarray], session: Session) -> Iterator[Result]:
        job = self.job
        assert job is not None  # run() checked
        names = [f"features_{i}" for i in range(len(job.cuts))]
        per_node = self._report.rows_per_node
        good = batch["reason"] == ""
        start = 0
        for stop in [*np.flatnonzero(~good).tolist(), len(good)]:
            if stop > start:
                rows = slice(start, stop)
                for node in batch["node"][rows].tolist():
                    ip = session.node_ips.get(node, node)
                    per_node[ip] = per_node.get(ip, 0) + 1
                yield Computed(
                    sources=tuple(
                        Source(path, int(size), int(mtime))
                        for path, size, mtime in zip(
                            batch["path"][rows].tolist(),
                            batch["size"][rows].tolist(),
                            batch["mtime_ns"][rows].tolist(),
                            strict=True,
                        )
                    ),
                    features=tuple(batch[name][rows] for name in names),
                    seconds=float(batch["seconds"][rows].sum()),
                )
            if stop < len(good):
                yield Failure(
                    str(batch["path"][stop]),
                    str(batch["reason"][stop]),
                    int(batch["size"][stop]),
                    int(batch["mtime_ns"][stop]),
                )
            start = stop + 1

    def close(self) -> None:
        """Disconnect; a local instance we started is ended, with every process it started."""
        if self._session is not None:
            self._session.close()
            self._session = None


def _actor_memory(job: Job, batch: int) -> int:
    """Bytes a network actor holds: its weights twice over, the backend, a batch's activations."""
    architecture = job.architecture
    catalogue = architecture.catalogue(job.image_size)
    deepest = max((cut.layer for cut in job.cuts), key=architecture.layers.index)
    built = architecture.through(deepest)
    weights = sum(facts.params for facts in catalogue.layers if facts.layer in built) * 4
    return 2 * weights + ACTOR_BASE_BYTES + batch * math.ceil(job.image_bytes() * ACTIVATION_FACTOR)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _ray_failure(error: BaseException) -> str:
    """One line for a failed Ray job: vggfeat's own message where an actor raised one."""
    text = str(error)
    found = re.search(r"vggfeat\.[\w.]*Error: (.+)", text) or re.search(
        r"(?:VggfeatError|MismatchError|UnavailableError)\w*: (.+)", text
    )
    if found:
        return found[1].strip()
    return f"the Ray job failed: {first_line(error)}"


# Run on the cluster ----------------------------------------------------------------------


def _has_fast_bfloat16() -> bool:
    from vggfeat.runtime import cpu_has_fast_bfloat16

    return cpu_has_fast_bfloat16()


def _prepare_weights(job: Job) -> tuple[list[Any], str]:
    """Read the weights once, here, whatever their source, and put them where every actor
    fetches them from."""
    import ray

    from vggfeat.weights import PreparedWeights

    needs_top = any(cut.layer.is_top for cut in job.cuts)
    prepared = PreparedWeights.read(job.architecture, needs_top, job.weights, job.seed)
    # In a list, so that Ray passes the reference and each actor fetches it itself.
    return [ray.put(prepared), prepared.digest()], prepared.record.sha256


def _end_stream(batches: Iterator[Any]) -> None:
    """End Ray Data's stream of batches while Ray is up: stopped midway and left to the
    garbage collector, it would reach for Ray after shutdown and start a new instance."""
    import ray

    close = getattr(batches, "close", None)
    if close is not None:
        # A stream cut short may complain as it ends; the run is stopping anyway.
        with contextlib.suppress(ray.exceptions.RayError, ValueError):
            close()


def _decode_batch(batch: dict[str, np.ndarray], job: Job) -> dict[str, np.ndarray]:
    """Decode a batch of files: pixels for usable ones, a reason for the others."""
    size = job.image_size
    count = len(batch["file"])
    pixels = np.zeros((count, size, size, 3), np.uint8)
    reasons, sizes, times = [], [], []
    with pixel_limit(job.max_pixels):
        for index, file in enumerate(batch["file"].tolist()):
            result = job.decode(file)
            if isinstance(result, Decoded):
                pixels[index] = result.pixels
            reasons.append(result.reason if isinstance(result, Failure) else "")
            sizes.append(result.size)
            times.append(result.mtime_ns)
    return {
        "path": batch["path"],
        "size": np.array(sizes, np.int64),
        "mtime_ns": np.array(times, np.int64),
        "reason": np.array(reasons, dtype=object),
        "pixels": pixels,
    }


class _NetworkActor:
    """One network, built once per actor; computes the usable images of each batch."""

    def __init__(self, job: Job, weights: list[Any]) -> None:
        import ray

        from vggfeat.network import CutNetwork

        reference, digest = weights
        received = ray.get(reference)
        if received.digest() != digest:
            raise VggfeatError("the weights an actor received differ from the driver's")
        self.shapes = job.feature_shapes()
        self.network = CutNetwork(
            job.architecture, list(job.cuts), job.image_size, received, job.seed,
            job.precision, job.backend, job.device, job.compute_dtype, job.preprocessing,
        )  # fmt: skip
        self.network.set_batch_size(job.batch_size or 1)
        self.node = node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = batch["reason"] == ""
        count = len(good)
        started = time.perf_counter()
        computed = self.network(batch["pixels"][good]) if good.any() else None
        seconds = time.perf_counter() - started
        out = {key: batch[key] for key in ("path", "size", "mtime_ns", "reason")}
        for index, shape in enumerate(self.shapes):
            features = np.zeros((count, *shape), np.float32)
            if computed is not None:
                features[good] = computed[index]
            out[f"features_{index}"] = features
        out["seconds"] = np.where(good, seconds / max(1, int(good.sum())), 0.0)
        out["node"] = np.array([self.node] * count, dtype=object)
        return out
