"""The codec's encode captured as one CUDA graph per batch shape and replayed (``codec.cuda_graph``).

Why: eager EnCodec launches a few kernels per frame in its LSTM (thousands per 30 s batch). Queuing them kept the
launch thread 76-90% busy on an H200 (competing with the decode workers for cores) and the GPU waits on launches
between the LSTM's small kernels. A replayed graph is one launch per batch, and the GPU runs the kernels back to
back.

Tokens: a graph replays the kernels its capture recorded, the same ones eager runs (same shapes, same precision
flags, same cuDNN choices). That is checked, not assumed: each capture is replayed on a batch of noise whose eager
codes (and scales) were computed just before, and a graph whose codes differ in any position is dropped and that
shape runs eager. A shape whose capture fails (a host sync inside the encode, an op that cannot be captured) also
runs eager; both say why in ``failed``. Hence the option is not in the fingerprint.

Memory: all graphs share one memory pool. Safe because the replays run one after another on one stream and every
graph's static input and outputs stay alive, so no graph's intermediates can overlap another's inputs or outputs.
The eager warm-up's cached blocks are released before each capture, so the peak is one eager batch, not two.

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

    def __init__(self, codec, warmup_iters: int = 2):
        self.codec = codec
        self.warmup_iters = warmup_iters
        self._graphs: dict[Shape, _Graph] = {}
        self._pool = None  # created with the first capture
        self.captured: list[Shape] = []
        self.failed: dict[Shape, str] = {}

    def capture(self, shape: Shape) -> bool:
        """Capture the encode at ``shape`` (once), check it against eager; True when the shape now replays."""
        shape = tuple(int(s) for s in shape)
        if shape in self._graphs or shape in self.failed:
            return shape in self._graphs
        device = self.codec.device
        with torch.cuda.device(device):
            try:
                graph = self._capture_checked(shape, device)
            except Exception as e:  # noqa: BLE001 - any capture failure means "this shape runs eager"
                graph, reason = None, f"capture failed: {type(e).__name__}: {str(e)[:300]}"
            else:
                reason = None if isinstance(graph, _Graph) else graph
            torch.cuda.empty_cache()  # what the eager warm-up or a failed capture cached
        if isinstance(graph, _Graph):
            self._graphs[shape] = graph
            self.captured.append(shape)
            log.info("CUDA graph captured for batches of %s", "x".join(map(str, shape)))
            return True
        self.failed[shape] = reason
        log.warning("CUDA graph for batches of %s: %s; that shape runs eager", "x".join(map(str, shape)), reason)
        return False

    def _capture_checked(self, shape: Shape, device: torch.device) -> _Graph | str:
        """A graph whose replay gives the eager codes on a noise batch, or why not (a string)."""
        gen = torch.Generator(device).manual_seed(0)
        static_in = 0.1 * torch.randn(shape, device=device, generator=gen)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # capture needs a warm-up off the capture stream (cuDNN, cuBLAS, compile)
            for _ in range(self.warmup_iters):
                ref_codes, ref_scales = self.codec.encode_with_scales(static_in)
            ref_codes = ref_codes.cpu()
            ref_scales = None if ref_scales is None else ref_scales.cpu()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the warm-up's blocks: the graph's pool then reuses the memory
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (pinning memory, say) do not invalidate the capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            codes, scales = self.codec.encode_with_scales(static_in)
        graph.replay()
        torch.cuda.synchronize(device)
        differ = int((codes.cpu() != ref_codes).sum())
        if differ or (scales is not None and not torch.equal(scales.cpu(), ref_scales)):
            return f"replayed codes differ from eager on a noise batch ({differ} of {ref_codes.numel()} codes)"
        return _Graph(graph, static_in, codes, scales)

    def replay(self, host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Copy ``host`` (pinned) into the graph of its shape and queue the replay on the current stream; the
        graph's static outputs (valid until its next replay). None when the shape has no graph (run eager)."""
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
            parts.append("CUDA graphs for " + ", ".join("x".join(map(str, s)) for s in self.captured))
        if self.failed:
            parts.append("eager (graph failed) for " + ", ".join("x".join(map(str, s)) for s in self.failed))
        return "; ".join(parts)
