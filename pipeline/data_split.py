"""Who reads what: the rows of an output folder split across DDP ranks x DataLoader workers ("consumers").

Each consumer computes the whole assignment from the Parquet footers alone (no communication), so every
consumer agrees on it, and it depends only on (files, seed, epoch, number of consumers). Three granularities:

- ``file``: whole shards. Each consumer opens only its own files. Chosen by ``auto`` when there are at least as
  many shards as consumers (the usual case: one shard per unit of 64 items).
- ``row_group``: Parquet row groups (the writer makes one per 4096 rows), for few large shards.
- ``row``: single rows, for a small folder with fewer row groups than consumers; every consumer then reads the
  row groups it has rows in, and keeps only its rows.

Units are dealt in shuffled order to the least-loaded consumer, so consumer row counts differ by at most one
unit's rows. With ``even_ranks`` every rank then stops at the smallest rank's count, so DDP ranks take the same
number of steps (a rank with more batches would wait forever in its extra all-reduce); what is cut is a few rows
per epoch, different ones each epoch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

SPLITS = ("auto", "file", "row_group", "row")


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group: the smallest thing a consumer reads."""

    file: int
    index: int
    rows: int


@dataclass(frozen=True)
class Piece:
    """Part of one row group that one consumer reads; ``rows`` None means all of it."""

    group: RowGroup
    rows: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return self.group.rows if self.rows is None else len(self.rows)


def resolve_split(split: str, n_files: int, n_groups: int, n_consumers: int) -> str:
    """``auto`` -> the coarsest granularity that gives every consumer something to read.

    >>> resolve_split("auto", 128, 128, 16), resolve_split("auto", 4, 40, 16), resolve_split("auto", 3, 3, 4)
    ('file', 'row_group', 'row')
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split != "auto":
        return split
    if n_files >= n_consumers:
        return "file"
    return "row_group" if n_groups >= n_consumers else "row"


def assign(groups: list[RowGroup], n_consumers: int, split: str, rng: np.random.Generator | None) -> list[list[Piece]]:
    """Pieces of every consumer, in reading order.

    Args:
        groups: all row groups, in file order.
        split: ``file``, ``row_group`` or ``row`` (already resolved).
        rng: shuffles the units (and rows, for ``row``); None keeps file order.

    >>> g = [RowGroup(0, 0, 5), RowGroup(1, 0, 3), RowGroup(2, 0, 3)]
    >>> [[p.group.file for p in c] for c in assign(g, 2, "file", None)]
    [[0], [1, 2]]
    >>> [sum(p.n_rows for p in c) for c in assign(g, 4, "row", None)]
    [3, 3, 3, 2]
    """
    if split == "row":
        return _assign_rows(groups, n_consumers, rng)
    units: list[list[RowGroup]] = _by_file(groups) if split == "file" else [[g] for g in groups]
    order = rng.permutation(len(units)) if rng is not None else np.arange(len(units))
    out: list[list[Piece]] = [[] for _ in range(n_consumers)]
    load = [(0, c) for c in range(n_consumers)]  # (rows, consumer): least loaded first, ties to the lowest id
    for u in order:
        rows, c = heapq.heappop(load)
        out[c] += [Piece(g) for g in units[u]]
        heapq.heappush(load, (rows + sum(g.rows for g in units[u]), c))
    return out


def _by_file(groups: list[RowGroup]) -> list[list[RowGroup]]:
    files: dict[int, list[RowGroup]] = {}
    for g in groups:
        files.setdefault(g.file, []).append(g)
    return list(files.values())


def _assign_rows(groups: list[RowGroup], n_consumers: int, rng: np.random.Generator | None) -> list[list[Piece]]:
    """Row ``i`` of the (shuffled) global order goes to consumer ``i % n``; rows are then grouped per row group
    so each group is read once per consumer."""
    starts = np.cumsum([0] + [g.rows for g in groups])
    order = rng.permutation(starts[-1]) if rng is not None else np.arange(starts[-1])
    out = []
    for c in range(n_consumers):
        mine = order[c::n_consumers]
        group_of = np.searchsorted(starts, mine, side="right") - 1
        pieces = [Piece(groups[g], np.sort(mine[group_of == g]) - starts[g]) for g in np.unique(group_of)]
        out.append(pieces)
    return out


def budgets(pieces: list[list[Piece]], world_size: int, even_ranks: bool) -> list[int | None]:
    """Rows each consumer may yield: None (all of its pieces), or with ``even_ranks`` its share of the smallest
    rank's total. Consumer ``c`` belongs to rank ``c // workers``.

    >>> p = lambda n: [Piece(RowGroup(0, 0, n))]
    >>> budgets([p(5), p(1), p(2), p(2)], world_size=2, even_ranks=True)  # rank 0: 6 rows, rank 1: 4
    [4, 0, 2, 2]
    """
    if not even_ranks or world_size == 1:
        return [None] * len(pieces)
    workers = len(pieces) // world_size
    counts = [sum(p.n_rows for p in c) for c in pieces]
    target = min(sum(counts[r * workers : (r + 1) * workers]) for r in range(world_size))
    out: list[int | None] = []
    for r in range(world_size):
        left = target
        for count in counts[r * workers : (r + 1) * workers]:
            out.append(min(count, left))
            left -= out[-1]
    return out
