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
- Two changes to how transformers runs the encoder on a GPU, neither changing a code (tests compare with
  ``EncodecModel.encode``): the convolutions' padding is computed in Python (``static_conv_padding``: transformers
  keeps it in device tensors, which made every layer wait for the GPU), and the encoder's convolutions run in
  groups of rows under CUDA's 32-bit index limit while the LSTM and the RVQ take the whole batch
  (``SplitEncoder``), so the batch size is chosen for speed, not by that limit.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import EncodecModel
from transformers.models.encodec.modeling_encodec import EncodecConv1d, EncodecLSTM

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
        static_conv_padding(model)
        # CUDA kernels index with 32 bits; CPU kernels with 64, so only CUDA needs the row groups.
        self._encoder = SplitEncoder(model.encoder, self._compile, 2**31 - 1 if device.type == "cuda" else None)
        self.max_batch_samples = None  # SplitEncoder keeps each convolution under the limit itself

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


class SplitEncoder:
    """EnCodec's SEANet encoder with its convolutions run in groups of rows, the rest on the whole batch.

    On CUDA a tensor of 2**31 elements or more fails (``input tensor must fit into 32-bit index math``): the first
    convolution's ``[rows, 64, samples]`` output reached that at 64 rows of 30 s. The convolutions (everything
    before the LSTM) are per row, so they run on groups of at most ``max_elements / width`` samples and are
    concatenated; the LSTM, whose cost is one sequential step per frame whatever the rows (so wide batches pay
    for it once), and the last convolution take the whole batch. Groups are of equal size, so every batch of a
    bucket splits the same way.

    Args:
        encoder: ``EncodecModel.encoder``.
        wrap: applied to each part (``torch.compile`` or the identity).
        max_elements: the most elements one convolution's output may have; None: never split.

    Attributes:
        width: elements of the widest convolution output per input sample (64 for EnCodec 32 kHz).
    """

    def __init__(self, encoder: torch.nn.Module, wrap: Any, max_elements: int | None):
        layers = list(encoder.layers)
        cut = next((i for i, layer in enumerate(layers) if isinstance(layer, EncodecLSTM)), len(layers))
        self.width = _elements_per_sample(layers[:cut])
        self.front = wrap(torch.nn.Sequential(*layers[:cut]))
        self.back = wrap(torch.nn.Sequential(*layers[cut:]))
        self.max_elements = max_elements

    def groups(self, rows: int, length: int) -> int:
        """How many groups ``rows`` rows of ``length`` samples split into (1: not split)."""
        if self.max_elements is None:
            return 1
        # Room for the padding a convolution adds before its output (a few samples per layer).
        per_row = math.ceil(self.width * (length + 1024))
        fit = max(1, int(self.max_elements) // per_row)
        return -(-rows // fit)

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        n = self.groups(audio.shape[0], audio.shape[-1])
        hidden = self.front(audio) if n == 1 else torch.cat([self.front(part) for part in audio.tensor_split(n)])
        return self.back(hidden)


def _elements_per_sample(layers: list[torch.nn.Module]) -> float:
    """The widest convolution output of ``layers`` per input sample: channels over the downsampling so far (the
    first convolution's 64 channels at the full rate for EnCodec 32 kHz; each later stage halves it)."""
    widest, stride = 1.0, 1
    for layer in layers:
        if isinstance(layer, EncodecConv1d):
            stride *= layer.conv.stride[0]
            widest = max(widest, layer.conv.out_channels / stride)
    return widest


def static_conv_padding(model: torch.nn.Module) -> int:
    """Make every ``EncodecConv1d`` compute its padding on the host; returns how many were changed.

    transformers keeps ``stride``, ``kernel_size`` and ``padding_total`` as tensor buffers that move to the GPU
    with the model, so each convolution's padding arithmetic read GPU scalars back: the host waited for the GPU
    at every layer, so launching a batch returned only when the GPU was nearly done with it and nothing else got
    done meanwhile. As Python ints the same arithmetic (``_extra_padding``, in transformers' float32) needs no
    device, and ``torch.compile`` sees static padding instead of breaking its graph at every layer.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, EncodecConv1d) and isinstance(module.stride, torch.Tensor):
            for name in ("stride", "kernel_size", "padding_total"):
                value = int(module._buffers.pop(name))
                setattr(module, name, value)
            module._get_extra_padding_for_conv1d = types.MethodType(_extra_padding_method, module)
            changed += 1
    return changed


def _extra_padding_method(self: EncodecConv1d, hidden_states: torch.Tensor) -> int:
    return _extra_padding(hidden_states.shape[-1], self.kernel_size, self.stride, self.padding_total)


@torch.compiler.assume_constant_result
def _extra_padding(length: int, kernel_size: int, stride: int, padding_total: int) -> int:
    """transformers' ``_get_extra_padding_for_conv1d`` on ints, in the same float32 arithmetic (an int64 tensor
    divided by another is float32 in torch): identical for every length, also past 2**24 where float32 rounds
    (there transformers' padding can even be negative, which crops; the codes stay transformers' codes).

    >>> _extra_padding(960_000, 8, 4, 4), _extra_padding(10, 8, 4, 4), _extra_padding(2**24 + 1, 8, 4, 4)
    (0, 2, -1)
    """
    n_frames = np.float32(length - kernel_size + padding_total) / np.float32(stride) + np.float32(1)
    n_frames = math.ceil(float(n_frames)) - 1
    return n_frames * stride + kernel_size - padding_total - length


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
