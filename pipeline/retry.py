"""``output.retry_failed=true``: give the items that failed another chance, and keep every other row as it is.

Reopening a done unit (rank 0, in ``prepare``, before any rank claims units):

1. hard-link (object store: server-side copy) its shard into ``.state/retry/unit-NNNNN/kept.parquet``, then
   write ``retry.json`` beside it (the unit's counts and failure records), atomically and last: a stash without
   ``retry.json`` is incomplete;
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
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import PurePath

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.layout import OutputLayout
from pipeline.stores import json_bytes
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


def stash_dir(layout: OutputLayout, unit: int) -> PurePath:
    return layout.state / "retry" / f"unit-{unit:05d}"


def is_retryable(failure: Failure) -> bool:
    """Everything but a policy skip: decode/read errors, crashes, timeouts and encode errors."""
    return failure.stage != "policy"


def drop_stale_stashes(layout: OutputLayout) -> None:
    """Remove stashes of units that have a marker: a retry that committed, or a reopen cut before step 2."""
    root = layout.state / "retry"
    done = layout.done_units()
    for name in sorted(layout.store.list_names(root)):
        match = _UNIT_DIR.match(name)
        if match and int(match.group(1)) in done:
            layout.store.delete_tree(root / name)


def reopen_failed_units(layout: OutputLayout, n_units: int) -> list[int]:
    """Stash and reopen every done unit with a retryable failure; returns the reopened units."""
    reopened = []
    for unit in sorted(layout.done_units()):
        failures = read_failures(layout, layout.failure_log(unit))
        n_retry = sum(map(is_retryable, failures))
        if not n_retry:
            continue
        _stash(layout, unit, n_units, failures)
        layout.store.delete(layout.marker(unit))
        log.info("retry_failed: unit %d reopened for %d failed item(s)", unit, n_retry)
        reopened.append(unit)
    return reopened


def read_failures(layout: OutputLayout, path: PurePath) -> list[Failure]:
    if not layout.store.exists(path):
        return []
    text = layout.store.read_bytes(path).decode("utf-8")
    return [Failure(**json.loads(line)) for line in text.splitlines() if line.strip()]


def _stash(layout: OutputLayout, unit: int, n_units: int, failures: list[Failure]) -> None:
    folder = stash_dir(layout, unit)
    layout.store.delete_tree(folder)  # an incomplete stash of an earlier, interrupted reopen
    layout.store.makedirs(folder)
    # A copy that survives the clean-up's removal of the shard (locally a hard link, which costs nothing).
    layout.store.copy(layout.shard(unit, n_units), folder / "kept.parquet")
    counts = layout.read_marker(unit)["counts"]
    state = {"unit": unit, "counts": counts, "failures": [asdict(f) for f in failures]}
    layout.store.write_atomic(folder / "retry.json", json_bytes(state), layout.tmp)


def load_kept(layout: OutputLayout, unit: int, items: list[AudioItem]) -> KeptUnit | None:
    """The stash of a reopened unit, or None when the unit is not being retried."""
    folder = stash_dir(layout, unit)
    if not layout.store.exists(folder / "retry.json"):
        return None
    state = json.loads(layout.store.read_bytes(folder / "retry.json"))
    failures = [Failure(**f) for f in state["failures"]]
    retried = [f for f in failures if is_retryable(f)]
    order = {it.id: it.index for it in items}
    unknown = [f.item_id for f in failures if f.item_id not in order]
    if unknown:
        where = layout.store.url(folder)
        raise ValueError(f"retry stash {where} names items that are not in unit {unit}: {unknown[:3]}; "
                         f"delete {where} and rerun with output.retry_failed=true")
    kept = pq.read_table(str(folder / "kept.parquet"), filesystem=layout.store.arrow_filesystem())
    return KeptUnit(kept, _less(UnitCounts(**state["counts"]), retried),
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
                  failures: list[Failure], counts: UnitCounts, marker_extra: dict,
                  still_mine: Callable[[], bool] = lambda: True) -> bool:
    """``UnitWriter.commit`` for a reopened unit: kept rows + new rows, in row order, through the same commit
    protocol; then the stash goes. False when the unit's claim was lost (``UnitWriter.commit_table``)."""
    table = _in_row_order(pa.concat_tables([kept.table.cast(writer.schema), writer.rows_table(rows)]), kept.order)
    total = merged_counts(kept.counts, counts)
    failures = sorted(kept.failures + failures, key=lambda f: kept.order[f.item_id])
    if not writer.commit_table(unit, table, failures, total, marker_extra, still_mine):
        return False
    writer.layout.store.delete_tree(stash_dir(writer.layout, unit))
    return True


def _in_row_order(table: pa.Table, order: dict[str, int]) -> pa.Table:
    """Sort rows by (item index, segment index), the order ``UnitWriter.commit`` writes."""
    ids, segments = table["id"].to_pylist(), table["segment_index"].to_pylist()
    rank = sorted(range(table.num_rows), key=lambda i: (order[ids[i]], segments[i]))
    return table.take(pa.array(rank, type=pa.int64()))  # typed: an empty list would be a null array
