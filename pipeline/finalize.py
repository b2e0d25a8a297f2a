"""Finalize stage, run once after every unit is done: merge per-unit counts into ``stats.json``, write the
dataset card ``README.md`` (with the ``configs`` YAML that makes ``datasets.load_dataset(OUT)`` work).

It is idempotent (atomic writes of pure functions of the markers), so two ranks racing to it are harmless.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.layout import OutputLayout
from pipeline.stores import json_bytes
from pipeline.plan import Plan
from pipeline.writer import UnitCounts

if TYPE_CHECKING:  # finalize itself never needs torch
    from pipeline.codecs.base import Codec


class InconsistentOutput(RuntimeError):
    """Units of one folder disagree (fingerprint) or are missing."""


@dataclass
class CodecInfo:
    """What a training job needs to know about the codes.

    The fields after ``channels`` have defaults because markers of older outputs lack them.

    Args:
        num_codebooks: K of a row (twice the codec's K when a mono-input codec is interleaved in stereo).
        channels: the run's channel policy, ``mono`` or ``stereo``.
        family: the codec family (``encodec``, ``dac``, ``mimi``).
        input_channels: channels per encode call: 2 for a stereo-input codec (EnCodec 48 kHz), never interleaved.
        chunk_length: samples per chunk of a chunked codec (EnCodec 48 kHz), at ``sample_rate``; None otherwise.
        chunk_stride: samples between chunk starts; ``n_frames`` follows from both (``verify_checks``).
    """

    pretrained: str
    sample_rate: int
    frame_rate: float
    num_codebooks: int
    cardinality: int
    channels: str
    family: str | None = None
    input_channels: int = 1
    chunk_length: int | None = None
    chunk_stride: int | None = None

    @property
    def hop(self) -> int:
        return round(self.sample_rate / self.frame_rate)

    def n_frames(self, n_samples: np.ndarray) -> np.ndarray:
        """Frames the codec emits for each ``n_samples`` (int64): ``ceil(n / hop)``, or for a chunked codec the
        chunks' frames, as ``EncodecCodec.n_frames`` counts them (``pipeline.codecs.encodec.Chunking``).

        >>> info = CodecInfo("x", 48000, 150.0, 2, 1024, "stereo", chunk_length=48000, chunk_stride=47520)
        >>> info.n_frames(np.array([1, 47520, 47521, 48000, 480000])).tolist()
        [1, 149, 151, 152, 1515]
        """
        if self.chunk_length is None or self.chunk_stride is None:
            return -(-n_samples // self.hop)
        whole = np.maximum(1, -(-n_samples // self.chunk_stride)) - 1  # chunks before the last one
        return whole * (self.chunk_length // self.hop) + -(-(n_samples - whole * self.chunk_stride) // self.hop)

    @property
    def interleaved(self) -> bool:
        """Stereo rows of a mono-input codec: L and R codes interleaved per codebook."""
        return self.channels == "stereo" and self.input_channels == 1


def merge_counts(layout: OutputLayout, plan: Plan) -> tuple[UnitCounts, dict[str, float]]:
    """Sum the done markers; refuse if a unit is missing or a marker's fingerprint differs from the plan's."""
    total, elapsed = UnitCounts(), 0.0
    reasons: Counter[str] = Counter()
    for unit in range(plan.n_units):
        path = layout.marker(unit)
        if not layout.store.exists(path):
            raise InconsistentOutput(f"unit {unit} has no done marker; rerun the job to finish it")
        marker = layout.read_marker(unit)
        if marker.get("fingerprint") != plan.fingerprint:
            raise InconsistentOutput(f"unit {unit} was written with fingerprint {marker.get('fingerprint')}, "
                                     f"the plan has {plan.fingerprint}")
        counts = UnitCounts(**marker["counts"])
        for f in fields(UnitCounts):
            if f.name != "failures_by_reason":
                setattr(total, f.name, getattr(total, f.name) + getattr(counts, f.name))
        reasons.update(counts.failures_by_reason)
        elapsed += marker.get("elapsed_s", 0.0)
    total.failures_by_reason = dict(sorted(reasons.items()))
    return total, {"unit_seconds": round(elapsed, 3)}


def finalize(layout: OutputLayout, plan: Plan, codec: CodecInfo) -> dict[str, Any]:
    """Write ``stats.json`` and ``README.md``; return the stats."""
    counts, timing = merge_counts(layout, plan)
    if counts.items != plan.n_items:
        raise InconsistentOutput(f"markers account for {counts.items} items, the plan has {plan.n_items}")
    shard_bytes = sum(layout.store.size(layout.shard(u, plan.n_units)) for u in range(plan.n_units))
    tokens = counts.frames * codec.num_codebooks
    stats = {
        **asdict(counts),
        "units": plan.n_units,
        "audio_hours": round(counts.audio_s / 3600, 6),
        "encoded_hours": round(counts.encoded_s / 3600, 6),
        "tokens": tokens,
        "shard_bytes": shard_bytes,
        # Whole files over tokens: includes ids, metadata and Parquet framing, so it is an upper bound.
        "bits_per_token": round(8 * shard_bytes / tokens, 3) if tokens else None,
        "codec": asdict(codec),
        "fingerprint": plan.fingerprint,
        "fingerprint_detail": plan.fingerprint_detail,
        **timing,
        "realtime_factor_per_unit_second": round(counts.audio_s / timing["unit_seconds"], 2)
        if timing["unit_seconds"] else None,
    }
    layout.store.write_atomic(layout.root / "stats.json", json_bytes(stats), layout.tmp)
    layout.store.write_atomic(layout.root / "README.md", dataset_card(stats, codec).encode(), layout.tmp)
    return stats


def dataset_card(stats: dict[str, Any], codec: CodecInfo) -> str:
    """The Hub dataset card: YAML ``configs`` (data files) + what the codes are and how to read them."""
    k = codec.num_codebooks
    tags = "\n".join(f"- {tag}" for tag in ("audio-tokens", codec.family) if tag)
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*.parquet
# Different for every output: datasets caches a local folder by its name and this YAML, so without it two
# folders of the same name could load each other's rows from the cache.
dataset_info:
  config_name: default
  download_size: {stats['shard_bytes']}
tags:
{tags}
---
# Audio tokens: `{codec.pretrained}`

RVQ codes of {stats['ok']} recordings ({_hours(stats['audio_hours'])} of audio, {stats['rows']} rows,
{stats['tokens']} tokens), made by `python -m pipeline.tokenize`. {_segments_sentence(stats)}

| codec | sample rate | frame rate | codebooks (K) | cardinality | channels |
|---|---|---|---|---|---|
| `{codec.pretrained}` | {codec.sample_rate} Hz | {codec.frame_rate:g} Hz | {k} | {codec.cardinality} | {codec.channels} |

Each row is one segment of one recording. `codes` is int16 `[K][n_frames]` with {_frames_sentence(codec)}; raw
codes only: delay patterns and special tokens are for the training reader.{_channels_sentence(codec)}

Columns: `id`, `source`, `segment_index`, `start_s`, `duration_s`, `n_samples`, `n_frames`, `codes`, `scales`
(float32 loudness scale per chunk of a normalising codec such as EnCodec 48 kHz, needed to decode at the original
level; null for other codecs), `sample_rate`, `source_sample_rate`, `source_channels`, `title`, `artist`,
`description`, `genre`, `key`, `instrument`, `name`, `bpm`, `moods`, `keywords`, `metadata` (JSON of any other
fields).

```python
from datasets import load_dataset
ds = load_dataset("path/to/this/folder", split="train")
codes = ds[0]["codes"]  # K lists of n_frames ints
```

Items: {stats['items']} listed, {stats['ok']} ok, {stats['failed']} failed, {stats['skipped']} skipped by policy
(reasons: {json.dumps(stats['failures_by_reason'])}; details in `failures/`).
Fingerprint `{stats['fingerprint']}` (full detail in `stats.json` and in every shard's Parquet metadata).
"""


def _hours(hours: float) -> str:
    """``12.34 h``, or minutes / seconds for small outputs (``0.00 h`` says nothing).

    >>> _hours(12.345), _hours(0.25), _hours(0.001)
    ('12.35 h', '15.0 min', '3.6 s')
    """
    if hours >= 1:
        return f"{hours:.2f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.1f} s"


def _segments_sentence(stats: dict[str, Any]) -> str:
    """How recordings were cut into rows, from the plan's segment policy (README "Tokens")."""
    seg = stats.get("fingerprint_detail", {}).get("segment")
    if not seg:
        return ""
    if seg.get("kind") == "clip":
        cut = f"Each row is the first {seg['max_s']:g} s of a recording (the rest is dropped)"
    else:
        hop = seg.get("hop_s") or seg["length_s"]
        cut = f"Rows are {seg['length_s']:g} s windows every {hop:g} s"
    pad = f"to the next multiple of {seg['bucket_s']:g} s" if seg.get("bucket_s") else \
        f"to {seg['length_s'] if seg.get('kind') != 'clip' else seg['max_s']:g} s"
    return (f"{cut}, zero-padded {pad} before encoding (codes trimmed to the audio); segments under "
            f"{seg['min_s']:g} s are dropped. Audio in no row: {stats.get('dropped_s', 0):.1f} s.")


def _frames_sentence(codec: CodecInfo) -> str:
    """How ``n_frames`` follows from ``n_samples``: one frame per hop, or per chunk for a chunked codec."""
    if codec.chunk_length is None or codec.chunk_stride is None:
        return f"`n_frames = ceil(n_samples / {codec.hop})`"
    rate = codec.sample_rate
    frames, stride = codec.chunk_length // codec.hop, codec.chunk_stride
    return (f"`n_frames` from the codec's chunking: {codec.chunk_length / rate:g} s chunks start every "
            f"{stride / rate:g} s and are encoded one by one, and a row's codes are the chunks' codes one after "
            f"another, {frames} frames per chunk but the last, which keeps the frames that cover the segment: "
            f"`n_frames = (n_chunks - 1) * {frames} + ceil((n_samples - (n_chunks - 1) * {stride}) / {codec.hop})` "
            f"with `n_chunks = ceil(n_samples / {stride})` (so decoding splits the codes back into chunks)")


def _channels_sentence(codec: CodecInfo) -> str:
    if codec.interleaved:
        return " Stereo rows interleave channels per codebook `[L0, R0, L1, R1, ...]`."
    if codec.input_channels == 2:
        return " The codec encodes both stereo channels together: K codebooks per row, not interleaved."
    return ""


def codec_info(pretrained: str, family: str, codec: Codec, channels: str) -> CodecInfo:
    """Output-level codec description: a mono-input codec run in stereo interleaves L and R, doubling K."""
    chunking = getattr(codec, "chunking", None)  # EncodecCodec's; the other codecs are not chunked
    info = CodecInfo(pretrained, codec.sample_rate, codec.sample_rate / codec.hop_length, codec.num_codebooks,
                     codec.cardinality, channels, family, codec.channels,
                     None if chunking is None else chunking.length, None if chunking is None else chunking.stride)
    if info.interleaved:
        info.num_codebooks *= 2
    return info
