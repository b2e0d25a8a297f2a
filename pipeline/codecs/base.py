"""The codec interface: everything the pipeline needs from a neural audio codec, and nothing more.

Modelled on audiocraft's ``CompressionModel``. Implementations wrap a transformers model; the pipeline never
touches the model directly, so another codec is one new class.
"""

from __future__ import annotations

import abc
from typing import Any

import torch


class Codec(abc.ABC):
    """A frozen audio tokenizer.

    Attributes:
        sample_rate: input rate in Hz the codec expects.
        channels: input channels per encode call (1 for the MusicGen codecs).
        hop_length: input samples per output frame.
        num_codebooks: K, the number of RVQ codebooks produced per frame.
        cardinality: entries per codebook (codes are in ``[0, cardinality)``).
    """

    sample_rate: int
    channels: int
    hop_length: int
    num_codebooks: int
    cardinality: int
    # Most samples (rows x row channels x length) one encode may take, or None for no limit: CUDA kernels index
    # with 32 bits, so a convolution's [rows, width, length] activation must stay under 2**31 elements.
    max_batch_samples: int | None = None
    # CUDA graphs of ``encode_with_scales`` per batch shape (``pipeline.cuda_graphs``), or None: encode eagerly.
    graphs: Any = None

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def n_frames(self, n_samples: int) -> int:
        """Frames the codec emits for ``n_samples`` input samples: ``ceil(n_samples / hop)`` unless overridden
        (a chunked codec emits a whole number of frames per chunk)."""
        return -(-n_samples // self.hop_length)

    def encode_with_scales(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``encode``, plus the loudness scales a normalising codec divides each chunk by before encoding.

        Codecs that normalise (EnCodec 48 kHz) need these scales to decode at the original level; the others
        return None.

        Args:
            audio: as for ``encode``.

        Returns:
            The codes of ``encode`` and float32 scales ``[B, n_chunks]`` (or None).
        """
        return self.encode(audio), None

    @abc.abstractmethod
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Encode a batch.

        Args:
            audio: float32 ``[B, channels, L]`` on the codec's device, L a multiple of nothing in particular.

        Returns:
            int64 codes ``[B, K, n_frames(L)]`` on the codec's device.
        """

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """Decode int codes ``[B, K, T]`` back to float audio ``[B, channels, T * hop]``.

        Args:
            codes: as returned by ``encode``.
            scales: as returned by ``encode_with_scales``; None decodes a normalising codec at unit loudness.
        """

    @abc.abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """Everything about this codec that changes tokens (id, revision, dtype, TF32, versions, device kind)."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where ``encode`` expects its input."""
