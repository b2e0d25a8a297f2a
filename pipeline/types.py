"""The typed records that flow between stages: item -> decoded audio -> segment -> encoded segment.

Stages pass these and nothing looser (no dicts of unknown shape, no DictConfig).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True, frozen=True)
class AudioItem:
    """One input recording, as the plan lists it.

    Args:
        id: stable id, unique in the dataset (for a folder: the relative path without extension).
        source: where the audio is (local path, fsspec URL, or ``dataset:split[row]`` for HF rows).
        index: position in the sorted item list of the plan; units are slices of these.
        metadata: fields passed through to the output rows (sidecar JSON, manifest columns, ...).
        duration_s: duration if the source already knows it (manifests), else None.
    """

    id: str
    source: str
    index: int
    metadata: dict[str, Any] = field(default_factory=dict)
    duration_s: float | None = None


@dataclass(slots=True)
class DecodedAudio:
    """Audio after decode, channel policy and resampling to the codec rate.

    Args:
        samples: float32 array ``[C, n]`` at ``sample_rate`` (C = codec channels after the channel policy).
        sample_rate: the codec's sample rate in Hz.
        source_sample_rate: the file's own rate in Hz.
        source_channels: the file's own channel count.
    """

    samples: np.ndarray
    sample_rate: int
    source_sample_rate: int
    source_channels: int


@dataclass(slots=True)
class Segment:
    """The part of an item that becomes one output row, with its audio.

    Args:
        item: the item it comes from.
        unit: the unit the item belongs to.
        segment_index: 0-based position of this segment within its item.
        start_s: offset of the segment in the item, seconds.
        audio: float32 ``[C, n_samples]`` at the codec rate.
        padded_len: length in samples the segment is zero-padded to before encoding; depends only on the
            segment itself (window length or next bucket multiple), never on batch-mates.
        source_sample_rate: the item's original rate in Hz.
        source_channels: the item's original channel count.
    """

    item: AudioItem
    unit: int
    segment_index: int
    start_s: float
    audio: np.ndarray
    padded_len: int
    source_sample_rate: int
    source_channels: int

    @property
    def n_samples(self) -> int:
        return int(self.audio.shape[-1])


@dataclass(slots=True)
class EncodedSegment:
    """A segment's tokens plus what the output row needs (the audio is dropped here).

    Args:
        codes: int16 ``[K, n_frames]``, trimmed to ``codec.n_frames(n_samples)`` (``ceil(n_samples / hop)``, or
            the frames of the chunks for a chunked codec).
        scales: float32 ``[n_chunks]`` loudness scales of a normalising codec (EnCodec 48 kHz), one per chunk that
            starts inside the segment; decoding at the original level needs them. None for the other codecs.
    """

    item: AudioItem
    unit: int
    segment_index: int
    start_s: float
    n_samples: int
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    codes: np.ndarray
    scales: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return int(self.codes.shape[-1])

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.sample_rate


@dataclass(slots=True, frozen=True)
class Failure:
    """One item that did not make it into the output, and why.

    Args:
        stage: where it failed: ``read``, ``decode``, ``validate``, ``segment``, ``encode``, ``crash``, ``timeout``.
        reason: a short stable label used for totals (``empty``, ``truncated``, ``non_finite``, ...).
    """

    item_id: str
    source: str
    stage: str
    reason: str
    error_type: str
    message: str
