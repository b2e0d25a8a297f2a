"""Encode stage: a fixed-shape batch -> one EncodedSegment per segment (codes trimmed, channels interleaved)."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

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


@dataclass
class LaunchedBatch:
    """A batch whose encode was queued on the device: codes land in host memory when ``ready`` fires.

    On CUDA the codes' copy to pinned host memory is queued right behind the encode, so collecting batch N after
    launching batch N+1 does not wait for N+1: the GPU always has the next batch queued while the CPU builds,
    pins and commits the previous ones. On CPU everything has already run by the time this exists. From a
    ``Launcher`` thread, ``queued`` is the thread's job and the other fields are set when it is done.
    """

    batch: Batch
    codes: torch.Tensor | None = None  # [rows, K, T] on the host (pinned on CUDA)
    scales: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None
    queued: Future | None = None

    def done(self) -> bool:
        """True once the codes are on the host (collecting then does not wait)."""
        if self.queued is not None and not self.queued.done():
            return False
        return self.ready is None or self.ready.query()


def fill_host(codec: Codec, batch: Batch) -> torch.Tensor:
    """The batch as a float32 ``[rows, row_channels, padded_len]`` host tensor, pinned on CUDA (filled directly:
    no pageable copy first)."""
    if codec.device.type != "cuda":
        return torch.from_numpy(batch.to_array())
    with torch.cuda.device(codec.device):  # a thread starts on device 0 (the current device is per thread)
        host = torch.empty((batch.rows, batch.row_channels, batch.padded_len), dtype=torch.float32, pin_memory=True)
    batch.fill(host.numpy())
    return host


def launch_batch(codec: Codec, batch: Batch, launched: LaunchedBatch | None = None,
                 host: torch.Tensor | None = None) -> LaunchedBatch:
    """Queue one batch's encode (CUDA: asynchronous; CPU: runs now). Collect it with ``collect_batch``.

    ``launched``: fill this one in (a ``Launcher`` thread's) instead of making a new one. ``host``: the batch
    already filled by ``fill_host``.
    """
    launched = launched or LaunchedBatch(batch)
    host = fill_host(codec, batch) if host is None else host
    if codec.device.type != "cuda":
        launched.codes, launched.scales = codec.encode_with_scales(host)
        return launched
    # The copy does not block the host; the caching host allocator keeps the pinned buffer alive until it is done.
    with torch.cuda.device(codec.device):
        replayed = None if codec.graphs is None else codec.graphs.replay(host)  # None: no graph for this shape
        codes, scales = replayed if replayed is not None else \
            codec.encode_with_scales(host.to(codec.device, non_blocking=True))
        launched.codes = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True).copy_(codes, non_blocking=True)
        launched.scales = None if scales is None else \
            torch.empty(scales.shape, dtype=scales.dtype, pin_memory=True).copy_(scales, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    launched.ready = ready
    return launched


class Launcher:
    """Launches batches on the codec: on CUDA from background threads, on CPU in the caller.

    Queuing an encode on CUDA is not free for the host: filling the pinned batch (hundreds of MB at wide batches)
    and, above all, launching the kernels: EnCodec's LSTM launches a few kernels per frame (1500 frames a 30 s row),
    past the driver's queue of pending launches, so queuing a batch blocked until the GPU had nearly run it
    ("Command Buffer Full" in a profile of one 64-row batch: the host was blocked 96% of the encode). From threads
    (torch releases the GIL in its ops, numpy in large copies) the loop meanwhile takes decoded audio and commits.

    Two threads, one job each, each in launch order: one fills the next batch's pinned memory (~45 ms for 64 rows
    of 30 s) while the other is still queuing the current batch's kernels, so the launch thread can go from one
    batch's kernels straight to the next. (Measured on an H200 with 14 decode workers: no change beyond the noise.)
    The launch thread's CPU (60-90% of a core on an H100, with or without ``codec.cuda_graph``, whose batch is one
    copy and one graph launch) is then most likely the thread waiting in the driver while the GPU runs the batch
    before (not profiled).

    Args:
        codec: the codec batches go to.
        threaded: launch from the threads (default: on CUDA only; the tests force it on CPU to cover the loop's
            path with batches in flight).
    """

    def __init__(self, codec: Codec, threaded: bool | None = None):
        self.codec = codec
        threaded = codec.device.type == "cuda" if threaded is None else threaded
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fill") if threaded else None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="launch") if threaded else None
        self.fill_cpu_s = 0.0  # the fill thread's CPU seconds (pinned batches)
        self.cpu_s = 0.0  # the launch thread's CPU seconds (queuing copies and kernels)

    def launch(self, batch: Batch) -> LaunchedBatch:
        """Queue ``batch``; a launch error surfaces from ``collect_batch`` (CUDA) or here (CPU)."""
        if self._thread is None:
            return launch_batch(self.codec, batch)
        launched = LaunchedBatch(batch)
        filled = self._filler.submit(self._fill_in_thread, batch)
        # launch_batch is looked up at call time, so the benchmark's instant codec (which patches it) runs here too.
        launched.queued = self._thread.submit(self._launch_in_thread, batch, launched, filled)
        return launched

    def _fill_in_thread(self, batch: Batch) -> torch.Tensor:
        t0 = time.thread_time()
        try:
            return fill_host(self.codec, batch)
        finally:
            self.fill_cpu_s += time.thread_time() - t0

    def _launch_in_thread(self, batch: Batch, launched: LaunchedBatch, filled: Future) -> None:
        host = filled.result()  # a fill error is this batch's launch error
        t0 = time.thread_time()
        try:
            launch_batch(self.codec, batch, launched, host)
        finally:
            self.cpu_s += time.thread_time() - t0

    def close(self) -> None:
        if self._thread is not None:
            self._filler.shutdown(wait=True)
            self._thread.shutdown(wait=True)


def warm_up(codec: Codec, rows: int, padded_len: int, row_channels: int = 1,
            other_shapes: tuple[tuple[int, int], ...] | list[tuple[int, int]] = ()) -> float:
    """On CUDA, encode one batch of zeros of the given shape before the loop: ``torch.compile`` builds its graph
    (~10 s for EnCodec) and cuDNN and the caching allocators settle, so the loop's first units (and its clock)
    do not pay for it. With CUDA graphs (``codec.graphs``), first capture one per bucket: this shape and each
    ``(rows, padded_len)`` of ``other_shapes``. Returns the seconds it took; nothing on CPU (0.0)."""
    if codec.device.type != "cuda":
        return 0.0
    t0 = time.monotonic()
    if codec.graphs is not None:
        for n_rows, length in [(rows, padded_len), *other_shapes]:
            codec.graphs.capture((n_rows, row_channels, length))
    collect_batch(codec, launch_batch(codec, Batch(padded_len, rows, row_channels=row_channels)))
    return time.monotonic() - t0


def collect_batch(codec: Codec, launched: LaunchedBatch) -> list[EncodedSegment]:
    """Wait for a launched batch and split its codes back into segments (codes trimmed, channels interleaved)."""
    if launched.queued is not None:
        launched.queued.result()  # re-raises what the launcher thread raised for this batch
    if launched.ready is not None:
        launched.ready.synchronize()  # also where an asynchronous CUDA error of this batch surfaces
    batch = launched.batch
    codes = launched.codes.numpy()
    scales = None if launched.scales is None else launched.scales.float().numpy()
    out, row = [], 0
    for seg in batch.segments:
        rows = slice(row, row + seg.audio.shape[0] // batch.row_channels)  # mono codec: one row per channel
        n_frames = codec.n_frames(seg.n_samples)
        out.append(_encoded(seg, interleave(codes[rows, :, :n_frames]), _segment_scales(codec, scales, rows, seg),
                            codec.sample_rate))
        row = rows.stop
    return out


def encode_batch(codec: Codec, batch: Batch) -> list[EncodedSegment]:
    """Run the codec on one batch and split the result back into segments (launch + collect, synchronously)."""
    return collect_batch(codec, launch_batch(codec, batch))


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
