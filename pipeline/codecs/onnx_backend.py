"""ONNX Runtime CPU backend for EnCodec (``codec.backend=onnx``): the encoder as an exported graph, RVQ in torch.

Why this shape of backend (measured on the ``full`` fixture, the exact ``facebook/encodec_32khz`` architecture,
torch 2.13 CPU, onnxruntime 1.32, BENCHMARKS.md):

- ONNX Runtime runs the exported encoder 1.5x (one 30 s row) to 1.7x (2-4 rows) faster than PyTorch on one CPU
  thread, and its output differs by ~1e-7, which left every code identical in our checks on the full
  architecture (tests/test_onnx_backend.py).
- Exporting the RVQ into the graph as well flips codes (3 of 8000 on the tiny fixture): ORT's MatMul rounds the
  ``x.e`` distances differently. So the RVQ runs here, in torch IEEE fp32, on the graph's output, exactly as the
  torch backend runs it, and the codes stay identical.
- EnCodec's padding arithmetic runs in Python on the input length, so a traced graph is only valid for the length
  it was traced at (dynamic-length export does not work). The pipeline pads to a few fixed batch shapes anyway,
  so there is one graph per ``[rows, 1, padded_len]`` shape, exported on first use and cached on disk.
- torch 2.13's default exporter (``dynamo=True``) needs the ``onnxscript`` package; the TorchScript exporter
  (``dynamo=False``, opset 17) exports this model as is, so that is what is used.

A graph is valid only for the weights, architecture, exporter and shape it was made from; all of them are in its
file name (``<weights sha256>-<export key>-b<rows>-l<len>.onnx``), so a stale graph is never picked up.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from pipeline.codecs.base import Codec
from pipeline.config import CodecConfig

log = logging.getLogger(__name__)

OPSET = 17
# Bump when the export recipe below changes: it is part of every graph's file name.
EXPORT_VERSION = 1


def default_cache_dir() -> Path:
    """``$AUDIO_TOKENIZE_ONNX_CACHE``, else ``$AUDIO_TOKENIZE_CACHE/onnx``, else ``~/.cache/audio-tokenize/onnx``."""
    if os.environ.get("AUDIO_TOKENIZE_ONNX_CACHE"):
        return Path(os.environ["AUDIO_TOKENIZE_ONNX_CACHE"])
    env = os.environ.get("AUDIO_TOKENIZE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "audio-tokenize") / "onnx"


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ValueError(
            "codec.backend=onnx needs onnxruntime and onnx: pip install -e '.[onnx]' (or use codec.backend=torch)"
        ) from e
    return onnxruntime


class OnnxEncodecCodec(Codec):
    """EnCodec whose encoder runs in ONNX Runtime on CPU, one session per batch shape; ``decode`` stays in torch.

    Args:
        torch_codec: the loaded torch ``EncodecCodec`` (weights folded, CPU); its RVQ, decoder and provenance
            are used as they are.
        threads: ONNX Runtime intra-op threads (``codec.threads``); like torch's, they change float reduction order.
        cache_dir: where exported graphs are kept; ``default_cache_dir()`` when None.
    """

    def __init__(self, torch_codec: Any, threads: int, cache_dir: Path | None = None):
        self._ort = _import_ort()
        if torch_codec.device.type != "cpu":
            raise ValueError(f"codec.backend=onnx runs on CPU only, got device {torch_codec.device}; "
                             "use codec.backend=torch on GPUs")
        if getattr(torch_codec, "family", None) != "encodec":
            raise ValueError(f"codec.backend=onnx supports codec.family=encodec only, got {torch_codec.cfg.family}")
        if getattr(torch_codec, "normalize", False) or getattr(torch_codec, "chunking", None) is not None:
            raise ValueError(f"codec.backend=onnx supports EnCodec models without loudness normalisation or "
                             f"chunking (the 24/32 kHz ones); {torch_codec.cfg.pretrained} has them")
        self.torch_codec = torch_codec
        self.threads = threads
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        for name in ("sample_rate", "channels", "hop_length", "num_codebooks", "cardinality"):
            setattr(self, name, getattr(torch_codec, name))
        self._weights = torch_codec.fingerprint()["weights_sha256"]
        self._export_key = _export_key(torch_codec.model)
        self._sessions: dict[tuple[int, int], Any] = {}
        self.export_seconds = 0.0  # spent exporting graphs in this process (benchmarks report it apart)

    @classmethod
    def load(cls, cfg: CodecConfig, device: torch.device, cache_dir: Path | None = None) -> OnnxEncodecCodec:
        """Load the torch codec (``EncodecCodec.load``) and wrap it; graphs are exported lazily, per shape."""
        _import_ort()  # fail before loading weights when the extra is not installed
        if device.type != "cpu":
            raise ValueError(f"codec.backend=onnx runs on CPU only, got codec.device={cfg.device}; "
                             "use codec.backend=torch on GPUs")
        if cfg.family != "encodec":
            raise ValueError(f"codec.backend=onnx supports codec.family=encodec only, got {cfg.family}")
        from pipeline.codecs.encodec import EncodecCodec

        return cls(EncodecCodec.load(cfg, device), cfg.threads, cache_dir)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def graph_path(self, rows: int, length: int) -> Path:
        """The cached graph file for input shape ``[rows, 1, length]``."""
        return self.cache_dir / f"{self._weights[:16]}-{self._export_key}-b{rows}-l{length}.onnx"

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """See ``Codec.encode``. The first call per shape exports (or loads) that shape's graph."""
        self.torch_codec._check_audio(audio)
        session = self._session(audio.shape[0], audio.shape[-1])
        x = audio.detach().cpu().contiguous().numpy()
        embeddings = torch.from_numpy(session.run(None, {"audio": x})[0])  # [B, D, T]
        codec = self.torch_codec
        with torch.inference_mode(), codec._rvq_precision():
            codes = codec.model.quantizer.encode(embeddings, codec.bandwidth)  # [K, B, T]
        return codes.transpose(0, 1).contiguous()

    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        return self.torch_codec.decode(codes, scales)

    def fingerprint(self) -> dict[str, Any]:
        """The torch codec's, plus the backend, the ONNX Runtime version and opset, and ORT's thread count."""
        return {**self.torch_codec.fingerprint(), "backend": "onnx", "onnxruntime": self._ort.__version__,
                "onnx_opset": OPSET, "threads": self.threads}

    def _session(self, rows: int, length: int):
        key = (rows, length)
        if key not in self._sessions:
            path = self.graph_path(rows, length)
            if not path.exists():
                self._export(rows, length, path)
            self._sessions[key] = self._ort.InferenceSession(str(path), self._session_options(),
                                                             providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def _session_options(self):
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # warnings about unused initializers are noise here
        return opts

    def _export(self, rows: int, length: int, path: Path) -> None:
        """Trace the encoder at this shape into ``path``; one process exports, concurrent ones wait for it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # ranks sharing a cache export each shape once
            if path.exists():
                return
            start = time.monotonic()
            log.info("exporting the EnCodec encoder to ONNX for batch shape [%d, 1, %d] -> %s", rows, length, path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".onnx")
            os.close(fd)
            try:
                export_encoder(self.torch_codec.model.encoder, rows, length, Path(tmp))
                os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache should be readable by all
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
            self.export_seconds += time.monotonic() - start
            log.info("exported in %.1f s", time.monotonic() - start)


def export_encoder(encoder: torch.nn.Module, rows: int, length: int, path: Path) -> None:
    """Export ``encoder`` for input ``[rows, 1, length]`` with the TorchScript exporter (see the module doc).

    The example input is noise, not zeros: tracing records one path whatever the values, but noise keeps any
    value-dependent branch on its common side.
    """
    example = 0.1 * torch.randn(rows, 1, length, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(None):
        # The tracer warns that Python arithmetic on shapes becomes constants: that is the one-graph-per-shape
        # design, not a problem.
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["audio"], output_names=["embeddings"], do_constant_folding=True)


def _export_key(model: torch.nn.Module) -> str:
    """What besides weights and shape makes a graph: architecture config, exporter versions, recipe."""
    import transformers

    detail = {"config": model.config.to_dict(), "torch": torch.__version__, "transformers": transformers.__version__,
              "opset": OPSET, "recipe": EXPORT_VERSION}
    detail["config"].pop("transformers_version", None)
    return hashlib.sha256(json.dumps(detail, sort_keys=True, default=str).encode()).hexdigest()[:12]
