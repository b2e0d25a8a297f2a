"""Finalize stage, run once after every unit is done: merge per-unit counts into ``stats.json``, write the
dataset card ``README.md`` (with the ``configs`` YAML that makes ``datasets.load_dataset(OUT)`` work).

It is idempotent (atomic writes of pure functions of the markers), so two ranks racing to it are harmless.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.layout import OutputLayout, atomic_write_bytes, atomic_write_json
from pipeline.plan import Plan
from pipeline.writer import UnitCounts


class InconsistentOutput(RuntimeError):
    """Units of one folder disagree (fingerprint) or are missing."""


@dataclass
class CodecInfo:
    """What a training job needs to know about the codes."""

    pretrained: str
    sample_rate: int
    frame_rate: float
    num_codebooks: int
    cardinality: int
    channels: str


def merge_counts(layout: OutputLayout, plan: Plan) -> tuple[UnitCounts, dict[str, float]]:
    """Sum the done markers; refuse if a unit is missing or a marker's fingerprint differs from the plan's."""
    total, elapsed = UnitCounts(), 0.0
    reasons: Counter[str] = Counter()
    for unit in range(plan.n_units):
        path = layout.marker(unit)
        if not path.exists():
            raise InconsistentOutput(f"unit {unit} has no done marker; rerun the job to finish it")
        marker = json.loads(path.read_text())
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
    shard_bytes = sum(layout.shard(u, plan.n_units).stat().st_size for u in range(plan.n_units))
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
    atomic_write_json(layout.root / "stats.json", stats, layout.tmp)
    atomic_write_bytes(layout.root / "README.md", dataset_card(stats, codec).encode(), layout.tmp)
    return stats


def dataset_card(stats: dict[str, Any], codec: CodecInfo) -> str:
    """The Hub dataset card: YAML ``configs`` (data files) + what the codes are and how to read them."""
    k = codec.num_codebooks
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
- audio-tokens
- encodec
---
# Audio tokens: `{codec.pretrained}`

RVQ codes of {stats['ok']} recordings ({stats['audio_hours']:.2f} h of audio, {stats['rows']} rows,
{stats['tokens']} tokens), made by `python -m pipeline.tokenize`.

| codec | sample rate | frame rate | codebooks (K) | cardinality | channels |
|---|---|---|---|---|---|
| `{codec.pretrained}` | {codec.sample_rate} Hz | {codec.frame_rate:g} Hz | {k} | {codec.cardinality} | {codec.channels} |

Each row is one segment of one recording. `codes` is int16 `[K][n_frames]` with
`n_frames = ceil(n_samples / {round(codec.sample_rate / codec.frame_rate)})`; raw codes only: delay patterns and
special tokens are for the training reader.{" Stereo rows interleave channels per codebook `[L0, R0, L1, R1, ...]`." if codec.channels == "stereo" else ""}

Columns: `id`, `source`, `segment_index`, `start_s`, `duration_s`, `n_samples`, `n_frames`, `codes`,
`sample_rate`, `source_sample_rate`, `source_channels`, `title`, `artist`, `description`, `genre`, `key`,
`instrument`, `name`, `bpm`, `moods`, `keywords`, `metadata` (JSON of any other fields).

```python
from datasets import load_dataset
ds = load_dataset("path/to/this/folder", split="train")
codes = ds[0]["codes"]  # K lists of n_frames ints
```

Items: {stats['items']} listed, {stats['ok']} ok, {stats['failed']} failed, {stats['skipped']} skipped by policy
(reasons: {json.dumps(stats['failures_by_reason'])}; details in `failures/`).
Fingerprint `{stats['fingerprint']}` (full detail in `stats.json` and in every shard's Parquet metadata).
"""


def codec_info(pretrained: str, sample_rate: int, hop_length: int, num_codebooks: int, cardinality: int,
               channels: str) -> CodecInfo:
    """Output-level codec description (stereo doubles K through interleaving)."""
    k = num_codebooks * (2 if channels == "stereo" else 1)
    return CodecInfo(pretrained, sample_rate, sample_rate / hop_length, k, cardinality, channels)
