"""Segment stage: one decoded item -> the segments (rows) it yields, with offsets and padded lengths.

The padded length of a segment depends on the segment alone (see README "Tokens"), so its codes never
depend on what else is in the batch.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import numpy as np

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

    def padded_lengths(self) -> list[int]:
        """Every padded length a segment can get (the buckets), shortest first; the last is ``length``.

        >>> SegmentPolicy("window", length=100, hop=100, min_len=0, quantum=30).padded_lengths()
        [30, 60, 90, 100]
        >>> SegmentPolicy("window", length=100, hop=100, min_len=45, quantum=30).padded_lengths()
        [60, 90, 100]
        """
        smallest = self.padded_len(max(self.min_len, 1))
        return sorted({self.padded_len(n) for n in range(smallest, self.length + 1, self.quantum)} | {self.length})

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


class StreamSegmenter:
    """Cuts an item into segments as its audio streams in, holding at most one window of it.

    Produces exactly ``SegmentPolicy.spans`` of the whole item (then the ``min_len`` rule): every full window as
    soon as its last block arrives, the last (partial) one at ``finish``.

    Args:
        item, unit: what the segments belong to.
        policy: the segment rules, in samples at ``sample_rate``.
        sample_rate: rate of the blocks (the codec's).
        source_sample_rate, source_channels: the item's original format, copied into every segment.
    """

    def __init__(self, item: AudioItem, unit: int, policy: SegmentPolicy, sample_rate: int,
                 source_sample_rate: int, source_channels: int):
        self.item, self.unit, self.policy, self.sample_rate = item, unit, policy, sample_rate
        self.source = (source_sample_rate, source_channels)
        # The blocks (or their tails) holding samples from absolute position ``buf_start`` on. Kept as they came
        # and joined once per segment: growing one buffer block by block copied each sample ~5 times per 30 s
        # window (8% of a decode worker's time, profiled).
        self.blocks: collections.deque[np.ndarray] = collections.deque()
        self.buf_start = self.total = self.next_start = self.kept_end = 0
        self.covered = 0  # samples in at least one kept segment: the rest (gaps, dropped tails) counts as dropped
        self.last_end = 0  # end of the last window cut (kept or not)
        self.n_segments = 0
        self.closed = False  # clip mode, once its one segment is cut

    def push(self, block: np.ndarray) -> list[Segment]:
        """Add a ``[C, n]`` block; return the windows it completed."""
        if block.shape[1]:
            self.blocks.append(block)
        self.total += block.shape[1]
        out = []
        while not self.closed and self.next_start + self.policy.length <= self.total:
            out += self._cut(self.next_start, self.next_start + self.policy.length)
        return out

    def finish(self) -> tuple[list[Segment], float]:
        """The last, partial segment (if the policy keeps one) and the seconds dropped."""
        out = []
        if not self.closed and self.next_start < self.total and self.last_end < self.total:
            out = self._cut(self.next_start, self.total)
        self.blocks.clear()
        return out, (self.total - self.covered) / self.sample_rate

    def _cut(self, start: int, end: int) -> list[Segment]:
        chunk = self._take(start, end)
        self.last_end = end
        if self.policy.kind == "clip":
            self.closed = True
        self.next_start = start + self.policy.hop
        self._forget_before(min(self.next_start, self.total))
        if end - start < self.policy.min_len:
            return []
        self.covered += end - max(start, self.kept_end)  # overlapping windows count their samples once
        self.kept_end = end
        self.n_segments += 1
        return [Segment(self.item, self.unit, self.n_segments - 1, start / self.sample_rate, chunk,
                        self.policy.padded_len(end - start), *self.source)]

    def _take(self, start: int, end: int) -> np.ndarray:
        """A new contiguous ``[C, end - start]`` array of the buffered samples ``[start, end)`` (``start < end``)."""
        pieces, pos = [], self.buf_start
        for block in self.blocks:
            lo, hi = max(start - pos, 0), min(end - pos, block.shape[1])
            if lo < hi:
                pieces.append(block[:, lo:hi])
            pos += block.shape[1]
            if pos >= end:
                break
        return np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0].copy()

    def _forget_before(self, position: int) -> None:
        """Drop the buffered samples before ``position`` (a view keeps the rest of a partly used block)."""
        while self.blocks and self.buf_start + self.blocks[0].shape[1] <= position:
            self.buf_start += self.blocks.popleft().shape[1]
        if self.blocks and self.buf_start < position:
            self.blocks[0] = self.blocks[0][:, position - self.buf_start:]
            self.buf_start = position


def segment_item(item: AudioItem, unit: int, audio: DecodedAudio, policy: SegmentPolicy) -> SegmentResult:
    """Cut one whole decoded item into segments; short tails (and over-long clip ends) are dropped and counted."""
    cutter = StreamSegmenter(item, unit, policy, audio.sample_rate, audio.source_sample_rate, audio.source_channels)
    segments = cutter.push(audio.samples) if audio.samples.shape[-1] else []
    tail, dropped_s = cutter.finish()
    return SegmentResult(segments + tail, dropped_s)
