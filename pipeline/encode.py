"""Encode stage: a fixed-shape batch -> one EncodedSegment per segment (codes trimmed, channels interleaved)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.batching import Batch
from pipeline.codecs.base import Codec
from pipeline.types import EncodedSegment


def encode_batch(codec: Codec, batch: Batch) -> list[EncodedSegment]:
    """Run the codec on one batch and split the result back into segments."""
    audio = torch.from_numpy(batch.to_array())
    if codec.device.type == "cuda":
        # Pinned host memory lets the copy overlap with the previous batch still running on the GPU.
        audio = audio.pin_memory().to(codec.device, non_blocking=True)
    codes = codec.encode(audio).cpu().numpy()  # [rows, K, T]
    out, row = [], 0
    for seg in batch.segments:
        channels = seg.audio.shape[0]
        n_frames = codec.n_frames(seg.n_samples)
        out.append(_encoded(seg, interleave(codes[row : row + channels, :, :n_frames]), codec.sample_rate))
        row += channels
    return out


def interleave(codes: np.ndarray) -> np.ndarray:
    """``[C, K, T]`` per-channel codes -> ``[C*K, T]`` as ``[ch0_k0, ch1_k0, ch0_k1, ch1_k1, ...]``.

    This is audiocraft's ``InterleaveStereoCompressionModel`` order for MusicGen-stereo (C = 2 gives K = 8 from
    the 4-codebook mono codec). With C = 1 it is a reshape.

    >>> interleave(np.array([[[1, 1]], [[2, 2]]])).tolist()  # C=2, K=1, T=2
    [[1, 1], [2, 2]]
    """
    c, k, t = codes.shape
    return np.ascontiguousarray(codes.transpose(1, 0, 2).reshape(k * c, t))


def _encoded(seg, codes: np.ndarray, sample_rate: int) -> EncodedSegment:
    # int16 halves the storage of int32; safe because every supported codebook has <= 32768 entries.
    return EncodedSegment(
        item=seg.item,
        unit=seg.unit,
        segment_index=seg.segment_index,
        start_s=seg.start_s,
        n_samples=seg.n_samples,
        sample_rate=sample_rate,
        source_sample_rate=seg.source_sample_rate,
        source_channels=seg.source_channels,
        codes=codes.astype(np.int16),
    )
