"""The codec's encode captured as one CUDA graph per batch shape and replayed (``codec.cuda_graph``).

Why: eager EnCodec launches a few kernels per frame in its LSTM (thousands per 30 s batch); a replayed graph is
one launch per batch, and the GPU runs the kernels back to back. Measured on an H100 (BENCHMARKS.md, sixth
session): no gain at 64 rows of 30 s, the codec's own rate and the pipeline's are the same with and without, and
the launch thread's 60-90% of a core stays (most likely the thread waiting in the driver for a busy GPU rather
than issuing work; not profiled). Off by default; kept because it is exact and tested, and small batches (fewer rows per LSTM step) may
gain, which was not measured.

Tokens: a graph replays the kernels its capture recorded, the same ones eager runs (same shapes, same precision
flags, same cuDNN choices). That is checked, not assumed: each capture is replayed on two batches of noise whose
eager codes (and scales) were computed just before (two, so nothing input-dependent was baked in), and a graph
whose codes differ in any position is dropped and that shape runs eager. A shape whose encode syncs with the host
(found before capturing, under ``torch.cuda.set_sync_debug_mode("error")``: a sync would invalidate the capture)
or whose capture fails also runs eager; each says why in ``failed``. Hence the option is not in the fingerprint.

Memory: graphs share one memory pool, so a later graph's static outputs may sit in memory an earlier graph uses
as scratch. Safe as used here, and only so: replays run one at a time on one stream, and each replay's outputs
are copied out (``encode.launch_batch`` queues the copy right behind the replay) before another graph replays;
static inputs live outside the pool. A failed or dropped capture gets no pool reuse: the next capture starts a
new one. The eager warm-up's cache is released before each capture (``torch.cuda.graph`` empties it), so the
peak is one eager batch, not two; a shape that falls back to eager needs its own peak beside the pool.

Capture happens at start-up (``prepare.build_stages`` through ``encode.warm_up``) for every bucket shape, before the
launch threads exist; a shape met later without a graph runs eager.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]  # [rows, row_channels, padded_len]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input: torch.Tensor  # static input the batch is copied into before each replay
    codes: torch.Tensor  # static outputs, overwritten by the next replay of this graph
    scales: torch.Tensor | None


class CudaGraphs:
    """Per-shape CUDA graphs of ``codec.encode_with_scales`` on ``codec.device``.

    Attributes:
        captured: shapes with a graph, in capture order.
        failed: shape -> why it runs eager (capture error, or replayed codes that differ from eager's).
    """

    def __init__(self, codec):
        self.codec = codec
        self._graphs: dict[Shape, _Graph] = {}
        self._pool = None  # created with the first capture, dropped after a failed one
        # One stream for every warm-up and capture: cuBLAS keeps a workspace per (handle, stream), allocated by the
        # warm-up outside the pool; a capture on a stream the warm-up did not use would allocate it inside.
        self._stream = None
        self.captured: list[Shape] = []
        self.failed: dict[Shape, str] = {}

    def capture(self, shape: Shape) -> bool:
        """Capture the encode at ``shape`` (once), check it against eager; True when the shape now replays."""
        shape = tuple(int(s) for s in shape)
        if shape in self._graphs or shape in self.failed:
            return shape in self._graphs
        device = self.codec.device
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            try:
                graph = self._capture_checked(shape, device)
            except Exception as e:  # noqa: BLE001 - any capture failure means "this shape runs eager"
                graph = f"capture failed: {type(e).__name__}: {str(e)[:300]}"
            finally:
                # A capture that raised in its end leaves the capture stream current (torch.cuda.graph's exit
                # ends the capture before it restores the stream).
                torch.cuda.set_stream(current)
        if isinstance(graph, _Graph):
            self._graphs[shape] = graph
            self.captured.append(shape)
            log.info("CUDA graph captured for batches of %s", _name(shape))
            return True
        self._pool = None  # a failed or dropped capture may leave the pool in use: the next one starts afresh
        self.failed[shape] = graph
        log.warning("CUDA graph for batches of %s: %s; that shape runs eager", _name(shape), graph)
        return False

    def _capture_checked(self, shape: Shape, device: torch.device) -> _Graph | str:
        """A graph whose replays give the eager codes on two noise batches, or why not (a string)."""
        gen = torch.Generator(device).manual_seed(0)
        inputs = [0.1 * torch.randn(shape, device=device, generator=gen) for _ in range(2)]
        static_in = inputs[0]  # the graph's input: each replay copies its batch in here
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):  # capture needs a warm-up off the default stream
            refs = [self.codec.encode_with_scales(inputs[1])]  # compiles, autotunes, makes cuDNN/cuBLAS handles
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")  # a host sync raises here, before any capture begins
            try:
                refs.insert(0, self.codec.encode_with_scales(inputs[0]))
            finally:
                torch.cuda.set_sync_debug_mode(mode)
            refs = [(codes.cpu(), None if scales is None else scales.cpu()) for codes, scales in refs]
        torch.cuda.current_stream(device).wait_stream(self._stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (pinning memory, say) do not invalidate the capture. Entering
        # synchronises and empties the cache, so the capture reuses the warm-up's memory.
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            codes, scales = self.codec.encode_with_scales(static_in)
        for x, (ref_codes, ref_scales) in zip(inputs, refs):
            static_in.copy_(x)
            graph.replay()
            differ = int((codes.cpu() != ref_codes).sum())
            if differ or (scales is not None and not torch.equal(scales.cpu(), ref_scales)):
                return f"replayed codes differ from eager on a noise batch ({differ} of {ref_codes.numel()} codes)"
        return _Graph(graph, static_in, codes, scales)

    def replay(self, host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Copy ``host`` (pinned) into the graph of its shape and queue the replay on the current stream; the
        graph's static outputs, valid until the next replay of any graph (the pool is shared): queue their copy
        before replaying again. None when the shape has no graph (run eager)."""
        g = self._graphs.get(tuple(host.shape))
        if g is None:
            return None
        g.input.copy_(host, non_blocking=True)
        g.graph.replay()
        return g.codes, g.scales

    def describe(self) -> str:
        """``CUDA graphs for 64x1x960000`` (and the shapes that run eager), for the run summary."""
        parts = []
        if self.captured:
            parts.append("CUDA graphs for " + ", ".join(map(_name, self.captured)))
        if self.failed:
            parts.append("eager (graph failed) for " + ", ".join(map(_name, self.failed)))
        return "; ".join(parts)


def _name(shape: Shape) -> str:
    """``64x1x960000``."""
    return "x".join(map(str, shape))
