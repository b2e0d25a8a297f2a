"""Encode stage: a fixed-shape batch -> one EncodedSegment per segment (codes trimmed, channels interleaved)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.batching import Batch
from pipeline.codecs.base import Codec
from pipeline.types import EncodedSegment, Segment


def check_channels(codec: Codec, channels: str) -> None:
    """Fail fast when the channel policy cannot feed the codec.

    A mono-input codec takes any policy (``stereo`` encodes L and R apart and interleaves them). A stereo-input
    codec (EnCodec 48 kHz) needs ``stereo``: that policy duplicates mono files and keeps the first two channels of
    others, so every segment has exactly the two channels the codec expects.

    Args:
        codec: the loaded codec.
        channels: the run's channel policy, ``mono`` or ``stereo``.
    """
    if codec.channels == 1 or (codec.channels == 2 and channels == "stereo"):
        return
    if codec.channels == 2:
        raise ValueError(f"the codec takes stereo input, but channels={channels}; set channels=stereo (mono files "
                         "are duplicated to both channels, files with more channels keep the first two)")
    raise ValueError(f"the codec takes {codec.channels}-channel input; the pipeline feeds codecs 1 or 2 channels")


def encode_batch(codec: Codec, batch: Batch) -> list[EncodedSegment]:
    """Run the codec on one batch and split the result back into segments."""
    audio = torch.from_numpy(batch.to_array())
    if codec.device.type == "cuda":
        # Pinned host memory lets the copy overlap with the previous batch still running on the GPU.
        audio = audio.pin_memory().to(codec.device, non_blocking=True)
    codes, scales = codec.encode_with_scales(audio)  # [rows, K, T], [rows, n_chunks] or None
    codes = codes.cpu().numpy()
    scales = None if scales is None else scales.float().cpu().numpy()
    out, row = [], 0
    for seg in batch.segments:
        rows = slice(row, row + seg.audio.shape[0] // batch.row_channels)  # mono codec: one row per channel
        n_frames = codec.n_frames(seg.n_samples)
        out.append(_encoded(seg, interleave(codes[rows, :, :n_frames]), _segment_scales(codec, scales, rows, seg),
                            codec.sample_rate))
        row = rows.stop
    return out


def interleave(codes: np.ndarray) -> np.ndarray:
    """``[C, K, T]`` per-channel codes -> ``[C*K, T]`` as ``[ch0_k0, ch1_k0, ch0_k1, ch1_k1, ...]``.

    This is audiocraft's ``InterleaveStereoCompressionModel`` order for MusicGen-stereo (C = 2 gives K = 8 from
    the 4-codebook mono codec). With C = 1 (a mono row, or one row of a stereo-input codec) it is a reshape.

    >>> interleave(np.array([[[1, 1]], [[2, 2]]])).tolist()  # C=2, K=1, T=2
    [[1, 1], [2, 2]]
    """
    c, k, t = codes.shape
    return np.ascontiguousarray(codes.transpose(1, 0, 2).reshape(k * c, t))


def _segment_scales(codec: Codec, scales: np.ndarray | None, rows: slice, seg: Segment) -> np.ndarray | None:
    """The segment's float32 scales, one per chunk that starts inside it, or None for codecs without scales.

    Chunks that start past the segment's end cover only its zero padding, as its codes are trimmed past it too.
    Only EnCodec returns scales, and it counts its chunks with ``n_chunks``. Several rows (a normalising mono
    codec in stereo) store the first row's chunks, then the next row's.
    """
    if scales is None:
        return None
    return np.ascontiguousarray(scales[rows, : codec.n_chunks(seg.n_samples)].reshape(-1), dtype=np.float32)


def _encoded(seg: Segment, codes: np.ndarray, scales: np.ndarray | None, sample_rate: int) -> EncodedSegment:
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
        scales=scales,
    )
