"""Groups of near-duplicates: the connected components of the graph whose edges are
the pairs of rows at a threshold of cosine similarity or above.

The pairs are found a batch of queries at a time and merged into a union-find
as they come, so only one batch of pairs is ever held, however many there are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vggfeat.errors import OptionError
from vggfeat.search.index import Index
from vggfeat.search.progress import OnStep, Step, ignore
from vggfeat.search.vectors import Vectors, require_vectors

#: Pairs one batch of queries may return; the batch shrinks where rows have many.
PAIRS_PER_BATCH = 4_000_000
FIRST_BATCH = 256
LARGEST_BATCH = 8192


@dataclass(frozen=True)
class Group:
    """Near-duplicate rows: ``rows[0]``, the first in the file, and the rest in file order."""

    rows: np.ndarray
    """(n,) int64 row numbers, n >= 2."""
    similarities: np.ndarray
    """(n,) float32: each row's cosine similarity to ``rows[0]`` (1 for itself)."""


class DuplicateSearch:
    """The groups of rows of ``vectors`` linked by similarities of ``threshold`` or more,
    biggest first (ties: by first row)."""

    def __init__(
        self,
        vectors: Vectors,
        threshold: float,
        search: str = "auto",
        seed: int = 0,
        on_step: OnStep = ignore,
    ) -> None:
        require_vectors(vectors, "DuplicateSearch")
        check_threshold(threshold)
        self.vectors = vectors
        self.threshold = threshold
        self.on_step = on_step
        count = len(vectors)
        self.index = Index.build(
            vectors.rows, count, search=search, seed=seed, on_step=on_step, threshold=threshold
        )
        self.pairs = 0
        """Pairs found (each once, a row with itself not counted)."""

    def groups(self) -> list[Group]:
        rows = self.vectors.rows
        count = len(rows)
        parent = np.arange(count, dtype=np.int64)
        start, batch = 0, FIRST_BATCH
        while start < count:
            queries = np.arange(start, min(count, start + batch))
            limits, found, _ = self.index.within(rows[queries], self.threshold)
            owners = np.repeat(queries, np.diff(limits))
            linked = owners < found  # each pair once, and never a row with itself
            self.pairs += int(np.count_nonzero(linked))
            union(parent, owners[linked], found[linked])
            start += len(queries)
            per_query = max(1.0, len(found) / len(queries))
            batch = int(min(LARGEST_BATCH, max(1, PAIRS_PER_BATCH / per_query)))
            self.on_step(Step("searching", start, count))
        roots = flatten(parent)
        return self._grouped(roots)

    def _grouped(self, roots: np.ndarray) -> list[Group]:
        rows = self.vectors.rows
        order = np.argsort(roots, kind="stable")  # by root, then by row
        sorted_roots = roots[order]
        starts = np.flatnonzero(np.r_[True, sorted_roots[1:] != sorted_roots[:-1]])
        sizes = np.diff(np.r_[starts, len(order)])
        groups = []
        for begin, size in zip(starts, sizes, strict=True):
            if size < 2:
                continue
            members = order[begin : begin + size]
            similarities = rows[members] @ rows[members[0]]
            similarities[0] = 1  # itself, exactly (every row has unit length)
            groups.append(Group(members, similarities))
        groups.sort(key=lambda group: (-len(group.rows), int(group.rows[0])))
        return groups


def check_threshold(threshold: float) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise OptionError(
            f"--threshold {threshold:g}: a cosine similarity is between -1 and 1; "
            "near-duplicates are about 0.9 and above"
        )


def union(parent: np.ndarray, first: np.ndarray, second: np.ndarray) -> None:
    """Join the sets of ``first[i]`` and ``second[i]`` for every i, in ``parent``, a forest
    in which every row points to a smaller one or to itself (a root): each round hooks
    the larger root of every pair still apart under the smaller."""
    touched = np.unique(np.concatenate([first, second]))
    while len(first):
        a, b = find(parent, first), find(parent, second)
        apart = a != b
        if not apart.any():
            break
        a, b = a[apart], b[apart]
        np.minimum.at(parent, np.maximum(a, b), np.minimum(a, b))
        first, second = first[apart], second[apart]
    parent[touched] = find(parent, touched)  # short paths for the next batch


def find(parent: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The root of each of ``rows``."""
    roots = parent[rows]
    while True:
        above = parent[roots]
        if np.array_equal(above, roots):
            return roots
        roots = above


def flatten(parent: np.ndarray) -> np.ndarray:
    """Every row's root."""
    roots = parent
    while True:
        above = roots[roots]
        if np.array_equal(above, roots):
            return roots
        roots = above
