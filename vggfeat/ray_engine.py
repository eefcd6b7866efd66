"""The Ray engine: decoding as CPU tasks across a cluster, the network in a pool of actors.

Ray Data streams the images through two stages: decoding, as Ray tasks
wherever there are CPUs, and the network, in an autoscaling pool of actors
that each build the network once (one per GPU where there are GPUs). Results
come back to the driver in input order (``preserve_order``), where the store
commits them as the local engine's are: the output is written from the
driver alone, and what is done is known to the store alone.

The pool autoscales from one actor, because a fixed pool that no longer fits
the cluster after a node is lost waits forever (measured here); a watchdog
stops the run when nothing is done for ``stall_timeout`` seconds, keeping
what was committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from vggfeat.architecture import vgg
from vggfeat.engine import Computed, EngineStats, Job, Result
from vggfeat.errors import OptionError, VggfeatError
from vggfeat.images import Decoded, Failure, Source, pixel_limit
from vggfeat.network import BATCH_SIZES
from vggfeat.runtime import BACKEND_NAMES, backend_version, muted_stderr, start

INSTALL = "pip install 'vggfeat[ray]'"
#: Seconds to wait for a Ray cluster to answer when connecting.
CONNECT_SECONDS = float(os.environ.get("VGGFEAT_RAY_CONNECT_SECONDS", "60"))
#: Images per decoding task: enough to amortise a task, few enough to spread them.
DECODE_BATCH = 16
#: Ray's logical CPUs a decoding task and a network actor reserve. Half each, so that a
#: node with one CPU holds an actor and a decoding task: with one each it would hold
#: either, and a one-CPU cluster would wait forever.
DECODE_CPUS = ACTOR_CPUS = 0.5


class StalledError(VggfeatError):
    """No image was done for ``--stall-timeout`` seconds."""


def require_ray() -> None:
    """Fail at once, naming the install command, when Ray is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise VggfeatError(f"--engine ray needs Ray, which is not installed: {INSTALL}") from None


class RayEngine:
    """Runs a job's decoding and network on Ray; yields results in input order."""

    name = "ray"
    computes_here = False

    def __init__(
        self,
        job: Job,
        address: str | None = None,
        actors: int | None = None,
        gpus_per_actor: float | None = None,
        stall_timeout: float = 300.0,
        verbose: bool = False,
    ) -> None:
        import ray

        self.job = job
        self.stall_timeout = stall_timeout
        self.verbose = verbose
        self._started_ray = _connect(address, verbose)
        # Ray prints the cluster's error messages ("(raylet) Task ... will be retried")
        # on sys.stdout from a thread of its own; stdout carries only what was asked for.
        self._stdout = sys.stdout
        sys.stdout = sys.stderr if verbose else open(os.devnull, "w")  # noqa: SIM115
        try:
            _quiet_ray_data(verbose)
            resources = ray.cluster_resources()
            nodes = [node for node in ray.nodes() if node.get("Alive")]
            gpus = float(resources.get("GPU", 0))
            cpus = float(resources.get("CPU", 0))
            self.gpus_per_actor = (
                gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus else 0.0)
            )
            if self.gpus_per_actor and self.gpus_per_actor > gpus:
                raise VggfeatError(
                    f"--gpus-per-actor {self.gpus_per_actor:g}: the cluster has {gpus:g} GPUs; "
                    "use --gpus-per-actor 0 to run the network on CPUs"
                )
            self.actors = actors or (
                max(1, int(gpus / self.gpus_per_actor))
                if self.gpus_per_actor
                else max(1, int(cpus) // 4)
            )
            self._node_ips = {node["NodeID"]: node.get("NodeManagerAddress", "?") for node in nodes}
            self.weights, self.weights_sha256 = self._prepare_weights()
            self.computed_by = {
                "device": f"a Ray cluster of {len(nodes)} node{'s' if len(nodes) != 1 else ''} "
                f"(up to {self.actors} network{'s' if self.actors != 1 else ''}), "
                f"{job.compute_dtype}, {BACKEND_NAMES[job.backend]} {backend_version(job.backend)}",
                "backend_version": backend_version(job.backend),
            }
            self.stats = EngineStats(
                description={
                    "engine": "ray",
                    "address": address or "local instance",
                    "nodes": len(nodes),
                    "cpus": cpus,
                    "gpus": gpus,
                    "actors": self.actors,
                    "gpus_per_actor": self.gpus_per_actor,
                }
            )
            kind = "gpu" if self.gpus_per_actor else "cpu"
            self.job = replace(job, batch_size=job.batch_size or BATCH_SIZES[kind])
            self.batch_size = self.requested_batch_size = self.job.batch_size
        except BaseException:
            self.close()
            raise

    def _prepare_weights(self) -> tuple[list | None, str]:
        """Read a weights file once here, and put it where every actor fetches it from."""
        import ray

        from vggfeat.weights import PreparedWeights

        if self.job.weights == "random":
            return None, ""
        start(self.job.backend)  # Keras fetches the ImageNet file
        architecture = vgg(self.job.depth)
        needs_top = any(cut.layer.is_top for cut in self.job.cuts())
        prepared = PreparedWeights.read(architecture, needs_top, self.job.weights)
        # In a list, so that Ray passes the reference and each actor fetches it itself.
        return [ray.put(prepared), prepared.digest()], prepared.record.sha256

    def run(self, paths: Sequence[str]) -> Iterator[Result]:
        """A ``Computed`` per run of usable images and a ``Failure`` per other, in input order."""
        import ray
        import ray.data

        self._check_visible(paths)
        items = [{"path": path, "file": os.path.abspath(path)} for path in paths]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // DECODE_BATCH))
        decoded = dataset.map_batches(
            _decode_batch,
            fn_kwargs={"job": self.job},
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
        )
        computed = decoded.map_batches(
            _NetworkActor,
            fn_constructor_kwargs={"job": self.job, "weights": self.weights},
            batch_size=self.job.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=self.actors),
            num_gpus=self.gpus_per_actor or None,
            num_cpus=ACTOR_CPUS,
            # The memory a network needs. Asking for it also keeps Ray Data from
            # fusing decoding into the actors, where a network would wait for it.
            memory=self._actor_memory(),
        )
        watchdog = _Watchdog(self.stall_timeout)
        try:
            with watchdog:
                for batch in computed.iter_batches(batch_size=None, batch_format="numpy"):
                    watchdog.progress()
                    yield from self._results(batch)
        except KeyboardInterrupt:
            if not watchdog.stalled:
                raise
            raise StalledError(
                f"no image was done for {self.stall_timeout:g} s (--stall-timeout): the Ray "
                "cluster may have lost the nodes it needs; completed work is kept, run the "
                "same command to continue"
            ) from None
        except ray.exceptions.RayError as error:
            raise VggfeatError(_ray_failure(error)) from None

    def _actor_memory(self) -> int:
        """Bytes one network actor holds: its weights twice over, and room to compute."""
        catalogue = vgg(self.job.depth).catalogue(self.job.image_size)
        deepest = max(catalogue.layers.index(catalogue.facts(cut.layer)) for cut in self.job.cuts())
        weights = sum(facts.params for facts in catalogue.layers[: deepest + 1]) * 4
        return 2 * weights + (512 << 20)

    def _results(self, batch: dict[str, np.ndarray]) -> Iterator[Result]:
        names = [f"features_{i}" for i in range(len(self.job.layers))]
        good = batch["reason"] == ""
        start = 0
        for stop in [*np.flatnonzero(~good).tolist(), len(good)]:
            if stop > start:
                rows = slice(start, stop)
                for node in batch["node"][rows].tolist():
                    ip = self._node_ips.get(node, node)
                    self.stats.rows_per_node[ip] = self.stats.rows_per_node.get(ip, 0) + 1
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
                    node=str(batch["node"][start]),
                )
            if stop < len(good):
                yield Failure(
                    str(batch["path"][stop]),
                    str(batch["reason"][stop]),
                    int(batch["size"][stop]),
                    int(batch["mtime_ns"][stop]),
                )
            start = stop + 1

    def _check_visible(self, paths: Sequence[str]) -> None:
        """Every node must see the inputs: ask each one for the first image."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = next((path for path in paths if os.path.exists(path)), None)
        if here is None:
            return  # no input exists even here: each is recorded as a failure
        sample = os.path.abspath(here)
        sees = ray.remote(num_cpus=0)(_sees)
        checks = {
            ip: sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(sample)
            for node, ip in self._node_ips.items()
        }
        try:
            seen = dict(zip(checks, ray.get(list(checks.values()), timeout=60), strict=True))
        except ray.exceptions.GetTimeoutError:
            raise VggfeatError(
                "the Ray cluster did not answer within 60 s whether its nodes see the inputs"
            ) from None
        blind = [ip for ip, found in seen.items() if not found]
        if blind:
            raise VggfeatError(
                f"Ray nodes {', '.join(blind)} do not see {sample}: inputs must be on a file "
                "system every node mounts at the same path"
            )

    def close(self) -> None:
        """Disconnect, and stop the local Ray instance if this engine started it."""
        import ray

        if self._started_ray and ray.is_initialized():
            with muted_stderr(enabled=not self.verbose):
                ray.shutdown()
            self._started_ray = False
        if self._stdout is not None:
            if sys.stdout is not sys.stderr:
                sys.stdout.close()
            sys.stdout, self._stdout = self._stdout, None


def _connect(address: str | None, verbose: bool) -> bool:
    """Connect to the cluster at ``address``, or start a local instance; whether we started one."""
    import ray

    if ray.is_initialized():
        return False  # the caller's own Ray session
    if not verbose:
        # Ray's C++ side logs to stderr after start-up too, and so does TensorFlow in the
        # workers it starts: INFO and warnings stay out.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    if address and address != "auto":
        _check_reachable(address)
    where = f"at {address}" if address else "locally"
    # ray.init sets SIGTERM and SIGINT handlers that exit at once; vggfeat's commit first.
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    # Something that listens at the address but is no Ray makes ray.init wait forever.
    timer = _Watchdog(CONNECT_SECONDS)
    try:
        with muted_stderr(enabled=not verbose), timer:
            ray.init(
                # Without an address, a new local instance, never a cluster already running here.
                address=address or "local",
                include_dashboard=False,
                log_to_driver=verbose,
                logging_level=logging.INFO if verbose else logging.ERROR,
                configure_logging=True,
                # TensorFlow's start-up notes in the workers would reach this terminal.
                runtime_env={} if verbose else {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}},
            )
    except KeyboardInterrupt:
        if not timer.stalled:
            raise
        with contextlib.suppress(Exception):
            ray.shutdown()
        raise VggfeatError(
            f"no Ray cluster answered {where} within {CONNECT_SECONDS:g} s; check --ray-address "
            "(the head node's address, as 'ray start --head' printed it) or use auto"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        reasons = _reasons(error)
        hint = (
            "the cluster requires token authentication: set RAY_AUTH_MODE=token (and its token) "
            "here as on the cluster, or run on the head node with --ray-address auto"
            if "auth" in reasons.lower()
            else "start one with 'ray start --head', or leave out --ray-address for a local "
            "instance"
        )
        raise VggfeatError(f"cannot connect to a Ray cluster {where}: {reasons}; {hint}") from None
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return True


def _reasons(error: BaseException) -> str:
    """The first line of an error and of each error that caused it, once each."""
    lines: list[str] = []
    while error is not None and len(lines) < 4:
        line = _first_line(error)
        if line not in lines:
            lines.append(line)
        error = error.__cause__ or error.__context__
    return ": ".join(lines)


def check_address(address: str) -> tuple[str, int]:
    """The host and port of ``--ray-address``; ``OptionError`` unless auto, HOST:PORT or ray://."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionError(f"--ray-address {address} is not auto, HOST:PORT or ray://HOST:PORT")
    return host, int(port)


def _check_reachable(address: str) -> None:
    """A clear error within seconds when nothing listens at ``address`` (Ray would retry long)."""
    host, port = check_address(address)
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as error:
        raise VggfeatError(
            f"no Ray cluster answers at {address} ({error.strerror or error}); start one with "
            "'ray start --head', or leave out --ray-address for a local instance"
        ) from None


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data's own progress bars and logs stay out of the terminal unless asked for."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = verbose
    with contextlib.suppress(AttributeError):
        context.print_on_execution_start = verbose
    # Ray Data logs a failed task's whole traceback at ERROR; vggfeat says it in one line.
    level = logging.INFO if verbose else logging.CRITICAL
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)


def _ray_failure(error: BaseException) -> str:
    """One line for a failed Ray job: vggfeat's own message where an actor raised one."""
    text = str(error)
    found = re.search(r"vggfeat\.[\w.]*Error: (.+)", text) or re.search(
        r"(?:VggfeatError|MismatchError|UnavailableError)\w*: (.+)", text
    )
    if found:
        return found[1].strip()
    return f"the Ray job failed: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _Watchdog:
    """Interrupts the driver when no progress was reported for ``limit`` seconds."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.stalled = False
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def progress(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.limit / 4)):
            if time.monotonic() - self._last > self.limit:
                self.stalled = True
                # A real signal to the main thread: it wakes a wait on a lock, which
                # _thread.interrupt_main() would not.
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return


# Run on the cluster ----------------------------------------------------------------------


def _sees(path: str) -> bool:
    return os.path.exists(path)


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

    def __init__(self, job: Job, weights: list | None) -> None:
        import ray

        chosen: Any = job.weights
        if weights is not None:
            reference, digest = weights
            chosen = ray.get(reference)
            if chosen.digest() != digest:
                raise VggfeatError("the weights an actor received differ from the driver's")
        self.shapes = job.feature_shapes()
        self.network = job.network(weights=None if chosen is job.weights else chosen)
        self.node = ray.get_runtime_context().get_node_id()

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
