"""Batch stage: segments -> fixed-shape batches, one shape per bucket (padded length).

Every batch of a bucket has the same ``[rows, 1, padded_len]`` shape, short batches are filled with zero rows.
With a fixed shape each row's codes are independent of its batch-mates and position (DESIGN.md "Tokens"), so
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

    A row is one channel of one segment (stereo segments take two rows: L and R are encoded by the mono codec).

    Args:
        max_audio_samples: cap on ``rows * padded_len``; bounds memory whatever the file lengths.
        max_rows: cap on rows.
        channels: rows per segment (1 mono, 2 stereo).
    """

    max_audio_samples: int
    max_rows: int
    channels: int = 1

    @staticmethod
    def from_config(cfg: BatchConfig, sample_rate: int, channels: int) -> "BatchPolicy":
        return BatchPolicy(round(cfg.max_audio_s * sample_rate), cfg.max_rows, channels)

    def rows_for(self, padded_len: int) -> int:
        """Rows in every batch of this bucket: as many as the caps allow, a multiple of ``channels``, at least one segment.

        >>> BatchPolicy(max_audio_samples=1000, max_rows=64, channels=2).rows_for(300)
        2
        >>> BatchPolicy(max_audio_samples=1000, max_rows=3, channels=1).rows_for(100)
        3
        """
        rows = min(self.max_rows, self.max_audio_samples // padded_len)
        return max(self.channels, rows - rows % self.channels)


@dataclass(slots=True)
class Batch:
    """Segments that share one padded length, with the fixed row count of their bucket."""

    padded_len: int
    rows: int
    segments: list[Segment] = field(default_factory=list)

    def to_array(self) -> np.ndarray:
        """float32 ``[rows, 1, padded_len]``: each segment's channels as consecutive rows, zero-padded right and below."""
        out = np.zeros((self.rows, 1, self.padded_len), dtype=np.float32)
        row = 0
        for seg in self.segments:
            for channel in seg.audio:
                out[row, 0, : channel.shape[-1]] = channel
                row += 1
        return out


class Batcher:
    """Collects segments per bucket and hands out batches when full (``add``) or on demand (``flush``)."""

    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self._open: dict[int, Batch] = {}

    def add(self, segment: Segment) -> Batch | None:
        """Queue a segment; returns its bucket's batch if this segment filled it."""
        batch = self._open.get(segment.padded_len)
        if batch is None:
            batch = self._open[segment.padded_len] = Batch(segment.padded_len, self.policy.rows_for(segment.padded_len))
        batch.segments.append(segment)
        if len(batch.segments) * self.policy.channels >= batch.rows:
            return self._open.pop(segment.padded_len)
        return None

    def flush(self) -> list[Batch]:
        """Every partial batch, to be encoded with zero rows filling the rest."""
        batches = list(self._open.values())
        self._open.clear()
        return batches
