"""Write stage: one unit's rows -> one Parquet file, committed atomically, then its failures, then its marker.

Commit protocol (README "What happens"): temp file in ``.state/tmp`` -> fsync -> rename into ``data/`` -> failure log ->
done marker with counts, written last. A visible ``.parquet`` is therefore always whole, and a unit without a
marker is redone on resume (its stray shard is removed first). On an object store the same steps are
upload-then-marker: the temp file is in a local scratch folder and "rename" is one upload of the whole object.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.layout import FILE_MODE, OutputLayout
from pipeline.metadata import FLOAT_FIELDS, LIST_FIELDS, STRING_FIELDS, row_metadata
from pipeline.stores import json_bytes
from pipeline.types import EncodedSegment, Failure

log = logging.getLogger(__name__)



# Bumped whenever the columns change (2: ``scales``); part of the fingerprint, so a folder is never resumed into
# shards of two schemas.
ROW_SCHEMA_VERSION = 2


def row_schema(num_codebooks: int) -> pa.Schema:
    """The output row schema (see README "Output schema")."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("segment_index", pa.int32()),
        pa.field("start_s", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("n_samples", pa.int64()),
        pa.field("n_frames", pa.int32()),
        # [K][T]: list of K codebooks, each a list of T codes.
        pa.field("codes", pa.list_(pa.list_(pa.int16())), metadata={"num_codebooks": str(num_codebooks)}),
        # Per-chunk loudness scales of a normalising codec (EnCodec 48 kHz), needed to decode at the original
        # level; null for the other codecs. Always present, so every output has one schema whatever the codec.
        pa.field("scales", pa.list_(pa.float32())),
        pa.field("sample_rate", pa.int32()),
        pa.field("source_sample_rate", pa.int32()),
        pa.field("source_channels", pa.int16()),
    ]
    fields += [pa.field(name, pa.string()) for name in STRING_FIELDS]
    fields += [pa.field(name, pa.float64()) for name in FLOAT_FIELDS]
    fields += [pa.field(name, pa.list_(pa.string())) for name in LIST_FIELDS]
    fields.append(pa.field("metadata", pa.string()))
    return pa.schema(fields)


@dataclass
class UnitCounts:
    """Per-unit accounting, written in the done marker and merged by finalize.

    ``ok + failed + skipped == items`` always holds for a committed unit.
    """

    items: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    rows: int = 0
    frames: int = 0
    audio_s: float = 0.0  # decoded duration of the ok items
    encoded_s: float = 0.0  # duration covered by rows
    dropped_s: float = 0.0  # tails and over-long clip ends dropped by the segment policy
    failures_by_reason: dict[str, int] = field(default_factory=dict)

    def add_failure(self, failure: Failure) -> None:
        if failure.stage == "policy":
            self.skipped += 1
        else:
            self.failed += 1
        key = f"{failure.stage}:{failure.reason}"
        self.failures_by_reason[key] = self.failures_by_reason.get(key, 0) + 1


class UnitWriter:
    """Owns shard naming and the commit of a unit (the only code that writes into ``data/``)."""

    def __init__(self, layout: OutputLayout, n_units: int, num_codebooks: int, file_metadata: dict[str, str],
                 compression: str = "zstd", compression_level: int = 9, rename: dict[str, str] | None = None):
        self.layout, self.n_units = layout, n_units
        self.rename = dict(rename or {})  # metadata field -> row field (``dataset.rename``)
        self.schema = row_schema(num_codebooks).with_metadata({k.encode(): v.encode() for k, v in file_metadata.items()})
        self.compression, self.compression_level = compression, compression_level
        # pa.array imports pandas on its first call (to check for pandas objects): ~0.5 s holding the GIL, which
        # in the writer thread stalled the loop's first commit (profiled). Pay it here, before the loop.
        self.rows_table([])

    def commit(self, unit: int, rows: list[EncodedSegment], failures: list[Failure], counts: UnitCounts,
               marker_extra: dict[str, Any], still_mine: Callable[[], bool] = lambda: True) -> bool:
        """Write the unit's rows (in item, segment order), failure log and marker; see ``commit_table``."""
        return self.commit_table(unit, self.rows_table(rows), failures, counts, marker_extra, still_mine)

    def commit_table(self, unit: int, table: pa.Table, failures: list[Failure], counts: UnitCounts,
                     marker_extra: dict[str, Any], still_mine: Callable[[], bool] = lambda: True) -> bool:
        """The commit protocol for a ready table: shard, then failure log, then the marker, last.

        ``still_mine`` (the unit's claim, ``Claims.confirm``) is asked once the shard is staged, right before it is
        published, and again before the marker; False stops the commit there (returns False): another run owns the
        unit now, and what this one published before it lost the claim is overwritten by that run's commit. The
        marker is created only if absent.
        """
        if not self._write_shard(unit, table, still_mine):
            return False
        fault_point("after_rename")
        self._write_failures(unit, failures)
        if not still_mine():
            log.warning("lost the claim of unit %d after publishing its shard: the new owner's commit replaces it",
                        unit)
            return False
        marker = {"unit": unit, "counts": asdict(counts), **marker_extra}
        if not self.layout.store.create_atomic(self.layout.marker(unit), json_bytes(marker), self.layout.tmp):
            log.warning("unit %d was committed by another run while this one published it; its shard and failure "
                        "log may now be this run's: check the folder with python -m pipeline.verify", unit)
            return False
        return True

    def rows_table(self, rows: list[EncodedSegment]) -> pa.Table:
        """Rows -> a table of the shard schema, sorted by (item index, segment index)."""
        rows = sorted(rows, key=lambda r: (r.item.index, r.segment_index))
        columns: dict[str, Any] = {name: [] for name in self.schema.names}
        for r in rows:
            for name, value in _row(r, self.rename).items():
                columns[name].append(value)
        columns["codes"] = codes_array([r.codes for r in rows])
        columns["scales"] = pa.array([r.scales for r in rows], pa.list_(pa.float32()))
        return pa.Table.from_pydict(columns, schema=self.schema)

    def _write_shard(self, unit: int, table: pa.Table, still_mine: Callable[[], bool]) -> bool:
        final = self.layout.shard(unit, self.n_units)
        fd, tmp = tempfile.mkstemp(dir=self.layout.tmp, prefix=f"unit-{unit:05d}.", suffix=".parquet")
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        try:
            # Dictionary encoding packs 2048-entry codes into 11-bit indices before zstd.
            options = dict(compression=self.compression, compression_level=self.compression_level,
                           use_dictionary=True)
            if table.num_rows:
                pq.write_table(table, tmp, row_group_size=4096, **options)
            else:
                # A unit whose every item failed: no row group at all. write_table would write one of 0 rows, and
                # `datasets` takes a row group's length as its batch size ("BatchSize must be greater than 0").
                pq.ParquetWriter(tmp, table.schema, **options).close()
            fault_point("before_rename")
            if not still_mine():
                Path(tmp).unlink(missing_ok=True)
                return False
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.layout.store.publish(Path(tmp), final)  # fsync + rename, or one upload; consumes tmp either way
        return True

    def _write_failures(self, unit: int, failures: list[Failure]) -> None:
        path = self.layout.failure_log(unit)
        if not failures:
            self.layout.store.delete(path)  # a log left by an earlier attempt of this unit
            return
        lines = "".join(json.dumps(asdict(f), ensure_ascii=False) + "\n" for f in failures)
        self.layout.store.write_atomic(path, lines.encode(), self.layout.tmp)


_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Crash-test hook: ``PIPELINE_FAULT=after_rename:2`` SIGKILLs this process the 2nd time it gets here.

    The crash tests use it to kill at the exact moments that matter (temp written, shard renamed without marker);
    unset, it costs one dict lookup per unit.
    """
    spec = os.environ.get("PIPELINE_FAULT")
    if not spec or not spec.startswith(name):
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] >= int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _row(r: EncodedSegment, rename: dict[str, str] | None = None) -> dict[str, Any]:
    """One output row; its metadata columns come from ``pipeline.metadata``, which the decode workers already ran
    on the item, so a value no column holds failed that item there, never this thread."""
    row: dict[str, Any] = {
        "id": r.item.id,
        "source": r.item.source,
        "segment_index": r.segment_index,
        "start_s": r.start_s,
        "duration_s": r.duration_s,
        "n_samples": r.n_samples,
        "n_frames": r.n_frames,
        "sample_rate": r.sample_rate,
        "source_sample_rate": r.source_sample_rate,
        "source_channels": r.source_channels,
    }
    row.update(row_metadata(r.item.metadata, rename))
    return row


def codes_array(codes: list[np.ndarray]) -> pa.Array:
    """``[K, T]`` int16 arrays -> one ``list<list<int16>>`` Arrow array, built from flat buffers (no Python loop
    over codes)."""
    values = pa.array(np.concatenate([c.reshape(-1) for c in codes]) if codes else np.zeros(0, np.int16))
    inner_lengths = np.concatenate([np.full(c.shape[0], c.shape[1]) for c in codes]) if codes else np.zeros(0)
    inner_offsets = np.concatenate([[0], np.cumsum(inner_lengths)]).astype(np.int32)
    outer_offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in codes])]).astype(np.int32)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), values)
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)


def codes_from_column(cell: Any) -> np.ndarray:
    """A ``codes`` cell (list of lists, or an Arrow scalar) -> int16 ``[K, T]``."""
    if hasattr(cell, "as_py"):
        cell = cell.as_py()
    return np.asarray(cell, dtype=np.int16)
