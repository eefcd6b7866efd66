"""The k nearest other rows of every row, or of the rows asked about."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vggfeat.errors import OptionError
from vggfeat.search.index import Index
from vggfeat.search.progress import OnStep, Step, ignore
from vggfeat.search.vectors import Vectors, require_vectors
from vggfeat.store.identity import Identity, home_of
from vggfeat.text import tsv_unescape

#: Queries searched at once, between progress events.
QUERY_BATCH = 2048


@dataclass(frozen=True)
class Neighbors:
    """One query's nearest other rows, most similar first."""

    query: int
    rows: np.ndarray
    """(k,) int64 row numbers."""
    similarities: np.ndarray
    """(k,) float32 cosine similarities."""


class NeighborSearch:
    """The ``k`` nearest other rows of each of ``queries`` (every row when None); iterate
    for ``Neighbors`` in the queries' order, each query searched once."""

    def __init__(
        self,
        vectors: Vectors,
        k: int,
        queries: Sequence[int] | None = None,
        search: str = "auto",
        seed: int = 0,
        on_step: OnStep = ignore,
    ) -> None:
        require_vectors(vectors, "NeighborSearch")
        if not isinstance(k, int) or isinstance(k, bool):
            raise TypeError(f"NeighborSearch: k={k!r}: give a whole number of neighbours")
        check_k(k, len(vectors), vectors.file, len(vectors.left_out))
        self.vectors = vectors
        self.k = k
        self.queries = np.arange(len(vectors)) if queries is None else np.asarray(queries)
        self.on_step = on_step
        self.index = Index.build(vectors.rows, len(self.queries), k, search, seed, on_step)

    def __iter__(self) -> Iterator[Neighbors]:
        rows = self.vectors.rows
        total = len(self.queries)
        for start in range(0, total, QUERY_BATCH):
            batch = self.queries[start : start + QUERY_BATCH]
            # One more than asked for: the query itself is among them, and is dropped.
            similarities, found = self.index.nearest(rows[batch], self.k + 1)
            for query, sims, ids in zip(batch, similarities, found, strict=True):
                keep = (ids != query) & (ids >= 0)
                yield Neighbors(int(query), ids[keep][: self.k], sims[keep][: self.k])
            self.on_step(Step("searching", min(total, start + QUERY_BATCH), total))


def check_k(k: int, rows: int, file: os.PathLike | str, left_out: int = 0) -> None:
    """Refuse a ``-k`` the file cannot answer: each of its ``rows`` (those that can be
    compared; ``left_out`` more cannot) has ``rows - 1`` others."""
    if k < 1:
        raise OptionError(f"-k {k}: give 1 or more")
    if k <= rows - 1:
        return
    held = f"{os.fspath(file)} holds {rows:,} row{'s' if rows != 1 else ''}"
    if left_out:
        held += f" to compare ({left_out:,} more {'has' if left_out == 1 else 'have'} no direction)"
    if rows == 1:
        raise OptionError(f"-k {k}: {held}: there is no other row to be its neighbour")
    raise OptionError(
        f"-k {k}: {held}, so each has at most {rows - 1:,} others; give -k {rows - 1:,} or less"
    )


def rows_of(vectors: Vectors, paths: Sequence[str]) -> list[int]:
    """The row of each of ``paths``, each once: as the file stores it, as the tsv output
    writes it (escaped), or an image's path however spelt (from here, through links);
    ``OptionError`` naming any not in the file."""
    row_of = {path: row for row, path in enumerate(vectors.paths)}
    identity = Identity(home_of(vectors.file))
    found: dict[int, None] = {}
    missing = []
    for path in paths:
        spellings = (path, tsv_unescape(path), identity.key(path))
        row = next((row_of[s] for s in spellings if s in row_of), None)
        if row is None:
            missing.append(path)
        else:
            found[row] = None
    if missing:
        left = set(vectors.left_out)
        spellings = (missing[0], tsv_unescape(missing[0]), identity.key(missing[0]))
        reason = " (it is left out: it has no direction)" if left.intersection(spellings) else ""
        raise OptionError(
            f"--of {missing[0]}: not a row of {vectors.file}{reason}"
            + (f", nor are {len(missing) - 1:,} more" if len(missing) > 1 else "")
            + "; 'vggfeat export FILE --format tsv --no-header | cut -f1' lists its paths"
        )
    return list(found)
