"""The training-side reader: Parquet rows of an output folder -> ``[K, T]`` code tensors for a training loop.

The output stores raw codes only (README "Tokens"); crops, padding, the MusicGen delay pattern and special
tokens are applied here, per example:

1. crop: ``crop_frames`` frames, at a random start (``random_crop``) or the head; shorter rows are padded.
2. delay (``delay_pattern``): audiocraft's ``DelayedPatternProvider`` with delays ``[0, 1, ..., K-1]``, as
   ``Pattern.build_pattern_sequence(codes, special, keep_only_valid_steps=False)`` lays it out: ``[K, T + K]``,
   step 0 all ``special_token`` (the start step), codebook ``k`` at step ``s`` holding frame ``s - 1 - k``.
   Stereo rows (``[L0, R0, L1, R1, ...]``) delay each codebook's two channels together, as MusicGen-stereo does
   (delays ``[0, 0, 1, 1, 2, 2, 3, 3]``; transformers' ``build_delay_pattern_mask`` with ``audio_channels=2``):
   ``delay_group=2``, ``[K, T + K/2]``. ``undelay`` inverts it.
3. collate: ``codes [B, K, L] int64``, ``mask [B, L] bool`` (steps that belong to the example, not padding),
   ``token_mask [B, K, L] bool`` (positions holding a real code: the loss targets), metadata as lists.

A row's crop start depends on (seed, epoch, id, segment_index) only, so the same row gives the same example
whatever the rank/worker split, and ``TokenDataset`` and ``to_example`` (for ``datasets.load_dataset(OUT)``
rows) agree. How rows are split across ranks and workers: ``pipeline.data_split``.
"""

from __future__ import annotations

import functools
import json
import posixpath
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.data_split import RowGroup, assign, budgets, resolve_split, steps

DEFAULT_FIELDS = ("id", "segment_index")


@dataclass(frozen=True)
class ExampleOptions:
    """How a row becomes an example.

    Args:
        crop_frames: frames per example (50 per second for EnCodec 32 kHz); None keeps whole rows (collate pads).
        random_crop: a random window of a longer row; False takes its first ``crop_frames``.
        delay_pattern: apply the MusicGen delay pattern (output length ``crop_frames + K / delay_group``).
        delay_group: consecutive codebooks delayed together: 1 for mono rows, 2 for stereo rows that interleave
            L and R per codebook (MusicGen-stereo). ``TokenDataset`` reads it from the shards' metadata.
        special_token: the id filling delayed positions; MusicGen uses the cardinality (2048).
        pad_token: the id filling padding; None uses ``special_token``.
        fields: row columns returned alongside the codes (``description``, ``genre``, ``metadata``, ...).
        seed: seeds the crops (and, in ``TokenDataset``, the shuffle).
    """

    crop_frames: int | None = None
    random_crop: bool = True
    delay_pattern: bool = False
    special_token: int = 2048
    pad_token: int | None = None
    fields: tuple[str, ...] = DEFAULT_FIELDS
    seed: int = 0
    delay_group: int = 1

    def __post_init__(self) -> None:
        if self.crop_frames is not None and self.crop_frames <= 0:
            raise ValueError(f"crop_frames must be a positive frame count or None, got {self.crop_frames}")
        if self.delay_group not in (1, 2):
            raise ValueError(f"delay_group must be 1 (mono rows) or 2 (stereo-interleaved rows), got {self.delay_group}")

    @property
    def pad(self) -> int:
        return self.special_token if self.pad_token is None else self.pad_token


def delay_steps(k: int, group: int = 1) -> int:
    """Steps ``delay`` adds to ``k`` codebooks delayed ``group`` at a time: the largest delay, plus the start step."""
    return (k - 1) // group + 1


def delay(codes: torch.Tensor, special_token: int, group: int = 1) -> torch.Tensor:
    """``[..., K, T]`` -> ``[..., K, T + K / group]``: codebook ``k`` shifted right by ``k // group + 1`` steps (the
    ``+1`` is the start step of audiocraft's pattern), the gaps filled with ``special_token``. ``group=2`` for
    stereo-interleaved rows: L and R of a codebook share a delay (MusicGen-stereo).

    >>> delay(torch.tensor([[1, 2, 3], [4, 5, 6]]), 9).tolist()
    [[9, 1, 2, 3, 9], [9, 9, 4, 5, 6]]
    >>> delay(torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]]), 9, group=2).tolist()
    [[9, 1, 2, 9], [9, 3, 4, 9], [9, 9, 5, 6], [9, 9, 7, 8]]
    """
    *lead, k, t = codes.shape
    out = codes.new_full((*lead, k, t + delay_steps(k, group)), special_token)
    for q in range(k):
        shift = q // group + 1
        out[..., q, shift : shift + t] = codes[..., q, :]
    return out


def undelay(sequence: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Inverse of ``delay``: ``[..., K, S]`` -> ``[..., K, S - K / group]``.

    >>> undelay(torch.tensor([[9, 1, 2, 3, 9], [9, 9, 4, 5, 6]])).tolist()
    [[1, 2, 3], [4, 5, 6]]
    """
    k, s = sequence.shape[-2:]
    t = s - delay_steps(k, group)
    return torch.stack([sequence[..., q, q // group + 1 : q // group + 1 + t] for q in range(k)], dim=-2)


def crop_start(n_frames: int, opts: ExampleOptions, key: tuple[str, int], epoch: int) -> int:
    """Where the crop of a row starts: 0, or uniform over the valid starts, seeded by (seed, epoch, row)."""
    if opts.crop_frames is None or not opts.random_crop or n_frames <= opts.crop_frames:
        return 0
    rng = np.random.default_rng([opts.seed, epoch, zlib.crc32(key[0].encode()), key[1]])
    return int(rng.integers(0, n_frames - opts.crop_frames + 1))


def make_example(codes: np.ndarray, meta: Mapping[str, Any], opts: ExampleOptions, epoch: int = 0) -> dict[str, Any]:
    """One row's codes ``[K, T]`` (+ its metadata) -> an example: crop, pad, delay.

    Returns:
        ``codes`` int64 ``[K, L]``, ``mask`` bool ``[L]``, ``token_mask`` bool ``[K, L]``, ``length`` (real frames),
        ``start`` (crop start frame), and every ``opts.fields`` entry.
    """
    k, n = codes.shape
    start = crop_start(n, opts, (str(meta.get("id", "")), int(meta.get("segment_index", 0))), epoch)
    length = n - start if opts.crop_frames is None else min(opts.crop_frames, n - start)
    size = length if opts.crop_frames is None else opts.crop_frames
    out = torch.full((k, size), opts.pad, dtype=torch.int64)
    out[:, :length] = torch.from_numpy(np.asarray(codes[:, start : start + length], dtype=np.int64))
    tokens = torch.zeros((k, size), dtype=torch.bool)
    tokens[:, :length] = True
    steps = length
    if opts.delay_pattern:
        g = opts.delay_group
        out, tokens, steps = delay(out, opts.special_token, g), delay(tokens, False, g), length + delay_steps(k, g)
    mask = torch.arange(out.shape[-1]) < steps
    example = {"codes": out, "mask": mask, "token_mask": tokens, "length": length, "start": start}
    example.update({name: meta.get(name) for name in opts.fields})
    return example


def collate(examples: Sequence[Mapping[str, Any]], pad_token: int = 2048) -> dict[str, Any]:
    """Stack examples: tensors padded on the right to the longest (with ``pad_token``, masks False), ``length``
    and ``start`` as int64 tensors, every other field as a list."""
    longest = max(e["codes"].shape[-1] for e in examples)
    batch: dict[str, Any] = {
        "codes": torch.stack([_pad(e["codes"], longest, pad_token) for e in examples]),
        "mask": torch.stack([_pad(e["mask"], longest, False) for e in examples]),
        "token_mask": torch.stack([_pad(e["token_mask"], longest, False) for e in examples]),
        "length": torch.tensor([e["length"] for e in examples], dtype=torch.int64),
        "start": torch.tensor([e["start"] for e in examples], dtype=torch.int64),
    }
    for name in examples[0]:
        if name not in batch:
            batch[name] = [e[name] for e in examples]
    return batch


def _pad(x: torch.Tensor, size: int, value: Any) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return torch.nn.functional.pad(x, (0, size - x.shape[-1]), value=value)


def to_example(row: Mapping[str, Any], crop_frames: int | None = None, random_crop: bool = False,
               delay_pattern: bool = False, special_token: int = 2048, pad_token: int | None = None,
               fields: Sequence[str] = DEFAULT_FIELDS, seed: int = 0, epoch: int = 0,
               delay_group: int = 1) -> dict[str, Any]:
    """A ``datasets.load_dataset(OUT)`` row (codes as K lists) -> the same example ``TokenDataset`` yields.

    Args: as ``ExampleOptions`` (``delay_group=2`` for stereo outputs: ``delay_group_of(OUT)``); ``epoch`` moves
    the random crops.
    """
    opts = ExampleOptions(crop_frames, random_crop, delay_pattern, special_token, pad_token, tuple(fields), seed,
                          delay_group)
    return make_example(np.asarray(row["codes"], dtype=np.int64), row, opts, epoch)


class HFTokenDataset(torch.utils.data.Dataset):
    """A map-style view of a Hugging Face dataset of output rows (``load_dataset(OUT, split="train")``).

    Shuffling and DDP splitting are the sampler's (``DistributedSampler``); ``set_epoch`` moves the crops.
    """

    def __init__(self, ds: Any, opts: ExampleOptions):
        self.ds, self.opts, self.epoch = ds, opts, 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.ds[index]
        return make_example(np.asarray(row["codes"], dtype=np.int64), row, self.opts, self.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def collate(self):
        return functools.partial(collate, pad_token=self.opts.pad)


def from_hf(ds: Any, **options: Any) -> HFTokenDataset:
    """Wrap a Hugging Face dataset of output rows; ``options`` are ``ExampleOptions`` fields (for a stereo output,
    ``delay_group=delay_group_of(OUT)``: the rows do not say how their codebooks interleave, the shards do)."""
    if "fields" in options:
        options["fields"] = tuple(options["fields"])
    return HFTokenDataset(ds, ExampleOptions(**options))


def open_shards(source: str | Path | Sequence[str | Path],
                storage_options: dict[str, Any] | None = None) -> tuple[list[Any], Any]:
    """``shard_files``, for local paths or fsspec URLs (``s3://bucket/out``, ``gs://...``: reading needs no
    more than fsspec offers): the shard paths and pyarrow's ``filesystem=`` for them (None: local)."""
    from pipeline.sources.storage import filesystem, is_url

    urls = [str(source)] if isinstance(source, (str, Path)) else [str(s) for s in source]
    if not urls or not is_url(urls[0]):
        return shard_files(source), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = filesystem(urls[0], dict(storage_options or {}))
    files = []
    for url in urls:
        inner = fs._strip_protocol(url).rstrip("/")
        files += sorted(fs.glob(f"{inner}/data/*.parquet")) if fs.isdir(inner) else [inner]
    if not files:
        raise ValueError(f"no Parquet shards in {source} (expected an output folder with data/*.parquet)")
    return files, PyFileSystem(FSSpecHandler(fs))


def shard_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """An output folder (its ``data/*.parquet``), one Parquet file, or a list of them -> sorted paths."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        files = sorted((path / "data").glob("*.parquet")) if path.is_dir() else [path]
    else:
        files = sorted(Path(p) for p in source)
    if not files:
        raise ValueError(f"no Parquet shards in {source} (expected an output folder with data/*.parquet)")
    return files


def codec_metadata(path: Path | str, filesystem: Any = None) -> dict[str, Any]:
    """The ``pipeline.codec`` entry of a shard (sample rate, frame rate, K, cardinality); {} if absent."""
    raw = (pq.read_schema(path, filesystem=filesystem).metadata or {}).get(b"pipeline.codec")
    return json.loads(raw) if raw else {}


def delay_group_of(source: str | Path | Sequence[str | Path] | Mapping[str, Any],
                   storage_options: dict[str, Any] | None = None) -> int:
    """2 when an output's rows interleave L and R per codebook (``channels=stereo`` with a mono-input codec), else 1:
    the ``delay_group`` MusicGen's delay pattern needs. ``source``: an output (as ``TokenDataset`` takes) or its
    ``codec_metadata``."""
    if not isinstance(source, Mapping):
        files, fs = open_shards(source, storage_options)
        source = codec_metadata(files[0], fs)
    return 2 if source.get("channels") == "stereo" and int(source.get("input_channels", 1)) == 1 else 1


def codes_of(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """A ``codes`` column -> one int16 ``[K, T]`` array per row, as views of one flat buffer (no per-code Python)."""
    outer = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    outer_offsets = outer.offsets.to_numpy()
    inner = outer.values
    inner_offsets = inner.offsets.to_numpy()
    values = inner.values.to_numpy(zero_copy_only=False)
    out = []
    for r in range(len(outer)):
        first, last = inner_offsets[outer_offsets[r]], inner_offsets[outer_offsets[r + 1]]
        k = outer_offsets[r + 1] - outer_offsets[r]
        out.append(values[first:last].reshape(k, -1) if k else np.zeros((0, 0), np.int16))
    return out


class TokenDataset(torch.utils.data.IterableDataset):
    """Examples from the Parquet shards of an output folder, split across DDP ranks and DataLoader workers.

    Every row is read by exactly one (rank, worker) per epoch (see ``pipeline.data_split`` for how). Call
    ``set_epoch(e)`` before each epoch for a new shuffle and new crops; with ``persistent_workers=True`` the
    workers keep the dataset they started with, so leave it off (the default) or the epoch will not change.

    Args:
        source: an output folder, a Parquet file, or a list of them; local, or fsspec URLs (``s3://bucket/out``).
        storage_options: fsspec options for URLs (endpoint; keep credentials in the environment).
        crop_frames, random_crop, delay_pattern, pad_token, fields: see ``ExampleOptions``.
        special_token: None takes the codec's cardinality from the shards' metadata (MusicGen's choice).
        delay_group: None takes it from the shards' metadata (2 for stereo-interleaved rows; see ``delay``).
        shuffle: shuffle units, rows within them and a ``shuffle_buffer`` of rows; False reads in file order.
        seed: seeds the shuffle and the crops.
        rank, world_size: this process's place; None takes them from ``torch.distributed`` when initialised.
        split: ``auto``, ``file``, ``row_group`` or ``row``.
        even_ranks: every rank yields as many rows as the smallest (needed by DDP); None: on when world_size > 1.
        shuffle_buffer: rows mixed across units in each worker (memory: rows x one row's codes).
    """

    def __init__(self, source: str | Path | Sequence[str | Path], *, storage_options: dict[str, Any] | None = None,
                 crop_frames: int | None = None,
                 random_crop: bool = True, delay_pattern: bool = False, special_token: int | None = None,
                 pad_token: int | None = None, fields: Sequence[str] = DEFAULT_FIELDS, shuffle: bool = True,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, split: str = "auto",
                 even_ranks: bool | None = None, shuffle_buffer: int = 1024, delay_group: int | None = None):
        self.files, self.filesystem = open_shards(source, storage_options)
        self.codec = codec_metadata(self.files[0], self.filesystem)
        if special_token is None:
            if "cardinality" not in self.codec:
                raise ValueError(f"{self.files[0]} has no pipeline.codec metadata; pass special_token explicitly")
            special_token = int(self.codec["cardinality"])
        if delay_group is None:
            delay_group = delay_group_of(self.codec)
        self.opts = ExampleOptions(crop_frames, random_crop, delay_pattern, special_token, pad_token, tuple(fields),
                                   seed, delay_group)
        self._check_fields()
        self.groups = [group for f, path in enumerate(self.files) for group in _row_groups(f, path, self.filesystem)]
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        resolve_split(split, 1, 1, 1)  # validates the name now, not in a worker
        self.split, self.shuffle, self.shuffle_buffer = split, shuffle, shuffle_buffer
        self.even_ranks = self.world_size > 1 if even_ranks is None else even_ranks
        self.epoch = 0

    def _check_fields(self) -> None:
        names = set(pq.read_schema(self.files[0], filesystem=self.filesystem).names)
        missing = [f for f in self.opts.fields if f not in names]
        if missing:
            raise ValueError(f"fields {missing} are not columns of {posixpath.basename(str(self.files[0]))}; "
                             f"columns: {sorted(names)}")

    @property
    def num_rows(self) -> int:
        """Rows in all shards (all ranks together)."""
        return sum(g.rows for g in self.groups)

    @property
    def collate(self):
        """``collate`` with this dataset's pad token, for ``DataLoader(collate_fn=ds.collate)``."""
        return functools.partial(collate, pad_token=self.opts.pad)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def assignment(self, num_workers: int = 0):
        """This epoch's pieces and row budget of every consumer (``rank * workers + worker``), and the split used."""
        consumers = self.world_size * max(1, num_workers)
        split = resolve_split(self.split, len(self.files), len(self.groups), consumers)
        rng = np.random.default_rng([self.opts.seed, self.epoch]) if self.shuffle else None
        pieces = assign(self.groups, consumers, split, rng, self.world_size)
        return pieces, budgets(pieces, self.world_size, self.even_ranks), split

    def consumer_rows(self, num_workers: int = 0) -> list[int]:
        """Rows every consumer (``rank * workers + worker``) yields this epoch, its budget included."""
        pieces, limits, _ = self.assignment(num_workers)
        return [sum(p.n_rows for p in c) if limit is None else limit for c, limit in zip(pieces, limits)]

    def epoch_size(self, num_workers: int = 0) -> int:
        """Examples this rank yields this epoch with ``num_workers`` DataLoader workers (for LR schedules)."""
        workers = max(1, num_workers)
        return sum(self.consumer_rows(num_workers)[self.rank * workers : (self.rank + 1) * workers])

    def steps_per_epoch(self, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> int:
        """Batches every rank can take this epoch from ``DataLoader(ds, batch_size, num_workers, drop_last)``: stop
        each rank's epoch there under DDP. Each worker batches its own rows, so ranks with equal rows can still
        differ by a batch, and the rank with one more would wait forever in its extra all-reduce."""
        return steps(self.consumer_rows(num_workers), self.world_size, batch_size, drop_last)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pieces, limits, _ = self.assignment(workers if info is not None else 0)
        consumer = self.rank * workers + worker
        rng = np.random.default_rng([self.opts.seed, self.epoch, consumer]) if self.shuffle else None
        rows = self._rows(pieces[consumer], rng)
        if rng is not None:
            rows = _buffer_shuffle(rows, self.shuffle_buffer, rng)
        for i, (codes, meta) in enumerate(rows):
            if limits[consumer] is not None and i >= limits[consumer]:
                return
            yield make_example(codes, meta, self.opts, self.epoch)

    def _rows(self, pieces, rng: np.random.Generator | None) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        columns = ["codes"] + sorted({"id", "segment_index", *self.opts.fields} - {"codes"})
        opened: tuple[int, pq.ParquetFile] | None = None  # pieces of one file come together: keep its footer
        for piece in pieces:
            if opened is None or opened[0] != piece.group.file:
                opened = piece.group.file, pq.ParquetFile(self.files[piece.group.file], filesystem=self.filesystem)
            table = opened[1].read_row_group(piece.group.index, columns=columns)
            if piece.rows is not None:
                table = table.take(piece.rows)
            codes = codes_of(table.column("codes"))
            meta = {name: table.column(name).to_pylist() for name in columns[1:]}
            for i in rng.permutation(len(codes)) if rng is not None else range(len(codes)):
                yield codes[i], {name: values[i] for name, values in meta.items()}


def _row_groups(file: int, path: Path | str, filesystem: Any = None) -> list[RowGroup]:
    meta = pq.ParquetFile(path, filesystem=filesystem).metadata  # the footer only
    return [RowGroup(file, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Mix a stream through a buffer of ``size`` items (as webdataset does): rows of different units interleave."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
    if rank is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank, world_size
