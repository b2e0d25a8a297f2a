"""Batch stage: segments -> fixed-shape batches, one shape per bucket (padded length).

Every batch of a bucket has the same ``[rows, row_channels, padded_len]`` shape, short batches are filled with zero
rows. A mono-input codec takes one row per channel (``row_channels`` 1; stereo segments take two rows, interleaved
after encoding); a stereo-input codec (EnCodec 48 kHz) takes one row per segment with both channels.
With a fixed shape each row's codes are independent of its batch-mates and position (README "Tokens"), so
rows per bucket are part of the fingerprint and never depend on how much data a rank happens to hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.config import BatchConfig
from pipeline.types import Segment


@dataclass(slots=True, frozen=True)
class BatchPolicy:
    """Rows per batch for each padded length.

    A row is what the codec encodes at once: one channel of a segment for a mono-input codec (stereo segments
    take two rows: L and R are encoded by the mono codec), or a whole segment for a stereo-input codec.

    Args:
        max_audio_samples: cap on ``rows * row_channels * padded_len``; bounds memory whatever the file lengths.
        max_rows: cap on rows.
        channels: rows per segment (mono codec: 1 mono, 2 stereo; stereo codec: 1).
        row_channels: audio channels in each row, the codec's input channels.
    """

    max_audio_samples: int
    max_rows: int
    channels: int = 1
    row_channels: int = 1

    @staticmethod
    def from_config(cfg: BatchConfig, sample_rate: int, channels: int, row_channels: int = 1,
                    codec_max_samples: int | None = None) -> "BatchPolicy":
        """``cfg``'s caps, within the codec's own limit on one encode (``Codec.max_batch_samples``, if any)."""
        samples = round(cfg.max_audio_s * sample_rate)
        return BatchPolicy(samples if codec_max_samples is None else min(samples, codec_max_samples),
                           cfg.max_rows, channels, row_channels)

    @staticmethod
    def for_codec(cfg: BatchConfig, channels: str, codec) -> "BatchPolicy":
        """The policy a run uses with ``codec`` (a ``Codec``) and channel policy ``channels``: a row is one channel
        for a mono-input codec (stereo segments take two rows), a whole segment for a stereo-input one."""
        rows_per_segment = (2 if channels == "stereo" else 1) // codec.channels
        return BatchPolicy.from_config(cfg, codec.sample_rate, rows_per_segment, codec.channels,
                                       codec.max_batch_samples)

    def rows_for(self, padded_len: int) -> int:
        """Rows in every batch of this bucket: as many as the caps allow, a multiple of ``channels``, at least one segment.

        >>> BatchPolicy(max_audio_samples=1000, max_rows=64, channels=2).rows_for(300)
        2
        >>> BatchPolicy(max_audio_samples=1000, max_rows=3, channels=1).rows_for(100)
        3
        >>> BatchPolicy(max_audio_samples=1000, max_rows=64, channels=1, row_channels=2).rows_for(250)
        2
        """
        rows = min(self.max_rows, self.max_audio_samples // (padded_len * self.row_channels))
        return max(self.channels, rows - rows % self.channels)


@dataclass(slots=True)
class Batch:
    """Segments that share one padded length, with the fixed row count of their bucket and channels per row."""

    padded_len: int
    rows: int
    segments: list[Segment] = field(default_factory=list)
    row_channels: int = 1

    def to_array(self) -> np.ndarray:
        """float32 ``[rows, row_channels, padded_len]``, zero-padded right and below.

        With one channel per row each segment's channels are consecutive rows; otherwise each segment is one row.
        """
        out = np.empty((self.rows, self.row_channels, self.padded_len), dtype=np.float32)
        self.fill(out)
        return out

    def fill(self, out: np.ndarray) -> None:
        """Write the batch into ``out`` (``[rows, row_channels, padded_len]`` float32, e.g. pinned memory), padding
        included: every element is written, so ``out`` may come uninitialised."""
        row = 0
        for seg in self.segments:
            for audio in self._rows_of(seg):
                n = audio.shape[-1]
                out[row, :, :n] = audio
                out[row, :, n:] = 0.0
                row += 1
        out[row:] = 0.0

    def _rows_of(self, seg: Segment) -> list[np.ndarray]:
        """The segment's rows, each ``[row_channels, n]``."""
        if seg.audio.shape[0] % self.row_channels:
            raise ValueError(f"a {seg.audio.shape[0]}-channel segment does not split into "
                             f"{self.row_channels}-channel rows")
        return np.split(seg.audio, seg.audio.shape[0] // self.row_channels)


class Batcher:
    """Collects segments per bucket and hands out batches when full (``add``) or on demand (``flush``)."""

    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self._open: dict[int, Batch] = {}

    def add(self, segment: Segment) -> Batch | None:
        """Queue a segment; returns its bucket's batch if this segment filled it."""
        batch = self._open.get(segment.padded_len)
        if batch is None:
            batch = self._open[segment.padded_len] = Batch(segment.padded_len, self.policy.rows_for(segment.padded_len),
                                                           row_channels=self.policy.row_channels)
        batch.segments.append(segment)
        if len(batch.segments) * self.policy.channels >= batch.rows:
            return self._open.pop(segment.padded_len)
        return None

    def flush(self) -> list[Batch]:
        """Every partial batch, to be encoded with zero rows filling the rest."""
        batches = list(self._open.values())
        self._open.clear()
        return batches
