"""k-means on unit-length rows: k-means++ seeding, then Lloyd's iterations.

NumPy alone, a chunk of rows at a time: matrix products (BLAS) find each
row's nearest centre and sum each cluster's rows. (faiss's nearest-centre
search is no faster here, and its OpenMP threads, spinning between calls,
starve NumPy's BLAS threads: a 5,000-row clustering took 10 s, not 0.2 s.)
Clusters are numbered by size, biggest first, and each row's distance to its
centre is Euclidean, between the unit row and the centre (the mean of its
rows, which is shorter than 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vggfeat.errors import OptionError
from vggfeat.search.progress import OnStep, Step, ignore

#: Lloyd's iterations at most; they stop sooner once the centres stop moving.
MAX_ITERATIONS = 100
#: Centres have stopped when they moved, squared and summed, less than this share of
#: the rows' mean variance (scikit-learn's rule and default).
TOLERANCE = 1e-4
#: An iteration that lowers the inertia by less than this share of it ends them too:
#: later ones move a few rows between neighbouring clusters (on the benchmark's 100,000
#: rows, 60 more iterations lowered it by 0.07%).
IMPROVEMENT = 5e-5
#: Seedings tried, each iterated on a sample; the best is iterated on every row.
RESTARTS = 10
#: ...as long as their iterations on the sample cost at most this many multiply-adds
#: (about 10 s on 2 cores), and at least this many seedings whatever they cost: many
#: clusters make each seeding dearer (it grows with the square of K) and its luck matter
#: less.
RESTART_WORK = 2e11
FEWEST_RESTARTS = 3
#: The sample the seedings are tried on: this many rows per cluster, or this many at
#: least (all of them, for a small file), and the iterations each gets there.
SAMPLE_PER_CLUSTER = 50
SMALLEST_SAMPLE = 5_000
SAMPLE_ITERATIONS = 20
#: Values of a (rows, K) block of distances or of the one-hot matrix the centres are
#: summed through, at a time.
ONE_HOT_VALUES = 1 << 24


@dataclass(frozen=True)
class Clustering:
    """Each row's cluster (0 is the biggest) and distance to its centre."""

    labels: np.ndarray
    """(N,) int64."""
    distances: np.ndarray
    """(N,) float32, Euclidean."""
    centres: np.ndarray
    """(K, D) float32, in the clusters' order."""
    sizes: np.ndarray
    """(K,) int64, largest first."""
    inertia: float
    """The sum of squared distances: what k-means makes small."""
    iterations: int
    empty: int = 0
    """Clusters asked for but left empty (the rows have fewer distinct values): dropped."""

    def nearest_centre(self, cluster: int, count: int) -> np.ndarray:
        """The rows of ``cluster`` nearest its centre, nearest first, ``count`` at most."""
        members = np.flatnonzero(self.labels == cluster)
        order = np.argsort(self.distances[members], kind="stable")
        return members[order[:count]]


def check_clusters(clusters: int, rows: int, file: os.PathLike | str, left_out: int = 0) -> None:
    """Refuse a ``--clusters`` the file cannot answer: more clusters than the rows that
    can be compared (``left_out`` more cannot)."""
    if clusters < 1:
        raise OptionError(f"--clusters {clusters}: give 1 or more")
    if clusters <= rows:
        return
    held = f"{os.fspath(file)} holds {rows:,} row{'s' if rows != 1 else ''}"
    if left_out:
        held += f" to compare ({left_out:,} more {'has' if left_out == 1 else 'have'} no direction)"
    raise OptionError(f"--clusters {clusters}: {held}; give --clusters {rows:,} or less")


def kmeans(
    rows: np.ndarray,
    clusters: int,
    seed: int = 0,
    restarts: int = RESTARTS,
    on_step: OnStep = ignore,
) -> Clustering:
    """k-means of ``rows`` ((N, D) float32) into ``clusters`` clusters, seeded by ``seed``.

    Lloyd's iterations find the nearest local minimum of the seeding, and seedings
    differ: ``restarts`` seedings (fewer, 3 at least, where many clusters make each
    dear) are each iterated on a sample of the rows (all of them, for a small file),
    and the best is iterated on every row until it stops.
    """
    _check_rows(rows, clusters)
    rng = np.random.default_rng(seed)
    size = min(len(rows), max(SAMPLE_PER_CLUSTER * clusters, SMALLEST_SAMPLE))
    # Each seeding's iterations on the sample cost about this many multiply-adds.
    work = 2 * SAMPLE_ITERATIONS * size * clusters * rows.shape[1]
    restarts = max(min(restarts, FEWEST_RESTARTS), min(restarts, int(RESTART_WORK // work)))
    sample = rows if size == len(rows) else rows[np.sort(rng.choice(len(rows), size, False))]
    # Centres have stopped when they moved less than this, squared and summed.
    tolerance = TOLERANCE * float(np.mean(np.var(sample, axis=0, dtype=np.float64)))
    best, lowest = None, np.inf
    for restart in range(restarts):
        on_step(Step("seeding", restart, restarts, "seedings"))
        centres = _seed(sample, clusters, rng)
        inertia, _ = _lloyd(sample, centres, SAMPLE_ITERATIONS, tolerance)
        if inertia < lowest:
            best, lowest = centres, inertia
    assert best is not None
    on_step(Step("seeding", restarts, restarts, "seedings"))
    _, (squared, labels, iterations) = _lloyd(rows, best, MAX_ITERATIONS, tolerance, on_step)
    return _ordered(rows, best, labels, squared, iterations)


def _check_rows(rows: object, clusters: int) -> None:
    """Refuse what k-means cannot take, naming the argument."""
    if not isinstance(rows, np.ndarray) or rows.ndim != 2 or rows.dtype.kind != "f":
        raise TypeError(
            "kmeans takes rows as an (N, D) float array (read_vectors(...).rows), not "
            + (f"an array of shape {rows.shape} and dtype {rows.dtype}"
               if isinstance(rows, np.ndarray) else type(rows).__name__)
        )  # fmt: skip
    if not isinstance(clusters, int) or isinstance(clusters, bool) or clusters < 1:
        raise ValueError(f"kmeans: clusters={clusters!r}: give a whole number, 1 or more")
    if clusters > len(rows):
        raise ValueError(f"kmeans: clusters={clusters} is more than the {len(rows):,} rows")
    if not np.isfinite(rows).all():
        raise ValueError("kmeans: rows hold NaN or an infinity (read_vectors leaves such rows out)")


def _lloyd(
    rows: np.ndarray,
    centres: np.ndarray,
    most: int,
    tolerance: float,
    on_step: OnStep = ignore,
) -> tuple[float, tuple[np.ndarray, np.ndarray, int]]:
    """Lloyd's iterations from ``centres`` (moved in place) until they move less than
    ``tolerance``, lower the inertia by less than ``IMPROVEMENT`` of it, or ``most`` are
    done: the inertia, and each row's squared distance and centre, and the iterations."""
    iterations, before = 0, np.inf
    while True:
        squared, labels = _assign(rows, centres)
        inertia = float(squared.sum(dtype=np.float64))
        iterations += 1
        on_step(Step("iterating", iterations, None, "iterations"))
        if iterations == most or before - inertia <= IMPROVEMENT * inertia:
            break
        before = inertia
        if _update(rows, labels, squared, centres) <= tolerance:
            squared, labels = _assign(rows, centres)
            inertia = float(squared.sum(dtype=np.float64))
            break
    return inertia, (squared, labels, iterations)


def _seed(rows: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ (Arthur and Vassilvitskii, with scikit-learn's 2 + log k trials
    a step): each centre a row drawn in proportion to its squared distance to the
    nearest centre so far, the best of the trials kept."""
    count = len(rows)
    trials = 2 + int(np.log(clusters))
    norms = np.einsum("ij,ij->i", rows, rows)
    centres = np.empty((clusters, rows.shape[1]), np.float32)
    first = int(rng.integers(count))
    centres[0] = rows[first]
    closest = _squared(rows, norms, np.array([first]))[:, 0]
    for index in range(1, clusters):
        total = float(closest.sum())
        if total > 0:
            cumulative = np.cumsum(closest, dtype=np.float64)
            picks = np.searchsorted(cumulative, rng.random(trials) * cumulative[-1])
            candidates = np.minimum(picks, count - 1)
        else:  # every row is a centre already: any row will do
            candidates = rng.integers(count, size=1)
        tried = np.minimum(closest[:, None], _squared(rows, norms, candidates))
        best = int(np.argmin(tried.sum(axis=0)))
        closest = tried[:, best]
        centres[index] = rows[candidates[best]]
    return centres


def _squared(rows: np.ndarray, norms: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """(N, len(picked)) squared distances of every row to the picked rows."""
    squared = norms[:, None] - 2 * (rows @ rows[picked].T) + norms[picked][None, :]
    return np.maximum(squared, 0, out=squared)


def _assign(rows: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's squared distance to its nearest centre, and that centre; a chunk of
    rows at a time, so memory holds one (chunk, K) block of distances."""
    count, clusters = len(rows), len(centres)
    squared = np.empty(count, np.float32)
    nearest = np.empty(count, np.int64)
    centre_norms = np.einsum("ij,ij->i", centres, centres)
    step = max(1, ONE_HOT_VALUES // clusters)
    for start in range(0, count, step):
        chunk = rows[start : start + step]
        distances = chunk @ centres.T
        distances *= -2
        distances += centre_norms
        best = distances.argmin(axis=1)
        nearest[start : start + step] = best
        closest = distances[np.arange(len(chunk)), best] + np.einsum("ij,ij->i", chunk, chunk)
        squared[start : start + step] = np.maximum(closest, 0)
    return squared, nearest


def _update(
    rows: np.ndarray, labels: np.ndarray, squared: np.ndarray, centres: np.ndarray
) -> float:
    """Move each centre to the mean of its rows, in place; an empty cluster takes the row
    farthest from its centre. Returns how far the centres moved, squared and summed."""
    clusters, width = centres.shape
    sums = np.zeros((clusters, width), np.float64)
    step = max(1, ONE_HOT_VALUES // clusters)
    for start in range(0, len(rows), step):
        chunk = labels[start : start + step]
        one_hot = np.zeros((len(chunk), clusters), np.float32)
        one_hot[np.arange(len(chunk)), chunk] = 1
        sums += one_hot.T @ rows[start : start + step]
    sizes = np.bincount(labels, minlength=clusters)
    moved = sums / np.maximum(sizes, 1)[:, None]
    empty = np.flatnonzero(sizes == 0)
    if len(empty):
        farthest = np.argsort(squared)[::-1][: len(empty)]
        moved[empty[: len(farthest)]] = rows[farthest]
    shift = float(np.sum((moved - centres) ** 2))
    centres[:] = moved
    return shift


def _ordered(
    rows: np.ndarray,
    centres: np.ndarray,
    labels: np.ndarray,
    squared: np.ndarray,
    iterations: int,
) -> Clustering:
    """The clusters renumbered by size, largest first (ties: the one holding the earlier
    row first), empty ones dropped."""
    clusters = len(centres)
    sizes = np.bincount(labels, minlength=clusters)
    first_row = np.full(clusters, len(rows), np.int64)
    np.minimum.at(first_row, labels, np.arange(len(rows)))
    order = np.lexsort((first_row, -sizes))
    order = order[sizes[order] > 0]
    number = np.full(clusters, -1, np.int64)
    number[order] = np.arange(len(order))
    return Clustering(
        labels=number[labels],
        distances=np.sqrt(squared).astype(np.float32),
        centres=centres[order],
        sizes=sizes[order],
        inertia=float(squared.sum(dtype=np.float64)),
        iterations=iterations,
        empty=clusters - len(order),
    )
