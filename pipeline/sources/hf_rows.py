"""Row access for ``dataset=hf``: list a table's small columns once, then fetch one row's audio cell in a worker.

Three readers, one interface (``schema``, ``listing``, ``audio_cell``):

- ``FileRows``: Parquet or Arrow files read with pyarrow directly. ``datasets.load_dataset("parquet")`` would
  first copy every file into its cache; here a worker reads only the row group it needs.
- ``DatasetRows``: a ``datasets.Dataset`` (``load_from_disk`` or a hub download). Both are memory-mapped Arrow
  files, so reopening one in each worker process costs milliseconds.
- ``StreamRows``: a hub ``IterableDataset``. There is no random access: listing iterates the stream once, and a
  worker reads the stream forward to the rows it is given (restarting if it must go back). Fine for small
  datasets; for large ones download them (``streaming=false``, the main path).

Everything is read in Arrow format, which never runs a ``datasets`` feature decoder: an ``Audio`` column comes
back as its stored ``{"bytes", "path"}`` struct (as ``Audio(decode=False)`` would give), so no torchcodec is
needed. Readers hold per-process caches and are never pickled: ``HfSource`` rebuilds them in each worker.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.sources.storage import filesystem, is_url

# The listing column holding each row's audio path (from the audio struct), whatever the audio column is named.
PATH_KEY = "__audio_path__"


def audio_paths(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """The ``path`` of each audio cell: the struct's ``path`` field, the string itself, or null (bytes only).

    Chunk by chunk: combining the chunks first would copy every audio byte of a memory-mapped table.
    """
    if pa.types.is_struct(column.type) and column.type.get_field_index("path") >= 0:
        return pc.struct_field(column, "path")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column
    return pa.nulls(len(column), pa.string())


def _with_paths(table: pa.Table, audio_column: str, columns: list[str]) -> pa.Table:
    """``columns`` of ``table`` plus ``PATH_KEY``, the audio paths (the audio bytes are left behind)."""
    return table.select(columns).append_column(PATH_KEY, audio_paths(table.column(audio_column)))


@dataclass
class FileRows:
    """Rows of Parquet (``.parquet``) and Arrow IPC (``.arrow``) files; a row is ``(file, row in file)``.

    Args:
        files: file paths or fsspec URLs, in listing order.
        audio_column: the column holding audio.
        storage_options: fsspec options for URLs.
    """

    files: list[str]
    audio_column: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    _parquet: dict[str, tuple[pq.ParquetFile, list[int]]] = field(default_factory=dict, repr=False)
    _arrow: dict[str, pa.Table] = field(default_factory=dict, repr=False)
    _group: tuple[str, int, pa.Array] | None = field(default=None, repr=False)

    def schema(self) -> pa.Schema:
        first = self.files[0]
        return self._parquet_file(first)[0].schema_arrow if _is_parquet(first) else self._arrow_table(first).schema

    def listing(self, columns: list[str]) -> Iterator[tuple[str, pa.Table]]:
        for path in self.files:
            if _is_parquet(path):
                # Read only the audio struct's small ``path`` child, never the bytes next to it.
                table = self._parquet_file(path)[0].read(columns=columns + [self._path_selector(path)])
            else:
                table = self._arrow_table(path)
            yield path, _with_paths(table, self.audio_column, columns)

    def _path_selector(self, path: str) -> str:
        audio_type = self._parquet_file(path)[0].schema_arrow.field(self.audio_column).type
        has_path = pa.types.is_struct(audio_type) and audio_type.get_field_index("path") >= 0
        return f"{self.audio_column}.path" if has_path else self.audio_column

    def audio_cell(self, label: str, row: int) -> Any:
        if not _is_parquet(label):
            return self._arrow_table(label).column(self.audio_column)[row].as_py()
        pf, offsets = self._parquet_file(label)
        if not 0 <= row < offsets[-1]:
            raise IndexError(f"{label} has {offsets[-1]} rows, not row {row}; has the file changed since the plan?")
        group = bisect.bisect_right(offsets, row) - 1
        if self._group is None or self._group[:2] != (label, group):
            # One row group cached per process: a worker given neighbouring rows reads each group once.
            self._group = (label, group, pf.read_row_group(group, columns=[self.audio_column]).column(0))
        return self._group[2][row - offsets[group]].as_py()

    def _parquet_file(self, path: str) -> tuple[pq.ParquetFile, list[int]]:
        if path not in self._parquet:
            pf = pq.ParquetFile(_open(path, self.storage_options))
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
            offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            self._parquet[path] = (pf, offsets)
        return self._parquet[path]

    def _arrow_table(self, path: str) -> pa.Table:
        """A memory-mapped table (remote files are read whole); ``save_to_disk`` writes the IPC stream format."""
        if path not in self._arrow:
            source = _open(path, self.storage_options)
            try:
                self._arrow[path] = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                self._arrow[path] = pa.ipc.open_file(_open(path, self.storage_options)).read_all()
        return self._arrow[path]


def _is_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def _open(path: str, storage_options: dict[str, Any]) -> Any:
    if is_url(path):
        fs, inner = filesystem(path, storage_options)
        return pa.BufferReader(fs.cat_file(inner)) if not _is_parquet(path) else fs.open(inner, "rb")
    return pa.memory_map(os.fspath(path))


@dataclass
class DatasetRows:
    """Rows of an opened ``datasets.Dataset`` (one table; ``label`` names it in item sources).

    Args:
        dataset: the Dataset (memory-mapped; cheap to hold, not to pickle).
        label: how item sources name it, e.g. ``/data/ds:train``.
        audio_column: the column holding audio.
    """

    dataset: Any
    label: str
    audio_column: str
    _audio: Any = field(default=None, repr=False)

    def schema(self) -> pa.Schema:
        return self.dataset.features.arrow_schema

    def listing(self, columns: list[str]) -> Iterator[tuple[str, pa.Table]]:
        table = self.dataset.select_columns(columns + [self.audio_column]).with_format("arrow")[:]
        yield self.label, _with_paths(table, self.audio_column, columns)

    def audio_cell(self, label: str, row: int) -> Any:
        if self._audio is None:
            self._audio = self.dataset.select_columns([self.audio_column]).with_format("arrow")
        return self._audio[row].column(0)[0].as_py()


@dataclass
class StreamRows:
    """Rows of a streaming ``IterableDataset``, read forward only.

    Args:
        dataset: the IterableDataset.
        label: how item sources name it.
        audio_column: the column holding audio.
        batch_rows: rows per Arrow batch read from the stream.
    """

    dataset: Any
    label: str
    audio_column: str
    batch_rows: int = 64
    _cursor: tuple[Iterator[pa.Table], int, pa.Table] | None = field(default=None, repr=False)

    def schema(self) -> pa.Schema:
        if self.dataset.features is not None:
            return self.dataset.features.arrow_schema
        return next(iter(self.dataset.with_format("arrow").iter(batch_size=1))).schema

    def listing(self, columns: list[str]) -> Iterator[tuple[str, pa.Table]]:
        stream = self.dataset.select_columns(columns + [self.audio_column]).with_format("arrow")
        # Keep only the small columns of each batch, so the whole stream's audio is never held at once.
        parts = [_with_paths(b, self.audio_column, columns) for b in stream.iter(batch_size=self.batch_rows)]
        if parts:
            yield self.label, pa.concat_tables(parts)

    def audio_cell(self, label: str, row: int) -> Any:
        if self._cursor is None or row < self._cursor[1]:
            stream = self.dataset.select_columns([self.audio_column]).with_format("arrow")
            self._cursor = (iter(stream.iter(batch_size=self.batch_rows)), 0, pa.table({self.audio_column: []}))
        it, start, batch = self._cursor
        while row >= start + batch.num_rows:
            start, batch = start + batch.num_rows, next(it, None)
            if batch is None:
                self._cursor = None
                raise IndexError(f"{self.label}[{row}]: the stream ended before this row")
            self._cursor = (it, start, batch)
        return batch.column(0)[row - start].as_py()
