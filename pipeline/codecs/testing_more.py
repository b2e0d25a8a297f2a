"""Debug DAC and Mimi checkpoints for tests: tiny layers, the real rates, hops and codebook shapes, seeded weights.

Built through ``pipeline.codecs.testing.fixture_codec_dir("dac_tiny" | "mimi_tiny")`` (cached like the EnCodec
fixtures) and loaded by path with ``codec.family=dac|mimi``.

- DAC compares L2-normalised vectors (cosine similarity) with its codebooks, and a random ``DacModel``'s codebooks
  are random directions, so its codes already spread over the codebooks without fitting (the tests check it).
- Mimi's codebooks are ``embed_sum / cluster_usage`` and start at zero, so every code would be 0: they are fitted
  on the random encoder's latents like the EnCodec fixtures' (one RVQ layer at a time, k-means).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import DacConfig, DacModel, MimiConfig, MimiModel

from pipeline.codecs.testing import _codebook_entries, one_thread, synth_audio

# Bump when a recipe below changes: it is part of the cache key, so stale fixtures are never reused.
VERSIONS = {"dac_tiny": 1, "mimi_tiny": 2}
# Seconds of synthetic audio Mimi's codebooks are fitted on (12.5 frames per second).
_MIMI_FIT_SECONDS = 120.0


def dac_config() -> DacConfig:
    """``descript/dac_44khz`` (44.1 kHz, hop 512, 9 codebooks x 1024 of dimension 8) with narrow layers."""
    return DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 4, 8, 8], decoder_hidden_size=32,
                     n_codebooks=9, codebook_size=1024, codebook_dim=8, sampling_rate=44_100)


def mimi_config() -> MimiConfig:
    """``kyutai/mimi`` (24 kHz, hop 1920, 12.5 Hz, 1 semantic + 31 acoustic codebooks x 2048) with narrow layers
    and 8 codebooks in all (enough to test K selection; fitting 32 would only cost time)."""
    return MimiConfig(
        sampling_rate=24_000, upsampling_ratios=[8, 6, 5, 4], frame_rate=12.5, codebook_size=2048,
        num_quantizers=8, num_semantic_quantizers=1, hidden_size=32, num_filters=4, codebook_dim=16,
        vector_quantization_hidden_dimension=16, upsample_groups=32, num_hidden_layers=1, intermediate_size=64,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16,
    )


@torch.no_grad()
def build_fixture_dac(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Seeded random ``DacModel`` with the 44.1 kHz layout, saved with ``save_pretrained`` into ``out_dir``."""
    with one_thread():
        torch.manual_seed(seed)
        model = DacModel(dac_config()).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


@torch.no_grad()
def build_fixture_mimi(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Seeded random ``MimiModel`` with fitted codebooks, saved with ``save_pretrained`` into ``out_dir``."""
    with one_thread():
        torch.manual_seed(seed)
        model = MimiModel(mimi_config()).eval()
        audio = synth_audio(_MIMI_FIT_SECONDS, model.config.sampling_rate, seed)[None, None]
        _center_seanet_output(model, audio)
        latents = model.encoder(audio).latents  # [1, D, T]
        gen = torch.Generator().manual_seed(seed)
        quantizer = model.quantizer
        for rvq in (quantizer.semantic_residual_vector_quantizer, quantizer.acoustic_residual_vector_quantizer):
            _fit_rvq(rvq, latents, gen)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


def _center_seanet_output(model: MimiModel, audio: torch.Tensor) -> None:
    """Shift the SEANet encoder's last bias so its output has zero mean over ``audio``.

    As with the EnCodec fixtures (``testing._center_encoder_output``): a random encoder's output is a large offset
    plus small variations, and nearest-codebook distances then cancel in fp32 so that float noise from the batch
    size flips codes. The transformer after it adds its branches to the residual stream with a 0.01 layer scale
    and the downsampling convolution is linear, so centring here leaves the latents nearly centred too.
    """
    hidden = model.encoder.encoder_seanet(audio)  # [1, D, T]
    model.encoder.encoder_seanet.layers[-1].conv.bias.sub_(hidden.mean(dim=(0, 2)))


def _fit_rvq(rvq: torch.nn.Module, latents: torch.Tensor, gen: torch.Generator) -> None:
    """Fit each layer of one Mimi RVQ to the residual the layers before it leave, as ``rvq.encode`` computes it.

    Args:
        rvq: a ``MimiResidualVectorQuantizer``; its codebooks' ``embed_sum`` and ``cluster_usage`` are overwritten.
        latents: encoder latents ``[1, D, T]``.
        gen: random generator for k-means.
    """
    x = rvq.input_proj(latents) if rvq.input_proj is not None else latents
    residual = x[0].T.contiguous()  # [T, d]
    for layer in rvq.layers:
        book = layer.codebook
        embed = _codebook_entries(residual, book.codebook_size, gen)
        book.embed_sum.copy_(embed)
        book.cluster_usage.fill_(1.0)
        book._embed = None  # the codebook caches embed_sum / cluster_usage on first use
        residual = residual - book.decode(book.encode(residual))


FIXTURES = {"dac_tiny": build_fixture_dac, "mimi_tiny": build_fixture_mimi}
