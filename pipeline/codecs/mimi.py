"""Mimi (``transformers.MimiModel``, ``kyutai/mimi``) behind the ``Codec`` interface.

24 kHz mono, 12.5 frames/s (hop 1920: the SEANet's 960 times the stride-2 downsampling convolution), codebooks of
2048 entries. The checkpoint has 32 codebooks; ``codec.num_codebooks`` keeps the first K (Moshi uses 8). The first
codebook is the semantic one (its own RVQ, distilled from WavLM), the rest are acoustic, so K is at least
``num_semantic_quantizers``.

Every convolution is causal and pads its input up to a whole number of strides, so ``n_frames = ceil(n / 1920)``
(checked against ``MimiModel.get_encoded_length`` and the encoder's output in the tests). Causal also means a
frame never sees the zero padding after it; the encoder transformer attends to the past only (a 250-frame
window at 25 Hz).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import MimiModel

from pipeline.codecs.hf import TransformersCodec, check_num_codebooks, fit_length
from pipeline.config import CodecConfig


class MimiCodec(TransformersCodec):
    """A frozen Mimi: ``[B, 1, L]`` float audio in, ``[B, K, ceil(L / hop)]`` int64 codes out."""

    family = "mimi"
    label = "Mimi"
    model_class = MimiModel
    model_type = "mimi"
    has_attention = True

    def __init__(self, model: MimiModel, cfg: CodecConfig, device: torch.device, provenance: dict[str, Any]):
        super().__init__(model, cfg, device, provenance)
        config = model.config
        self.sample_rate = int(config.sampling_rate)
        self.channels = int(config.audio_channels)
        self.hop_length = _hop_length(model)
        self.cardinality = int(config.codebook_size)
        self.num_codebooks = check_num_codebooks(cfg, "Mimi", int(config.num_semantic_quantizers),
                                                 int(config.num_quantizers))
        self._encoder = self._compile(model.encoder)

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Encode a batch; see ``Codec.encode``. Padding is the caller's: every row is encoded as given."""
        self._check_audio(audio)
        with torch.inference_mode(), self._conv_precision():
            with self._autocast():
                latents = self._encoder(audio).latents
            with self._rvq_precision():
                codes = self.model.quantizer.encode(latents.float(), self.num_codebooks)  # [K, B, T]
        return codes.transpose(0, 1).contiguous()

    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``[B, K, T]`` codes to ``[B, 1, T * hop]`` audio; ``scales`` must be None (Mimi has none)."""
        if scales is not None:
            raise ValueError("Mimi does not normalise its input; decode takes no scales")
        codes = self._check_codes(codes)
        with torch.inference_mode():
            audio = self.model.decode(codes, return_dict=True).audio_values
        return fit_length(audio, codes.shape[-1] * self.hop_length)


def _hop_length(model: MimiModel) -> int:
    """Input samples per frame: the SEANet encoder's strides times the downsampling convolution's.

    From the modules, not ``MimiConfig.frame_size``, which assumes a stride-2 downsampling layer even when the
    model has none.
    """
    downsample = model.encoder.downsample
    return math.prod(model.config.upsampling_ratios) * (1 if downsample is None else int(downsample.conv.stride[0]))
