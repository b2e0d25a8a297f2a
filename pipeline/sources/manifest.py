"""``dataset=manifest``: a list of audio files in a JSON-lines or CSV file (audiocraft's ``data.jsonl(.gz)``).

Every non-blank line of the manifest becomes exactly one item. A line that cannot become a proper item (bad
JSON, no path, a duplicate, ...) becomes an item that fails in ``fetch`` with a message naming the manifest
line, so it lands in the failure ledger: the run neither stops nor loses it, and ``ok + failed + skipped``
still counts every line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from typing import IO, Any, Iterator

import fsspec

from pipeline.metadata import MetadataError, check_unicode
from pipeline.sources.base import ERROR_KEY, BrokenItem, FetchedAudio, Source, check_broken, number_items
from pipeline.sources.storage import (COMPRESSION_SUFFIXES, SIDECAR_MAX_BYTES, dirname, is_url, join, read_bytes,
                                      read_sidecar, relative_to, sidecar_path)
from pipeline.types import AudioItem

# Fields that are not passed through as metadata: ``duration`` becomes ``AudioItem.duration_s``; audiocraft's
# ``sample_rate`` is the file's own rate, which every row already holds, measured, as ``source_sample_rate``.
_NOT_METADATA = ("duration", "sample_rate")
# Where ``csv.DictReader`` puts the cells of a row longer than the header (a key no header can have).
_EXTRA = "\0extra"


class ManifestError(BrokenItem):
    """A manifest line that cannot be tokenized; the message names the manifest and the line."""


@dataclass(slots=True)
class _Line:
    """One parsed manifest record: its 1-based line number and its fields, or why it could not be parsed."""

    number: int
    fields: dict[str, Any] | None
    error: str | None = None


class ManifestSource(Source):
    """Items listed in a manifest file.

    Formats by suffix (optionally compressed, e.g. ``.jsonl.gz``): ``.jsonl``/``.json``/``.ndjson`` hold one
    JSON object per line (audiocraft: ``path``, ``duration``, ``sample_rate``, ...); ``.csv``/``.tsv`` have a
    header row. Fields other than the path, the id, ``duration`` and ``sample_rate`` become item metadata.

    Args:
        path: the manifest (local path or fsspec URL).
        root: relative audio paths resolve against this; None = the manifest's folder.
        path_column: field holding the audio path.
        id_column: field holding the item id; None = the audio path relative to ``root`` (or as written when
            it is not under ``root``).
        sidecar_json: also read ``song.json`` beside each audio file, as audiocraft's MusicDataset does.
        storage_options: fsspec options for URLs (manifest or audio).
        sidecar_max_bytes: larger sidecars fail their item (``read:bad_sidecar``).
    """

    def __init__(self, path: str, root: str | None = None, path_column: str = "path", id_column: str | None = None,
                 sidecar_json: bool = True, storage_options: dict[str, Any] | None = None,
                 sidecar_max_bytes: int = SIDECAR_MAX_BYTES):
        self.path = path if is_url(path) else os.path.abspath(os.path.expanduser(path))
        if not is_url(path) and not os.path.isfile(self.path):
            raise ValueError(f"dataset.path {path!r} is not a file; dataset=manifest expects a .jsonl(.gz) or .csv")
        self.format = _format_of(self.path)
        root = root if root is not None else dirname(self.path)
        self.root = root.rstrip("/") if is_url(root) else os.path.abspath(os.path.expanduser(root))
        self.path_column, self.id_column = path_column, id_column
        self.sidecar_json, self.sidecar_max_bytes = sidecar_json, sidecar_max_bytes
        self.storage_options = dict(storage_options or {})

    def list_items(self) -> list[AudioItem]:
        items: list[AudioItem] = []
        first_line: dict[str, int] = {}  # id -> line that claimed it first
        for line in self._read_lines():
            item = self._item(line)
            if item.id in first_line and ERROR_KEY not in item.metadata:
                item = self._broken(line.number, f"duplicate id {item.id!r} (first on line {first_line[item.id]})")
            first_line.setdefault(item.id, line.number)
            items.append(item)
        return number_items(items)

    def _read_lines(self) -> Iterator[_Line]:
        options = self.storage_options if is_url(self.path) else {}
        with fsspec.open(self.path, "rb", compression="infer", **options) as f:
            if self.format == "jsonl":
                yield from _json_lines(f)
            else:
                yield from _csv_lines(f, "\t" if self.format == "tsv" else ",")

    def _item(self, line: _Line) -> AudioItem:
        """A proper item, or a broken one saying what is wrong with the line."""
        if line.error is not None:
            return self._broken(line.number, line.error)
        fields = {k: v for k, v in line.fields.items() if v is not None and v != ""}  # empty CSV cell = absent
        raw = fields.pop(self.path_column, None)
        if not isinstance(raw, str) or not raw:
            return self._broken(line.number, f"no {self.path_column!r} field with a path (dataset.path_column)")
        duration = fields.pop("duration", None)
        try:
            duration_s = _duration(duration)
        except ValueError as e:
            return self._broken(line.number, str(e))
        source = self._resolve(raw)
        item_id = self._id(raw, source, fields)
        if item_id is None:
            return self._broken(line.number, f"no {self.id_column!r} field (dataset.id_column)")
        meta = {k: v for k, v in fields.items() if k not in _NOT_METADATA}
        return AudioItem(id=item_id, source=source, index=-1, metadata=meta, duration_s=duration_s)

    def _broken(self, number: int, why: str) -> AudioItem:
        """An item for an unusable line; its id sorts beside the manifest's name and cannot clash with a path."""
        name = os.path.basename(self.path)
        message = f"{self.path} line {number}: {why}"
        return AudioItem(id=f"{name}#L{number}", source=f"{self.path}#L{number}", index=-1,
                         metadata={ERROR_KEY: message})

    def _resolve(self, raw: str) -> str:
        if is_url(raw) or os.path.isabs(raw):
            return raw
        if raw.startswith("~"):
            return os.path.expanduser(raw)
        return join(self.root, raw)

    def _id(self, raw: str, source: str, fields: dict[str, Any]) -> str | None:
        if self.id_column is not None:
            value = fields.pop(self.id_column, None)
            return None if value is None else str(value)
        rel = relative_to(source, self.root)
        return rel if rel is not None else raw

    def fetch(self, item: AudioItem) -> FetchedAudio:
        check_broken(item, ManifestError)
        meta = read_sidecar(item.source, self.storage_options, self.sidecar_max_bytes) if self.sidecar_json else {}
        data = read_bytes(item.source, self.storage_options) if is_url(item.source) else item.source
        return FetchedAudio(data=data, name=item.source, metadata=meta,
                            metadata_from=sidecar_path(item.source) if meta else None)

    def describe(self) -> dict[str, Any]:
        return {"kind": "manifest", "path": self.path, "root": self.root, "format": self.format,
                "path_column": self.path_column, "id_column": self.id_column}


def _format_of(path: str) -> str:
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    for fmt, suffixes in (("jsonl", (".jsonl", ".json", ".ndjson")), ("csv", (".csv",)), ("tsv", (".tsv",))):
        if name.endswith(suffixes):
            return fmt
    raise ValueError(f"dataset.path {path!r}: unknown manifest format; expected .jsonl, .json, .ndjson, .csv or "
                     f".tsv, optionally compressed ({', '.join(COMPRESSION_SUFFIXES)})")


def _json_lines(f: IO[bytes]) -> Iterator[_Line]:
    """One record per non-blank line; each line is decoded on its own so one bad byte costs one line."""
    for number, raw in enumerate(f, start=1):
        raw = raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw  # a BOM some editors write
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            yield _Line(number, None, f"not valid JSON ({e})")
            continue
        if not isinstance(record, dict):
            yield _Line(number, None, f"holds a JSON {type(record).__name__}, expected an object")
            continue
        try:
            # A lone surrogate (``json.dumps`` of a non-UTF-8 file name writes one) cannot be stored in the item
            # list or a row: it stopped planning. The line fails alone instead.
            for key, value in record.items():
                check_unicode(key, key)
                check_unicode(value, key)
        except MetadataError as e:
            yield _Line(number, None, str(e))
            continue
        yield _Line(number, record)


def _csv_lines(f: IO[bytes], delimiter: str) -> Iterator[_Line]:
    """Rows of a CSV/TSV with a header. A row with more cells than the header is reported, not truncated."""
    # A bad byte shows as U+FFFD and fails that row's fetch (file not found, named) rather than the listing.
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
    reader = csv.DictReader(text, delimiter=delimiter, restkey=_EXTRA)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield _Line(reader.line_num, None, f"CSV error ({e})")
            continue
        if _EXTRA in row:
            n_cells = len(row) - 1 + len(row[_EXTRA])
            yield _Line(reader.line_num, None, f"{n_cells} cells, header has {len(reader.fieldnames or [])}")
            continue
        yield _Line(reader.line_num, row)


def _duration(value: Any) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"duration {value!r} is not a number") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration {value!r} is not a finite, non-negative number of seconds")
    return seconds
