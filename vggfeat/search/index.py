"""Inner-product search over unit-length rows with faiss: exact while that is fast,
an inverted-file index (IVF) above, its recall measured against exact search.

faiss is the ``search`` extra; ``require_faiss`` says how to install it. Every
search is by batches of queries, so memory holds the rows, an index's copy of
them and one batch of results: never all pairs, never an N x N matrix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vggfeat.errors import VggfeatError
from vggfeat.search.progress import OnStep, Step, ignore

SEARCHES = ("auto", "exact", "approximate")
#: Multiply-adds of an exact search (queries x rows x width) that ``auto`` still does
#: exactly: about 20 s on 2 cores. 20,000 rows of 512 against each other are 2e11.
EXACT_WORK = 2e11
#: ``auto`` never builds an approximate index for fewer rows than this.
FEWEST_APPROXIMATE = 1000
#: The approximate index probes more lists until its recall on the sample reaches this:
#: of the nearest neighbours, and of the pairs at a threshold or above, which is stricter
#: (a pair missed can split a group of duplicates).
RECALL_TARGET = 0.97
RANGE_RECALL_TARGET = 0.995
#: Lists a search for pairs probes at least: a sample holds few pairs (the benchmark's
#: 1,000 sampled rows held about 20), too few to tell 99% from 100%, and a pair missed
#: splits a group. Probing 8 of 1,265 lists costs about a second for 100,000 rows.
FEWEST_PROBES = 8
#: Queries of the sample the recall is measured on, and at a time for pairs.
RECALL_SAMPLE = 1000
RANGE_SAMPLE_BATCH = 32
#: Training rows per list of the IVF index; faiss asks for at least 39.
TRAINING_PER_LIST = 50
FEWEST_PER_LIST = 39
#: Rows added to an index at a time, between progress events.
ADD_CHUNK = 65536


class SearchUnavailable(VggfeatError):
    """faiss, the ``search`` extra, is not installed."""


def require_faiss() -> Any:
    """The faiss module, or ``SearchUnavailable`` saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise SearchUnavailable("searching features needs faiss: pip install faiss-cpu") from None
    return faiss


@dataclass(frozen=True)
class IndexReport:
    """How the search was done, and how good it is where it is approximate."""

    kind: str
    """``exact`` or ``ivf``."""
    rows: int
    width: int
    lists: int = 0
    probes: int = 0
    recall: float | None = None
    """Of what exact search finds for the sampled queries, the share found."""
    measured: str = ""
    """What ``recall`` is of: ``recall@10``, or ``pairs at 0.95 or above``."""
    sample: int = 0
    seconds: float = 0.0
    """Building the index and measuring its recall."""

    def describe(self) -> str:
        searched = f"{self.rows:,} rows of {self.width:,}"
        if self.kind == "exact":
            return f"exact inner-product search over {searched}"
        return (
            f"approximate search over {searched}: IVF with {self.lists:,} lists, "
            f"{self.probes:,} probed per query; {self.measured} {self.recall:.3f} on "
            f"{self.sample:,} sampled queries against exact search (built in {self.seconds:.1f} s)"
        )


class Index:
    """The rows of one layer, searchable by inner product (cosine, for unit rows)."""

    def __init__(self, faiss_index: Any, report: IndexReport) -> None:
        self._index = faiss_index
        self.report = report

    @classmethod
    def build(
        cls,
        rows: np.ndarray,
        queries: int,
        k: int = 10,
        search: str = "auto",
        seed: int = 0,
        on_step: OnStep = ignore,
        threshold: float | None = None,
    ) -> Index:
        """An index over ``rows`` ((N, D) float32, unit length) for ``queries`` searches:
        exact unless that would be slow (``search="auto"``), or as ``search`` says.

        An approximate index probes more lists until, on a sample, it finds
        ``RECALL_TARGET`` of the ``k`` nearest neighbours, or, for searches of every
        row at ``threshold`` or above, ``RANGE_RECALL_TARGET`` of those pairs.
        """
        faiss = require_faiss()
        count, width = rows.shape
        if search not in SEARCHES:
            raise ValueError(f"search {search!r}: choose one of {', '.join(SEARCHES)}")
        slow = queries * count * width > EXACT_WORK and count >= FEWEST_APPROXIMATE
        lists = min(round(4 * math.sqrt(count)), count // FEWEST_PER_LIST)
        if search == "exact" or (search == "auto" and not slow) or lists < 2:
            index = faiss.IndexFlatIP(width)
            _add(index, rows, on_step)
            return cls(index, IndexReport("exact", count, width))
        began = time.monotonic()
        rng = np.random.default_rng(seed)
        index = _trained(faiss, rows, lists, rng, seed, on_step)
        _add(index, rows, on_step)
        sample = np.sort(rng.permutation(count)[:RECALL_SAMPLE])
        on_step(Step("measuring recall", 0, None))
        measure = None if threshold is None else _pair_recall(index, rows, sample, threshold)
        if measure is None:  # no pairs in the sample to measure on: its neighbours, then
            measure = _neighbour_recall(faiss, index, rows, sample, max(1, min(k, count - 1)))
        what, target, recall_at = measure
        probes, recall = min(lists, FEWEST_PROBES if threshold is not None else 1), 0.0
        while True:
            index.nprobe = probes
            recall = recall_at()
            if recall >= target or probes >= lists:
                break
            probes = min(lists, probes * 2)
        seconds = time.monotonic() - began
        report = IndexReport("ivf", count, width, lists, probes, recall, what, len(sample), seconds)
        return cls(index, report)

    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows most like each query: similarities (Q, k) float32, largest
        first, and row numbers (Q, k) int64, -1 where fewer were found."""
        similarities, rows = self._index.search(np.ascontiguousarray(queries), k)
        return similarities, rows

    def within(
        self, queries: np.ndarray, threshold: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every row at ``threshold`` or above of each query, as faiss gives them:
        ``limits`` (Q + 1,), and row numbers and similarities, query i's in
        ``limits[i]:limits[i + 1]``."""
        limits, similarities, rows = self._index.range_search(
            np.ascontiguousarray(queries), _radius(threshold)
        )
        return limits.astype(np.int64), rows, similarities


def _radius(threshold: float) -> float:
    """faiss's radius for a search at ``threshold`` or above: it keeps what is strictly
    above its radius, so the float32 just below ``threshold`` keeps what equals it."""
    return float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))


def _add(index: Any, rows: np.ndarray, on_step: OnStep) -> None:
    count = len(rows)
    for start in range(0, count, ADD_CHUNK):
        index.add(rows[start : start + ADD_CHUNK])
        on_step(Step("indexing", min(count, start + ADD_CHUNK), count))


def _trained(
    faiss: Any, rows: np.ndarray, lists: int, rng: np.random.Generator, seed: int, on_step: OnStep
) -> Any:
    """An empty IVF index of ``lists`` lists, trained on a sample of ``rows``."""
    width = rows.shape[1]
    training = rows[np.sort(rng.permutation(len(rows))[: lists * TRAINING_PER_LIST])]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    on_step(Step("training the index", 0, None))
    index.train(training)
    return index


Measure = tuple[str, float, Callable[[], float]]
"""What a recall is of, its target, and how to measure it at the index's probes now."""


def _neighbour_recall(
    faiss: Any, index: Any, rows: np.ndarray, sample: np.ndarray, k: int
) -> Measure:
    queries = rows[sample]
    truth = faiss.knn(queries, rows, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return (
        f"recall@{k}",
        RECALL_TARGET,
        lambda: _recall(sample, truth, index.search(queries, k + 1), k),
    )


def _pair_recall(
    index: Any, rows: np.ndarray, sample: np.ndarray, threshold: float
) -> Measure | None:
    """The share of the sampled rows' pairs at ``threshold`` or above (a row with itself
    not counted) that a range search finds; None if the sample has no such pair. The
    index's similarities are exact, so what it finds is a subset of the truth: counts
    compare."""
    radius = _radius(threshold)
    true = 0
    for start in range(0, len(sample), RANGE_SAMPLE_BATCH):
        batch = sample[start : start + RANGE_SAMPLE_BATCH]
        similarities = rows[batch] @ rows.T
        similarities[np.arange(len(batch)), batch] = -np.inf
        true += int(np.count_nonzero(similarities > radius))
    if true == 0:
        return None

    def found() -> float:
        pairs = 0
        for start in range(0, len(sample), RANGE_SAMPLE_BATCH):
            batch = sample[start : start + RANGE_SAMPLE_BATCH]
            limits, _, ids = index.range_search(rows[batch], radius)
            owners = np.repeat(batch, np.diff(limits.astype(np.int64)))
            pairs += int(np.count_nonzero(ids != owners))
        return pairs / true

    return f"pairs at {threshold:g} or above found", RANGE_RECALL_TARGET, found


def _recall(
    sample: np.ndarray,
    truth: tuple[np.ndarray, np.ndarray],
    found: tuple[np.ndarray, np.ndarray],
    k: int,
) -> float:
    """Of the true k nearest other rows of each sampled query, the share found; a row
    found as similar as the k-th true one counts (ties have no order)."""
    hits = total = 0
    for query, true_sims, true_rows, sims, rows in zip(sample, *truth, *found, strict=True):
        others = true_sims[true_rows != query][:k]
        if not len(others):
            continue
        kept = sims[(rows != query) & (rows >= 0)][:k]
        hits += int(np.count_nonzero(kept >= others[-1] - 1e-5))
        total += len(others)
    return hits / total if total else 1.0
