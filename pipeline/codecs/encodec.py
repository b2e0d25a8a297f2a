"""EnCodec (``transformers.EncodecModel``) behind the ``Codec`` interface: the MusicGen tokenizer (32 kHz), the
24 kHz speech/audio model and the 48 kHz stereo model.

Loading, weight-norm folding, precision pinning and the fingerprint are shared with the other families
(``pipeline.codecs.hf``). What is EnCodec's own:

- ``codec.bandwidth`` picks K: ``floor(bandwidth * 1000 / (frame_rate * log2(cardinality)))`` codebooks
  (24 kHz: 1.5/3/6/12/24 kbps -> 2/4/8/16/32; 48 kHz: 3/6/12/24 kbps -> 2/4/8/16).
- Normalising models (48 kHz) divide each chunk by its RMS before encoding; ``encode_with_scales`` returns these
  scales and ``decode`` needs them to restore the level.
- Chunked models (48 kHz: 1 s chunks every 0.99 s) encode each chunk on its own. A row's codes are the chunks'
  codes one after another (150 frames per whole chunk), so ``n_frames`` is not ``ceil(n / hop)``; see
  ``Chunking``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import EncodecModel

from pipeline.codecs.hf import (  # noqa: F401 - CodecLoadError, fold_weight_norm, _fp32_precision re-exported
    CodecLoadError,
    TransformersCodec,
    fold_weight_norm,
)
from pipeline.codecs.hf import fp32_precision as _fp32_precision  # noqa: F401 - the name older callers import
from pipeline.config import CodecConfig


@dataclass(slots=True, frozen=True)
class Chunking:
    """How a chunked EnCodec cuts its input, in samples at the codec rate.

    The input is zero-padded so that every chunk is whole: chunks start every ``stride`` samples while the start
    is inside the input (``ceil(n / stride)`` chunks), and each is ``length`` samples long. Every chunk but the
    last contributes ``length / hop`` frames; the last one only the frames that cover input samples. With
    overlap (stride < length) consecutive chunks share ``length - stride`` samples (1.5 frames at 48 kHz), so the
    codes are not one stream at ``frame_rate``: decoding splits them back into chunks and overlap-adds.

    >>> c = Chunking(length=48000, stride=47520, hop=320)
    >>> c.count(48000), c.n_frames(48000), c.n_frames(47520), c.n_frames(47521), c.n_frames(10 * 48000)
    (2, 152, 149, 151, 1515)
    """

    length: int
    stride: int
    hop: int

    @property
    def frames(self) -> int:
        """Frames of one whole chunk."""
        return self.length // self.hop

    def count(self, n_samples: int) -> int:
        """Chunks that start inside ``n_samples`` samples."""
        return max(1, -(-n_samples // self.stride))

    def n_frames(self, n_samples: int) -> int:
        """Frames for ``n_samples`` samples: the whole chunks', then those of the last chunk that cover input."""
        whole = self.count(n_samples) - 1
        return whole * self.frames + -(-(n_samples - whole * self.stride) // self.hop)

    def padded(self, n_samples: int) -> int:
        """Input length once zero-padded so that the last chunk is whole too."""
        return (self.count(n_samples) - 1) * self.stride + self.length

    def split(self, n_frames: int) -> list[tuple[int, int]]:
        """``(start, end)`` frame ranges of the chunks in ``n_frames`` concatenated codes."""
        return [(start, min(start + self.frames, n_frames)) for start in range(0, n_frames, self.frames)]


class EncodecCodec(TransformersCodec):
    """A frozen EnCodec: ``[B, C, L]`` float audio in, ``[B, K, n_frames(L)]`` int64 codes out.

    Build it with ``EncodecCodec.load``. Attributes are those of ``Codec`` plus ``bandwidth`` (kbps) and
    ``chunking`` (None for unchunked models); ``model`` is the underlying ``EncodecModel``.
    """

    family = "encodec"
    label = "EnCodec"
    model_class = EncodecModel
    model_type = "encodec"

    def __init__(self, model: EncodecModel, cfg: CodecConfig, device: torch.device, provenance: dict[str, Any]):
        super().__init__(model, cfg, device, provenance)
        config = model.config
        self.sample_rate = int(config.sampling_rate)
        self.channels = int(config.audio_channels)
        self.hop_length = int(config.hop_length)
        self.cardinality = int(config.codebook_size)
        self.bandwidth = _check_bandwidth(cfg, config.target_bandwidths)
        self.num_codebooks = model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth)
        if cfg.num_codebooks is not None and cfg.num_codebooks != self.num_codebooks:
            raise ValueError(
                f"codec.num_codebooks={cfg.num_codebooks}, but EnCodec at {self.bandwidth} kbps has "
                f"{self.num_codebooks} codebooks; EnCodec picks K with codec.bandwidth, leave num_codebooks null"
            )
        self.normalize = bool(config.normalize)
        self.chunking = _chunking(config, cfg)
        self._encoder = self._compile(model.encoder)

    def n_frames(self, n_samples: int) -> int:
        """``ceil(n_samples / hop)``, or for chunked models the frames of the chunks (see ``Chunking``)."""
        return super().n_frames(n_samples) if self.chunking is None else self.chunking.n_frames(n_samples)

    def n_chunks(self, n_samples: int) -> int:
        """Chunks (hence scales) for ``n_samples`` samples: 1 for unchunked models."""
        return 1 if self.chunking is None else self.chunking.count(n_samples)

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Encode a batch; see ``Codec.encode``. Padding is the caller's (chunked models also pad their last chunk
        to a whole one). Loudness scales of normalising models are dropped: see ``encode_with_scales``."""
        return self.encode_with_scales(audio)[0]

    def encode_with_scales(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Codes ``[B, K, n_frames(L)]`` and, for normalising models, scales ``[B, n_chunks(L)]`` (else None)."""
        self._check_audio(audio)
        length = audio.shape[-1]
        with torch.inference_mode(), self._conv_precision():
            pieces = [self._encode_chunk(chunk) for chunk in self._chunks(audio)]
        codes = torch.cat([codes for codes, _ in pieces], dim=-1)[..., : self.n_frames(length)]
        scales = torch.cat([scale for _, scale in pieces], dim=1) if self.normalize else None
        return codes.contiguous(), scales

    def _chunks(self, audio: torch.Tensor) -> list[torch.Tensor]:
        """The whole input for unchunked models; else whole chunks of the zero-padded input."""
        if self.chunking is None:
            return [audio]
        c = self.chunking
        padded = torch.nn.functional.pad(audio, (0, c.padded(audio.shape[-1]) - audio.shape[-1]))
        return [padded[..., i * c.stride : i * c.stride + c.length] for i in range(c.count(audio.shape[-1]))]

    def _encode_chunk(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One chunk ``[B, C, L]`` -> codes ``[B, K, T]`` and its scale ``[B, 1]`` (None when not normalising).

        The same steps as ``EncodecModel._encode_frame`` (the tests check the codes are identical), split so the
        encoder can run in bf16 or compiled while the RVQ stays in IEEE fp32.
        """
        scale = None
        if self.normalize:
            mono = torch.sum(audio, 1, keepdim=True) / audio.shape[1]
            scale = mono.pow(2).mean(dim=-1, keepdim=True).sqrt() + 1e-8
            audio = audio / scale
        with self._autocast():
            embeddings = self._encoder(audio)
        with self._rvq_precision():
            codes = self.model.quantizer.encode(embeddings.float(), self.bandwidth)  # [K, B, T]
        return codes.transpose(0, 1), None if scale is None else scale.view(-1, 1)

    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``[B, K, T]`` codes (and scales ``[B, n_chunks]``) to float audio ``[B, channels, L]``.

        ``L = T * hop`` for unchunked models (the input's zero padding included). Chunked models decode each chunk,
        rescale it and overlap-add them as ``EncodecModel.decode`` does: ``L = (n_chunks - 1) * stride + hop *
        (frames of the last chunk)``. Without ``scales`` a normalising model decodes at unit loudness.
        """
        codes = self._check_codes(codes)
        spans = [(0, codes.shape[-1])] if self.chunking is None else self.chunking.split(codes.shape[-1])
        frames = spans[0][1] - spans[0][0]
        chunks = torch.stack([torch.nn.functional.pad(codes[..., a:b], (0, frames - (b - a))) for a, b in spans])
        if scales is not None and scales.shape != (codes.shape[0], len(spans)):
            raise ValueError(f"scales must be [B, {len(spans)}] for these codes, got {tuple(scales.shape)}")
        per_chunk = [None] * len(spans) if scales is None else list(scales.to(self._device)[..., None].unbind(1))
        with torch.inference_mode():
            # transformers takes [chunks, B, K, T] codes, one scale per chunk, and the padding of the last chunk.
            out = self.model.decode(chunks, per_chunk, last_frame_pad_length=frames - (spans[-1][1] - spans[-1][0]),
                                    return_dict=True)
        return out.audio_values


def _check_bandwidth(cfg: CodecConfig, supported: list[float]) -> float:
    bandwidth = supported[0] if cfg.bandwidth is None else float(cfg.bandwidth)
    if bandwidth not in supported:
        raise ValueError(f"codec.bandwidth={cfg.bandwidth} is not supported by {cfg.pretrained}; "
                         f"use one of {list(supported)}")
    return bandwidth


def _chunking(config: Any, cfg: CodecConfig) -> Chunking | None:
    """The model's chunking, if any; overlapping chunks only when ``codec.overlapping_chunks`` accepts them."""
    if config.chunk_length_s is None:
        return None
    length, hop = int(config.chunk_length), int(config.hop_length)
    stride = int(config.chunk_stride or length)
    if length % hop:
        raise ValueError(f"EnCodec chunks of {length} samples are not a whole number of {hop}-sample frames")
    if stride != length and not cfg.overlapping_chunks:
        raise ValueError(
            f"EnCodec with overlapping chunks (chunk_length_s={config.chunk_length_s}, overlap={config.overlap}) "
            f"emits {length // hop} frames per chunk every {stride / hop:g} frames: the codes are the chunks' codes "
            "one after another, not one stream at the frame rate, and decoding needs the chunking. Set "
            "codec.overlapping_chunks=true to accept that (codec=encodec_48khz does)"
        )
    return Chunking(length, stride, hop)
