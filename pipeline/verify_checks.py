"""Structural checks of an output folder, for ``pipeline.verify``: is it complete and self-consistent?

Everything here reads the Parquet footers and streams the shards column by column (a record batch at a time), so
memory stays bounded by one batch plus one ``(id, segment_index)`` key per row and one float per row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.finalize import CodecInfo
from pipeline.layout import OutputLayout
from pipeline.plan import Plan, PlanMismatch, load_items, load_plan
from pipeline.retry import read_failures

FINGERPRINT_KEY = b"pipeline.fingerprint"
CODEC_KEY = b"pipeline.codec"
# Columns the row checks need; everything else is only compared through the schema.
_CHECK_COLUMNS = ["id", "segment_index", "n_samples", "n_frames", "duration_s", "sample_rate", "codes"]
# A problem that hits many rows is reported once, with this many example rows.
_EXAMPLES = 3


@dataclass
class Problem:
    """One failed check: ``check`` is a stable label (tests and scripts match on it), ``message`` says what, where."""

    check: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.message}"




@dataclass
class ShardRef:
    """A shard that exists, with its unit and row count (from the footer).

    Args:
        filesystem: pyarrow's ``filesystem=`` for ``path`` (None: a local path).
    """

    unit: int
    path: PurePath
    rows: int
    filesystem: Any = None

    def schema(self) -> pa.Schema:
        return pq.read_schema(str(self.path), filesystem=self.filesystem)

    def open(self) -> pq.ParquetFile:
        return pq.ParquetFile(str(self.path), filesystem=self.filesystem)


@dataclass
class Scan:
    """Everything the structural pass learned: problems, and the statistics the report plots.

    Args:
        usage: code counts ``[K, cardinality]`` over every row (codes outside the range are not counted).
        durations: ``duration_s`` of every row, in shard order.
    """

    plan: Plan | None = None
    codec: CodecInfo | None = None
    shards: list[ShardRef] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    usage: np.ndarray | None = None
    durations: list[np.ndarray] = field(default_factory=list)
    rows: int = 0
    frames: int = 0
    ids_by_unit: dict[int, set[str]] = field(default_factory=dict)  # item ids with rows, per unit

    def add(self, check: str, message: str) -> None:
        self.problems.append(Problem(check, message))


def scan_output(layout: OutputLayout) -> Scan:
    """Run every structural check on the output folder; never raises on bad data, only records it."""
    scan = Scan()
    scan.plan = load_plan(layout)
    if scan.plan is None:
        scan.add("plan", f"{layout.store.url(layout.plan)} is missing: not a pipeline output folder, or the job "
                         f"never started")
        return scan
    markers = _check_markers(layout, scan.plan, scan)
    scan.shards = _find_shards(layout, scan.plan, scan)
    scan.codec = _codec_facts(scan.shards, markers, scan)
    _check_schemas(scan.shards, scan.plan, scan)
    if scan.codec is not None:
        _check_rows(scan, markers)
        _check_items(layout, scan, markers)
    _check_finalized(layout, scan)
    return scan


def _check_markers(layout: OutputLayout, plan: Plan, scan: Scan) -> dict[int, dict[str, Any]]:
    """Every unit has a done marker, written by this plan, whose counts add up."""
    markers: dict[int, dict[str, Any]] = {}
    for unit in range(plan.n_units):
        path = layout.marker(unit)
        if not layout.store.exists(path):
            scan.add("marker", f"unit {unit} has no done marker ({layout.store.url(path)}); rerun the tokenize "
                               f"command to finish it")
            continue
        marker = markers[unit] = json.loads(layout.store.read_bytes(path))
        if marker.get("fingerprint") != plan.fingerprint:
            scan.add("fingerprint", f"unit {unit} marker has fingerprint {marker.get('fingerprint')}, "
                                    f"plan.json has {plan.fingerprint}")
        counts = marker.get("counts", {})
        expected = len(plan.unit_range(unit))
        if counts.get("items") != expected or counts.get("ok", 0) + counts.get("failed", 0) + counts.get(
                "skipped", 0) != expected:
            scan.add("counts", f"unit {unit} marker accounts for items={counts.get('items')} ok={counts.get('ok')} "
                               f"failed={counts.get('failed')} skipped={counts.get('skipped')}, the plan gives it "
                               f"{expected} items")
    return markers


def _find_shards(layout: OutputLayout, plan: Plan, scan: Scan) -> list[ShardRef]:
    """The shard of every unit; a missing shard, or a ``.parquet`` no unit owns, is a problem."""
    expected = {layout.shard(u, plan.n_units).name: u for u in range(plan.n_units)}
    present = {name for name in layout.store.list_names(layout.data) if name.endswith(".parquet")}
    for name in sorted(present - set(expected)):
        # load_dataset reads data/*.parquet, so a stray file would become training data.
        scan.add("stray_shard", f"data/{name} belongs to no unit of the plan ({plan.n_units} units); "
                                "it would be read as training data")
    shards, filesystem = [], layout.store.arrow_filesystem()
    for name, unit in expected.items():
        if name not in present:
            if layout.store.exists(layout.marker(unit)):
                scan.add("missing_shard", f"unit {unit} is marked done but data/{name} is missing")
            continue
        ref = ShardRef(unit, layout.data / name, 0, filesystem)
        ref.rows = ref.open().metadata.num_rows
        shards.append(ref)
    return shards


def _codec_facts(shards: list[ShardRef], markers: dict[int, dict], scan: Scan) -> CodecInfo | None:
    """From the first shard's metadata (else the first marker); None when no source of truth is left."""
    for ref in shards:
        meta = ref.schema().metadata or {}
        if CODEC_KEY in meta:
            return CodecInfo(**json.loads(meta[CODEC_KEY]))
    for marker in markers.values():
        if "codec" in marker:
            return CodecInfo(**marker["codec"])
    scan.add("codec", "no shard metadata or marker says which codec made the codes; row checks skipped")
    return None


def _check_schemas(shards: list[ShardRef], plan: Plan, scan: Scan) -> None:
    """Same columns and types in every shard, and every shard stamped with the plan's fingerprint."""
    first: pa.Schema | None = None
    for ref in shards:
        schema = ref.schema()
        fingerprint = (schema.metadata or {}).get(FINGERPRINT_KEY, b"<none>").decode()
        if fingerprint != plan.fingerprint:
            scan.add("fingerprint", f"{ref.path.name} has fingerprint {fingerprint}, plan.json has {plan.fingerprint}")
        if first is None:
            first = schema
        elif not schema.equals(first, check_metadata=False):
            scan.add("schema", f"{ref.path.name} schema differs from {shards[0].path.name}: "
                               f"{_schema_diff(first, schema)}")
        missing = [c for c in _CHECK_COLUMNS if c not in schema.names]
        if missing:
            scan.add("schema", f"{ref.path.name} lacks columns {missing}")


def _schema_diff(a: pa.Schema, b: pa.Schema) -> str:
    left = {f.name: str(f.type) for f in a}
    right = {f.name: str(f.type) for f in b}
    names = sorted(set(left) | set(right))
    diffs = [f"{n}: {left.get(n)} -> {right.get(n)}" for n in names if left.get(n) != right.get(n)]
    return "; ".join(diffs) or "field order or nullability"


def _check_rows(scan: Scan, markers: dict[int, dict]) -> None:
    """Per shard: row and frame counts against the marker, then every row's invariants; across shards: no
    duplicate ``(id, segment_index)``."""
    codec = scan.codec
    assert codec is not None
    scan.usage = np.zeros((codec.num_codebooks, codec.cardinality), dtype=np.int64)
    seen: dict[tuple[str, int], str] = {}
    duplicates: list[str] = []
    for ref in scan.shards:
        if not set(_CHECK_COLUMNS) <= set(ref.schema().names):
            continue  # already reported by the schema check
        frames = _check_shard_rows(ref, codec, scan, seen, duplicates)
        counts = markers.get(ref.unit, {}).get("counts")
        if counts is not None and counts.get("rows") != ref.rows:
            scan.add("row_count", f"{ref.path.name} holds {ref.rows} rows, its marker says {counts.get('rows')}")
        if counts is not None and counts.get("frames") != frames:
            scan.add("frame_count", f"{ref.path.name} holds {frames} frames, its marker says {counts.get('frames')}")
        scan.rows += ref.rows
        scan.frames += frames
    if duplicates:
        scan.add("duplicate", f"{len(duplicates)} duplicate (id, segment_index) rows, e.g. {duplicates[:_EXAMPLES]}")


def _check_items(layout: OutputLayout, scan: Scan, markers: dict[int, dict]) -> None:
    """Per committed unit, the items with rows plus those in its failure log are exactly the plan's items of that
    unit: nothing planned is missing, nothing else (another job's audio) is there."""
    plan = scan.plan
    assert plan is not None
    try:
        items = load_items(layout, plan)
    except (OSError, PlanMismatch) as e:
        scan.add("items", f"the plan's item list cannot be checked: {e}")
        return
    for unit in sorted(markers):
        planned = {items[i].id for i in plan.unit_range(unit)}
        failed = {f.item_id for f in read_failures(layout, layout.failure_log(unit))}
        found = scan.ids_by_unit.get(unit, set()) | failed
        missing, alien = sorted(planned - found), sorted(found - planned)
        if missing or alien:
            scan.add("items", f"unit {unit}: {len(missing)} planned items are neither rows nor failures (e.g. "
                              f"{missing[:_EXAMPLES]}), {len(alien)} ids are not this unit's items (e.g. "
                              f"{alien[:_EXAMPLES]})")


def _check_shard_rows(ref: ShardRef, codec: CodecInfo, scan: Scan, seen: dict, duplicates: list) -> int:
    """Stream one shard; returns its total frames."""
    findings: dict[str, list[str]] = {}
    frames = 0
    ids = scan.ids_by_unit.setdefault(ref.unit, set())
    for batch in ref.open().iter_batches(batch_size=1024, columns=_CHECK_COLUMNS):
        frames += _check_batch(batch, codec, scan, findings)
        batch_ids = batch.column("id").to_pylist()
        ids.update(batch_ids)
        for key in zip(batch_ids, batch.column("segment_index").to_pylist()):
            if key in seen:
                duplicates.append(f"{key} in {seen[key]} and {ref.path.name}")
            seen[key] = ref.path.name
    for check, examples in findings.items():
        scan.add(check, f"{ref.path.name}: {len(examples)} rows fail: {_MESSAGES[check]}; e.g. {examples[:_EXAMPLES]}")
    return frames


_MESSAGES = {
    "n_frames": "n_frames differs from the codec's frames for n_samples (ceil(n_samples / hop), or the chunks' "
                "frames for a chunked codec)",
    "codes_shape": "codes is not [K][n_frames] with K = the codec's num_codebooks",
    "code_range": "codes outside [0, cardinality)",
    "duration": "duration_s * sample_rate != n_samples",
    "sample_rate": "sample_rate differs from the codec's",
}


def _check_batch(batch: pa.RecordBatch, codec: CodecInfo, scan: Scan, findings: dict[str, list[str]]) -> int:
    """Vectorised row invariants of one record batch; failing rows are named ``id#segment_index``."""
    names = [f"{i}#{s}" for i, s in zip(batch.column("id").to_pylist(), batch.column("segment_index").to_pylist())]
    n_samples = batch.column("n_samples").to_numpy(zero_copy_only=False).astype(np.int64)
    n_frames = batch.column("n_frames").to_numpy(zero_copy_only=False).astype(np.int64)
    duration = batch.column("duration_s").to_numpy(zero_copy_only=False)
    rate = batch.column("sample_rate").to_numpy(zero_copy_only=False)
    k, t, values, books = _codes_layout(batch.column("codes"))
    bad_shape = (k != codec.num_codebooks) | np.array([np.any(row != f) for row, f in zip(t, n_frames)], dtype=bool)
    failures = {
        "n_frames": n_frames != codec.n_frames(n_samples),
        "codes_shape": bad_shape,
        "duration": np.abs(duration * codec.sample_rate - n_samples) > 0.5,
        "sample_rate": rate != codec.sample_rate,
    }
    in_range = (values >= 0) & (values < codec.cardinality)
    if not in_range.all():
        row_of_value = np.repeat(np.repeat(np.arange(len(k)), k), np.concatenate(t) if len(t) else [])
        failures["code_range"] = np.isin(np.arange(len(k)), row_of_value[~in_range])
    ok_books = in_range & (books < codec.num_codebooks)
    np.add.at(scan.usage, (books[ok_books], values[ok_books].astype(np.int64)), 1)
    for check, mask in failures.items():
        if mask.any():
            findings.setdefault(check, []).extend(np.asarray(names)[mask].tolist())
    scan.durations.append(duration)
    return int(n_frames.sum())


def _codes_layout(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """A ``list<list<int16>>`` column -> (K per row, T per codebook per row, flat values, codebook of each value).

    Built from the Arrow offsets, so no Python loop touches individual codes.
    """
    outer = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    outer_offsets = outer.offsets.to_numpy()
    k = np.diff(outer_offsets)
    inner = outer.values.slice(outer_offsets[0], outer_offsets[-1] - outer_offsets[0])
    inner_lengths = np.diff(inner.offsets.to_numpy())
    values = inner.values.slice(inner.offsets[0].as_py(), int(inner_lengths.sum())).to_numpy(zero_copy_only=False)
    # Position of each inner list inside its row = its codebook index.
    book_of_list = np.arange(len(inner_lengths)) - np.repeat(outer_offsets[:-1] - outer_offsets[0], k)
    t = np.split(inner_lengths, np.cumsum(k)[:-1]) if len(k) else []
    return k, t, values, np.repeat(book_of_list, inner_lengths)


def _check_finalized(layout: OutputLayout, scan: Scan) -> None:
    """Finalize wrote the card (what makes ``load_dataset(OUT)`` find ``data/``) and stats that match the rows."""
    if not scan.plan or len(layout.done_units()) < scan.plan.n_units:
        return  # unfinished: already reported per unit
    for name in ("README.md", "stats.json"):
        if not layout.store.exists(layout.root / name):
            scan.add("finalize", f"{name} is missing: the job was not finalized; rerun the tokenize command")
    stats_path = layout.root / "stats.json"
    if layout.store.exists(stats_path):
        stats = json.loads(layout.store.read_bytes(stats_path))
        if stats.get("rows") != scan.rows:
            scan.add("stats", f"stats.json says {stats.get('rows')} rows, the shards hold {scan.rows}")


def codebook_stats(usage: np.ndarray) -> dict[str, list[float]]:
    """Per codebook: fraction of entries used, entropy (bits) and perplexity of the code distribution.

    >>> codebook_stats(np.array([[1, 1, 0, 0]]))
    {'used_fraction': [0.5], 'entropy_bits': [1.0], 'perplexity': [2.0]}
    """
    totals = usage.sum(axis=1, keepdims=True)
    p = usage / np.maximum(totals, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
    return {
        "used_fraction": [round(float(x), 6) for x in (usage > 0).mean(axis=1)],
        "entropy_bits": [round(float(h), 4) for h in entropy],
        "perplexity": [round(float(2 ** h), 2) for h in entropy],
    }

