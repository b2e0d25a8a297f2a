"""Segment stage: one decoded item -> the segments (rows) it yields, with offsets and padded lengths.

The padded length of a segment depends on the segment alone (see DESIGN.md "Tokens"), so its codes never
depend on what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import SegmentConfig
from pipeline.types import AudioItem, DecodedAudio, Segment


@dataclass(slots=True, frozen=True)
class SegmentPolicy:
    """Segment rules in samples at the codec rate.

    Args:
        kind: ``window`` (fixed windows every ``hop`` samples) or ``clip`` (the head of the item up to ``length``).
        length: window length, or the clip cap, in samples.
        hop: window start spacing in samples (window only).
        min_len: segments shorter than this are dropped (counted, never silent).
        quantum: padded lengths are multiples of this, capped at ``length``.
    """

    kind: str
    length: int
    hop: int
    min_len: int
    quantum: int

    @staticmethod
    def from_config(cfg: SegmentConfig, sample_rate: int) -> "SegmentPolicy":
        cap_s = cfg.length_s if cfg.kind == "window" else cfg.max_s
        length = round(cap_s * sample_rate)
        hop = round((cfg.hop_s or cfg.length_s) * sample_rate)
        quantum = round(cfg.bucket_s * sample_rate) if cfg.bucket_s else length
        if hop <= 0 or length <= 0 or quantum <= 0:
            raise ValueError("segment lengths must be positive")
        return SegmentPolicy(cfg.kind, length, hop, round(cfg.min_s * sample_rate), min(quantum, length))

    def padded_len(self, n_samples: int) -> int:
        """Length a segment of ``n_samples`` is zero-padded to: the next multiple of the quantum, at most ``length``.

        >>> SegmentPolicy("window", length=100, hop=100, min_len=0, quantum=30).padded_len(31)
        60
        >>> SegmentPolicy("window", length=100, hop=100, min_len=0, quantum=30).padded_len(95)
        100
        """
        return min(self.length, math.ceil(n_samples / self.quantum) * self.quantum)

    def spans(self, n_samples: int) -> list[tuple[int, int]]:
        """``(start, end)`` of every segment cut from ``n_samples`` samples, before the ``min_len`` rule.

        Windows start every ``hop`` and stop once one reaches the end, so the tail is covered exactly once.

        >>> SegmentPolicy("window", length=10, hop=10, min_len=0, quantum=10).spans(25)
        [(0, 10), (10, 20), (20, 25)]
        >>> SegmentPolicy("window", length=10, hop=5, min_len=0, quantum=10).spans(20)
        [(0, 10), (5, 15), (10, 20)]
        >>> SegmentPolicy("clip", length=10, hop=10, min_len=0, quantum=10).spans(25)
        [(0, 10)]
        """
        if self.kind == "clip":
            return [(0, min(n_samples, self.length))] if n_samples > 0 else []
        spans, start = [], 0
        while start < n_samples:
            spans.append((start, min(start + self.length, n_samples)))
            if start + self.length >= n_samples:
                break
            start += self.hop
        return spans


@dataclass(slots=True)
class SegmentResult:
    """The segments of one item, and the audio the policy dropped (seconds)."""

    segments: list[Segment]
    dropped_s: float


def segment_item(item: AudioItem, unit: int, audio: DecodedAudio, policy: SegmentPolicy) -> SegmentResult:
    """Cut one decoded item into segments; short tails (and the rest of over-long clips) are dropped and counted."""
    n = audio.samples.shape[-1]
    segments: list[Segment] = []
    kept = 0
    for start, end in policy.spans(n):
        if end - start < policy.min_len:
            continue
        # Copy: a view would keep the whole decoded file alive for as long as any one segment is queued.
        chunk = audio.samples[:, start:end].copy()
        segments.append(
            Segment(
                item=item,
                unit=unit,
                segment_index=len(segments),
                start_s=start / audio.sample_rate,
                audio=chunk,
                padded_len=policy.padded_len(end - start),
                source_sample_rate=audio.source_sample_rate,
                source_channels=audio.source_channels,
            )
        )
        kept = max(kept, end)
    # Only the last span can be short, so what is dropped is always the tail after the last kept segment.
    return SegmentResult(segments, dropped_s=(n - kept) / audio.sample_rate)
