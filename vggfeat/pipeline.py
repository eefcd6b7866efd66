"""The run: discover -> decode -> batch -> network -> store, with the stages kept busy together.

Decoding runs in a pool of threads (Pillow and TensorFlow both release the
GIL for their heavy work) a bounded number of images ahead of the network, so
memory stays flat however many images there are, and results are taken in
input order, so rows are in the order of discovery. Progress is reported as
events; nothing here prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from vggfeat.architecture import POOLINGS, TOP_IMAGE_SIZE, vgg
from vggfeat.engine import ENGINES, STALL_SECONDS, Job, LocalEngine
from vggfeat.errors import OptionError, VggfeatError
from vggfeat.images import (
    RESAMPLING,
    RESIZE_MODES,
    Failure,
    discover,
    pixel_limit,
)
from vggfeat.interrupts import Terminated, stopping_on_signals
from vggfeat.network import PRECISIONS, PREPROCESSING, Cut, compute_dtype
from vggfeat.runtime import choose_device, default_backend, require
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
    engine: str
    """``local`` or ``ray``."""
    rows_per_node: dict[str, int]
    computed_by: str
    """What computed this run's images: device, compute dtype, backend and version."""
    """Images computed on each machine (``local`` for the local engine)."""
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
    batch_size: int | None = None,
    image_size: int = TOP_IMAGE_SIZE,
    resize: str = "squash",
    precision: str = "float32",
    backend: str | None = None,
    device: str | None = None,
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
    engine: str = "local",
    ray_address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    stall_timeout: float | None = None,
    verbose: bool = False,
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
    shares; the last shard to finish writes the output. ``engine="ray"`` runs
    the decoding and the network on a Ray cluster (``ray_address``, else a
    local instance), with ``actors`` networks of ``gpus_per_actor`` GPUs each,
    and stops when no image is done for ``stall_timeout`` seconds.

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
    _check_output_name(output)
    if (
        (batch_size is not None and batch_size < 1)
        or commit_every < 1
        or (workers is not None and workers < 1)
    ):
        raise OptionError("--batch-size, --commit-every and --workers must be at least 1")
    if isinstance(shard, str):
        shard = Shard.parse(shard)
    _check_engine(engine, ray_address, actors, gpus_per_actor, stall_timeout, verbose)
    backend = backend or default_backend()
    require(backend)
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
        compute_dtype=_compute_dtype(precision, backend, device, engine, gpus_per_actor),
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
            **_versions(backend),
        },
    )
    store = FeatureStore.open(output, layout, overwrite=overwrite, shard=shard)
    store.commit_images = commit_every
    job = Job(
        depth=depth,
        layers=settings.layers,
        image_size=image_size,
        batch_size=batch_size,
        pool=pool,
        weights=os.fspath(weights),
        seed=seed,
        precision=precision,
        resize=resize,
        max_pixels=max_pixels,
        workers=workers,
        backend=backend,
        device=device,
        compute_dtype=settings.compute_dtype,
    )
    running = None
    drive = _Driver(store, on_progress)
    with stopping_on_signals(), pixel_limit(max_pixels):
        try:
            pruned = _pruned(store, yes) if prune else set()
            work, already = _plan(store, paths, update)
            drive.start(sum(len(todo) for _, todo in work), already)
            if drive.total:
                running = _start_engine(
                    engine,
                    job,
                    drive.total,
                    ray_address,
                    actors,
                    gpus_per_actor,
                    stall_timeout,
                    verbose,
                )
            learnt = {"weights_sha256": running.weights_sha256} if running else {}
            learnt |= {"backend": backend} | (running.computed_by if running else {})
            for index, todo in work:
                store.begin(index)
                if todo:
                    before = dict(running.stats.rows_per_node)
                    drive.run(running, todo)
                    # This shard's rows only: the output sums every shard's record.
                    rows = {
                        node: count - before.get(node, 0)
                        for node, count in running.stats.rows_per_node.items()
                        if count > before.get(node, 0)
                    }
                    learnt |= {
                        "engine": running.name,
                        "cluster": json.dumps(running.stats.description),
                        "rows_per_node": json.dumps(rows),
                    }
                store.finish_shard(index, learnt)
            written = time.perf_counter()
            assembly = store.assemble(prune=pruned)
            drive.writing += time.perf_counter() - written
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
            # Rows already computed are whole: keep them for the next run.
            with contextlib.suppress(Exception):
                store.commit()
            store.discard()
            raise
        finally:
            if running is not None:
                running.close()
    seconds = time.perf_counter() - started
    busy = drive.waiting + drive.network + drive.writing
    return Summary(
        output=store.path,
        computed=drive.computed,
        failures=tuple(drive.failures),
        already=already,
        assembled=assembly is not None,
        stored=assembly.appended if assembly else 0,
        replaced=assembly.replaced if assembly else 0,
        dropped=assembly.dropped if assembly else 0,
        rows=assembly.rows if assembly else 0,
        waiting_for=waiting_for,
        shard=shard,
        engine=running.name if running else engine,
        computed_by=running.computed_by["device"] if running else "",
        rows_per_node=dict(running.stats.rows_per_node) if running else {},
        seconds=seconds,
        timings=Timings(max(0.0, seconds - busy), drive.waiting, drive.network, drive.writing),
        file_bytes=store.path.stat().st_size if store.path.exists() else 0,
        batch_size=running.batch_size if running else batch_size or 0,
        requested_batch_size=running.requested_batch_size if running else batch_size or 0,
    )


def _compute_dtype(
    precision: str, backend: str, device: str | None, engine: str, gpus_per_actor: float | None
) -> str:
    """What the layers will compute in, known before anything is written."""
    if precision == "float32":
        return "float32"
    if engine == "ray":
        # Resolved here, before any cluster is reached; every actor computes in it.
        kind = "gpu" if gpus_per_actor else "cpu"
    else:
        kind = choose_device(backend, device).kind
    return compute_dtype(precision, kind, backend)


def _check_engine(engine, address, actors, gpus_per_actor, stall_timeout, verbose) -> None:
    """Refuse engine options that cannot work, before anything starts."""
    if engine not in ENGINES:
        raise OptionError(f"--engine {engine} is not one of {', '.join(ENGINES)}")
    if engine == "local":
        used = [
            name
            for name, value in (
                ("--ray-address", address),
                ("--actors", actors),
                ("--gpus-per-actor", gpus_per_actor),
                ("--stall-timeout", stall_timeout),
                ("--verbose", verbose or None),
            )
            if value is not None
        ]
        if used:
            raise OptionError(
                f"{' and '.join(used)} {'works' if len(used) == 1 else 'work'} with "
                "--engine ray only"
            )
        return
    from vggfeat.ray_engine import check_address, require_ray

    require_ray()
    if address not in (None, "auto"):
        check_address(address)
    if actors is not None and actors < 1:
        raise OptionError("--actors must be at least 1")
    if gpus_per_actor is not None and not 0 <= gpus_per_actor < math.inf:
        raise OptionError("--gpus-per-actor must be 0 or more, fractions allowed (0.5)")
    if stall_timeout is not None and not 0 < stall_timeout < math.inf:
        raise OptionError("--stall-timeout must be a number of seconds more than 0")


def _start_engine(engine, job, count, address, actors, gpus_per_actor, stall_timeout, verbose):
    if engine == "ray":
        from vggfeat.ray_engine import RayEngine

        stall = STALL_SECONDS if stall_timeout is None else stall_timeout
        return RayEngine(job, address, actors, gpus_per_actor, stall, verbose)
    return LocalEngine(job, count)


class _Driver:
    """Takes an engine's results into the store, in order; counts, times and reports them."""

    def __init__(self, store: FeatureStore, on_progress) -> None:
        self.store = store
        self.on_progress = on_progress
        self.total = self.already = self.computed = 0
        self.failures: list[Failure] = []
        self.waiting = self.network = self.writing = 0.0
        self.started = time.perf_counter()

    def start(self, total: int, already: int) -> None:
        self.total, self.already = total, already
        self._report()
        self.started = time.perf_counter()

    def run(self, engine, paths: list[str]) -> None:
        results = iter(engine.run(paths))
        while True:
            asked = time.perf_counter()
            result = next(results, None)
            if result is None:
                return
            taken = time.perf_counter()
            if isinstance(result, Failure):
                self.failures.append(result)
                self.store.add_failures([result])
            else:
                self.store.append(result.sources, result.features)
                self.computed += len(result.sources)
                self.network += result.seconds
            # The local engine computes while asked for the next result; that is not waiting.
            here = result.seconds if engine.computes_here and not isinstance(result, Failure) else 0
            self.waiting += max(0.0, taken - asked - here)
            self.writing += time.perf_counter() - taken
            self._report()

    def _report(self) -> None:
        if self.on_progress:
            self.on_progress(
                Progress(
                    done=self.computed + len(self.failures),
                    failed=len(self.failures),
                    total=self.total,
                    elapsed=time.perf_counter() - self.started,
                    already=self.already,
                )
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


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after committing its completed work.

    ``exit_code`` is 130 for Ctrl-C and 143 for SIGTERM; ``parts`` is the
    folder that holds the committed work, from which the same call continues.
    """

    def __init__(self, exit_code: int, parts: Path) -> None:
        super().__init__(exit_code, parts)
        self.exit_code = exit_code
        self.parts = parts


def _feature_sets(catalogue, cuts: list[Cut], pool: str) -> list[FeatureSet]:
    """The output's datasets: per cut, its name, layer, pooling and per-image shape."""
    return [
        FeatureSet(
            cut.label,
            cut.layer.name,
            pool if cut.pools(pool) else "none",
            cut.feature_shape(catalogue, pool),
        )
        for cut in cuts
    ]


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


#: Extensions of formats export does not write that an output is still often named for.
NOT_HDF5 = (".npz", ".json", ".pt")


def _check_output_name(output: str | os.PathLike) -> None:
    """Refuse an output that names a stream or another format: extract writes HDF5 only."""
    from vggfeat.export import EXTENSIONS, format_of

    name = os.fspath(output)
    if name == "-":
        raise OptionError(
            "-o -: extract writes an HDF5 file, not a stream; write one (-o features.h5), "
            "then 'vggfeat export features.h5 --format npy' writes it to standard output"
        )
    if name.endswith(os.sep):
        raise OptionError(f"-o {name} names a folder; name the HDF5 file to write in it")
    longest = 255 - len(".parts")  # the work folder beside the output must fit too
    if len(os.fsencode(os.path.basename(name))) > longest:
        raise OptionError(f"-o {name}: the file name is too long; use at most {longest} bytes")
    suffix = Path(name).suffix.lower()
    if suffix.lstrip(".") not in EXTENSIONS and suffix not in NOT_HDF5:
        return
    stem = Path(name).with_suffix("")
    h5 = str(stem if stem.suffix.lower() in (".h5", ".hdf5") else stem.with_suffix(".h5"))
    convert = f"-o {name}" if format_of(name) else f"--format npy -o {stem}.npy"
    raise OptionError(
        f"-o {name}: extract writes HDF5 only; write {h5} and convert it with "
        f"'vggfeat export {h5} {convert}'"
    )


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
            raise OptionError(f"--{option} {value} is not one of {', '.join(allowed[option])}")


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
