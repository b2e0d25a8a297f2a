"""DAC, the Descript Audio Codec (``transformers.DacModel``), behind the ``Codec`` interface.

Published checkpoints: ``descript/dac_16khz`` (hop 320, 50 Hz, 12 codebooks), ``descript/dac_24khz`` (hop 320,
75 Hz, 32 codebooks), ``descript/dac_44khz`` (44.1 kHz, hop 512, 86.13 Hz, 9 codebooks); all mono, 1024 entries
per codebook. ``codec.num_codebooks`` keeps the first K (an RVQ prefix: fewer codebooks, coarser audio).

Two things differ from what the model's own ``encode`` does:

- The hop is the product of ``downsampling_ratios``. ``DacConfig.hop_length`` is not: the 24 kHz checkpoint's
  ``config.json`` stores 512, which overrides the computed 320 on load.
- The encoder's strided convolutions emit ``floor(L / hop)`` frames, dropping a partial last frame. The original
  DAC (``DAC.preprocess``) and ``DacFeatureExtractor`` right-pad the input to a multiple of the hop first; so does
  ``encode`` here, which makes ``n_frames = ceil(n_samples / hop)`` like the other codecs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import DacModel

from pipeline.codecs.hf import TransformersCodec, check_num_codebooks, fit_length
from pipeline.config import CodecConfig


class DacCodec(TransformersCodec):
    """A frozen DAC: ``[B, 1, L]`` float audio in, ``[B, K, ceil(L / hop)]`` int64 codes out."""

    family = "dac"
    label = "DAC"
    model_class = DacModel
    model_type = "dac"

    def __init__(self, model: DacModel, cfg: CodecConfig, device: torch.device, provenance: dict[str, Any]):
        super().__init__(model, cfg, device, provenance)
        config = model.config
        self.sample_rate = int(config.sampling_rate)
        self.channels = 1  # DacEncoder's first convolution takes one channel
        self.hop_length = math.prod(config.downsampling_ratios)
        self.cardinality = int(config.codebook_size)
        self.num_codebooks = check_num_codebooks(cfg, "DAC", 1, int(config.n_codebooks))
        self._encoder = self._compile(model.encoder)

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Encode a batch; see ``Codec.encode``. Rows are right-padded to a multiple of the hop (see module doc)."""
        self._check_audio(audio)
        length = audio.shape[-1]
        audio = torch.nn.functional.pad(audio, (0, -length % self.hop_length))
        with torch.inference_mode(), self._conv_precision():
            with self._autocast():
                latents = self._encoder(audio)
            with self._rvq_precision():
                # Eval mode: the first num_codebooks quantizers, no dropout. Returns (z, codes [B, K, T], ...).
                codes = self.model.quantizer(latents.float(), self.num_codebooks)[1]
        return codes.contiguous()

    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``[B, K, T]`` codes to ``[B, 1, T * hop]`` audio; ``scales`` must be None (DAC has none).

        With odd strides (16/24 kHz) the decoder's transposed convolutions emit a few samples less than
        ``T * hop``; the end is zero-filled so every codec decodes to ``T * hop`` samples.
        """
        if scales is not None:
            raise ValueError("DAC does not normalise its input; decode takes no scales")
        codes = self._check_codes(codes)
        with torch.inference_mode():
            audio = self.model.decode(audio_codes=codes, return_dict=True).audio_values[:, None]
        return fit_length(audio, codes.shape[-1] * self.hop_length)

