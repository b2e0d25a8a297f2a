"""Who reads what: the rows of an output folder split across DDP ranks x DataLoader workers ("consumers").

Each consumer computes the whole assignment from the Parquet footers alone (no communication), so every
consumer agrees on it, and it depends only on (files, seed, epoch, number of consumers). Three granularities:

- ``file``: whole shards. Each consumer opens only its own files. Chosen by ``auto`` when there are at least as
  many shards as consumers (the usual case: one shard per unit of 64 items).
- ``row_group``: Parquet row groups (the writer makes one per 4096 rows), for few large shards.
- ``row``: single rows, for a small folder with fewer row groups than consumers; every consumer then reads the
  row groups it has rows in, and keeps only its rows.

Units are dealt in shuffled order to the least-loaded rank, then within each rank to its least-loaded worker,
so rank row counts differ by at most one unit's rows. (Dealing straight to consumers balanced the consumers, but
ties went to the lowest ids, i.e. to the first ranks: 10 equal shards on 2 ranks x 2 workers gave the ranks 72
and 48 rows, and 1000 shards on 64 x 8 consumers up to twice the rows of the smallest rank.) With ``even_ranks``
every rank then stops at the smallest rank's count, so DDP ranks see the same number of rows; what is cut is
under one unit per rank, different rows each epoch. Equal rows are not equal batches when each DataLoader worker
batches its own rows: ``steps`` gives the number of batches every rank can take.
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


def assign(groups: list[RowGroup], n_consumers: int, split: str, rng: np.random.Generator | None,
           world_size: int = 1) -> list[list[Piece]]:
    """Pieces of every consumer (``rank * workers + worker``), in reading order.

    Args:
        groups: all row groups, in file order.
        n_consumers: ranks x workers per rank.
        split: ``file``, ``row_group`` or ``row`` (already resolved).
        rng: shuffles the units (and rows, for ``row``); None keeps file order.
        world_size: ranks; units are balanced across ranks first, then across each rank's workers.

    >>> g = [RowGroup(0, 0, 5), RowGroup(1, 0, 3), RowGroup(2, 0, 3)]
    >>> [[p.group.file for p in c] for c in assign(g, 2, "file", None)]
    [[0], [1, 2]]
    >>> [sum(p.n_rows for p in c) for c in assign(g, 4, "row", None)]
    [3, 3, 3, 2]
    >>> eq = [RowGroup(f, 0, 12) for f in range(10)]  # 2 ranks x 2 workers: 60 rows per rank
    >>> [sum(p.n_rows for p in c) for c in assign(eq, 4, "file", None, world_size=2)]
    [36, 24, 36, 24]
    """
    if split == "row":
        return _assign_rows(groups, n_consumers, rng)
    units: list[list[RowGroup]] = _by_file(groups) if split == "file" else [[g] for g in groups]
    order = rng.permutation(len(units)) if rng is not None else np.arange(len(units))
    workers = n_consumers // world_size
    rows = [sum(g.rows for g in unit) for unit in units]
    rank_of = _deal([rows[u] for u in order], world_size)
    out: list[list[Piece]] = [[] for _ in range(n_consumers)]
    for r in range(world_size):
        mine = [u for u, owner in zip(order, rank_of) if owner == r]
        for u, w in zip(mine, _deal([rows[u] for u in mine], workers)):
            out[r * workers + w] += [Piece(g) for g in units[u]]
    return out


def _deal(sizes: list[int], n: int) -> list[int]:
    """Each item, in order, to the least-loaded of ``n`` bins (ties to the lowest): the bin of every item."""
    load = [(0, b) for b in range(n)]
    out = []
    for size in sizes:
        rows, b = heapq.heappop(load)
        out.append(b)
        heapq.heappush(load, (rows + size, b))
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


def steps(counts: list[int], world_size: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches every rank can take when each DataLoader worker batches its own rows (``counts``: rows per consumer,
    ``rank * workers + worker``): the fewest over the ranks. Ranks with equal rows can still differ by a batch
    (each worker's last one is partial), and DDP hangs on the rank that takes one more.

    >>> steps([13, 12, 12, 13], world_size=2, batch_size=4)  # rank 0: 4 + 3 batches, rank 1: 3 + 4
    7
    >>> steps([13, 12, 16, 9], world_size=2, batch_size=4)  # rank 0: 4 + 3, rank 1: 4 + 3
    7
    >>> steps([5, 5, 9, 1], world_size=2, batch_size=4)  # rank 0: 2 + 2, rank 1: 3 + 1
    4
    """
    workers = len(counts) // world_size
    per = (lambda n: n // batch_size) if drop_last else (lambda n: -(-n // batch_size))
    return min(sum(per(n) for n in counts[r * workers : (r + 1) * workers]) for r in range(world_size))


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
