"""``output.retry_failed=true``: give the items that failed another chance, and keep every other row as it is.

Reopening a done unit (rank 0, in ``prepare``, before any rank claims units):

1. hard-link its shard into ``.state/retry/unit-NNNNN/kept.parquet``, then write ``retry.json`` beside it (the
   unit's counts and failure records), atomically and last: a stash without ``retry.json`` is incomplete;
2. remove the unit's done marker. The unit is open again; the usual clean-up removes its shard and failure log.

Running it (whichever rank claims it): only the retried items are decoded and encoded. The kept rows are copied
from the stash as Arrow data (not re-encoded, not round-tripped through Python objects), merged with the new
rows in (item, segment) order and committed with the writer's protocol; the stash goes after the marker.

A crash anywhere leaves either the old marker (the stash is stale; ``drop_stale_stashes`` removes it) or no marker
and a complete stash (the next run, with or without ``retry_failed``, finishes the retry from the stash).

Not retried: items skipped by policy (stage ``policy``, e.g. shorter than ``segment.min_s``). They are not errors,
and with the same file and config they would be skipped the same way; ``output.mode=overwrite`` redoes everything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.layout import OutputLayout, atomic_write_json
from pipeline.types import AudioItem, EncodedSegment, Failure
from pipeline.writer import UnitCounts, UnitWriter

log = logging.getLogger(__name__)
_UNIT_DIR = re.compile(r"^unit-(\d{5})$")
_SUMS = tuple(f.name for f in fields(UnitCounts) if f.name != "failures_by_reason")


@dataclass
class KeptUnit:
    """What a reopened unit keeps from its last commit.

    Args:
        table: rows of the items that stay as they are, exactly as they were written.
        counts: their accounting (the unit's old counts less the retried items).
        failures: records that stay (policy skips).
        retry_ids: ids of the items to decode again.
        order: id -> plan index for every item of the unit (rows and records are written in this order).
    """

    table: pa.Table
    counts: UnitCounts
    failures: list[Failure]
    retry_ids: set[str]
    order: dict[str, int]


def stash_dir(layout: OutputLayout, unit: int) -> Path:
    return layout.state / "retry" / f"unit-{unit:05d}"


def is_retryable(failure: Failure) -> bool:
    """Everything but a policy skip: decode/read errors, crashes, timeouts and encode errors."""
    return failure.stage != "policy"


def drop_stale_stashes(layout: OutputLayout) -> None:
    """Remove stashes of units that have a marker: a retry that committed, or a reopen cut before step 2."""
    root = layout.state / "retry"
    done = layout.done_units()
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        match = _UNIT_DIR.match(path.name)
        if match and int(match.group(1)) in done:
            shutil.rmtree(path, ignore_errors=True)


def reopen_failed_units(layout: OutputLayout, n_units: int) -> list[int]:
    """Stash and reopen every done unit with a retryable failure; returns the reopened units."""
    reopened = []
    for unit in sorted(layout.done_units()):
        failures = read_failures(layout.failure_log(unit))
        n_retry = sum(map(is_retryable, failures))
        if not n_retry:
            continue
        _stash(layout, unit, n_units, failures)
        layout.marker(unit).unlink()
        log.info("retry_failed: unit %d reopened for %d failed item(s)", unit, n_retry)
        reopened.append(unit)
    return reopened


def read_failures(path: Path) -> list[Failure]:
    if not path.exists():
        return []
    return [Failure(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _stash(layout: OutputLayout, unit: int, n_units: int, failures: list[Failure]) -> None:
    folder = stash_dir(layout, unit)
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete stash of an earlier, interrupted reopen
    folder.mkdir(parents=True)
    _link_or_copy(layout.shard(unit, n_units), folder / "kept.parquet")
    counts = json.loads(layout.marker(unit).read_text())["counts"]
    state = {"unit": unit, "counts": counts, "failures": [asdict(f) for f in failures]}
    atomic_write_json(folder / "retry.json", state, layout.tmp)


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs nothing and survives the clean-up's unlink of the shard; some filesystems refuse links.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def load_kept(layout: OutputLayout, unit: int, items: list[AudioItem]) -> KeptUnit | None:
    """The stash of a reopened unit, or None when the unit is not being retried."""
    folder = stash_dir(layout, unit)
    if not (folder / "retry.json").exists():
        return None
    state = json.loads((folder / "retry.json").read_text())
    failures = [Failure(**f) for f in state["failures"]]
    retried = [f for f in failures if is_retryable(f)]
    order = {it.id: it.index for it in items}
    unknown = [f.item_id for f in failures if f.item_id not in order]
    if unknown:
        raise ValueError(f"retry stash {folder} names items that are not in unit {unit}: {unknown[:3]}; "
                         f"delete {folder} and rerun with output.retry_failed=true")
    return KeptUnit(pq.read_table(folder / "kept.parquet"), _less(UnitCounts(**state["counts"]), retried),
                    [f for f in failures if not is_retryable(f)], {f.item_id for f in retried}, order)


def _less(counts: UnitCounts, retried: list[Failure]) -> UnitCounts:
    """The old counts without the retried items. A failed item adds to nothing but ``failed`` and its reason
    (runner ``counts_and_failures``), so that is all there is to take away."""
    counts.items -= len(retried)
    counts.failed -= len(retried)
    for f in retried:
        key = f"{f.stage}:{f.reason}"
        counts.failures_by_reason[key] -= 1
        if not counts.failures_by_reason[key]:
            del counts.failures_by_reason[key]
    return counts


def merged_counts(a: UnitCounts, b: UnitCounts) -> UnitCounts:
    out = UnitCounts(**{name: getattr(a, name) + getattr(b, name) for name in _SUMS})
    reasons = dict(a.failures_by_reason)
    for key, n in b.failures_by_reason.items():
        reasons[key] = reasons.get(key, 0) + n
    out.failures_by_reason = dict(sorted(reasons.items()))
    return out


def commit_merged(writer: UnitWriter, unit: int, kept: KeptUnit, rows: list[EncodedSegment],
                  failures: list[Failure], counts: UnitCounts, marker_extra: dict) -> UnitCounts:
    """``UnitWriter.commit`` for a reopened unit: kept rows + new rows, in row order, through the same commit
    protocol; then the stash goes. Returns the unit's merged counts."""
    table = _in_row_order(pa.concat_tables([kept.table.cast(writer.schema), writer.rows_table(rows)]), kept.order)
    total = merged_counts(kept.counts, counts)
    failures = sorted(kept.failures + failures, key=lambda f: kept.order[f.item_id])
    writer.commit_table(unit, table, failures, total, marker_extra)
    shutil.rmtree(stash_dir(writer.layout, unit), ignore_errors=True)
    return total


def _in_row_order(table: pa.Table, order: dict[str, int]) -> pa.Table:
    """Sort rows by (item index, segment index), the order ``UnitWriter.commit`` writes."""
    ids, segments = table["id"].to_pylist(), table["segment_index"].to_pylist()
    rank = sorted(range(table.num_rows), key=lambda i: (order[ids[i]], segments[i]))
    return table.take(pa.array(rank, type=pa.int64()))  # typed: an empty list would be a null array
