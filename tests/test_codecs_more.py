"""DAC, Mimi and the 24/48 kHz EnCodecs on fixture checkpoints: layouts, frame counts checked against the models'
own output, exactness against transformers, K selection, decoding, load errors, shipped configs, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import DacConfig, DacModel, EncodecModel, MimiModel

from helpers import CONF, base_overrides, compose, read_rows
from pipeline.audio import decode_audio
from pipeline.batching import BatchPolicy
from pipeline.codecs import Codec, load_codec
from pipeline.codecs.hf import CodecLoadError
from pipeline.codecs.testing import fixture_codec_dir, synth_channels
from pipeline.config import CodecConfig
from pipeline.segment import SegmentPolicy
from pipeline.testing.dummies import synth, write_audio
from pipeline.tokenize import run

FINGERPRINT_KEYS = {
    "family", "pretrained", "revision", "commit", "weights_sha256", "bandwidth", "num_codebooks", "cardinality",
    "sample_rate", "channels", "hop", "dtype", "tf32", "compile", "torch", "transformers", "device_kind", "threads",
    "attn_implementation",
}  # fmt: skip
# EnCodec 48 kHz chunking: 1 s chunks every 0.99 s.
CHUNK, STRIDE = 48_000, 47_520


def _load(path: Path, family: str = "encodec", **overrides) -> Codec:
    return load_codec(CodecConfig(family=family, pretrained=str(path), device="cpu", **overrides))


def _audio(seconds: float, sample_rate: int, seeds: list[int], channels: int = 1) -> torch.Tensor:
    """``[len(seeds), channels, L]`` of different synthetic audio."""
    return torch.stack([synth_channels(seconds, sample_rate, channels, seed) for seed in seeds])


@pytest.fixture(scope="module")
def dac_dir() -> Path:
    return fixture_codec_dir("dac_tiny")


@pytest.fixture(scope="module")
def mimi_dir() -> Path:
    return fixture_codec_dir("mimi_tiny")


@pytest.fixture(scope="module")
def enc24_dir() -> Path:
    return fixture_codec_dir("tiny_24khz")


@pytest.fixture(scope="module")
def enc48_dir() -> Path:
    return fixture_codec_dir("tiny_48khz")


@pytest.fixture(scope="module")
def dac(dac_dir: Path) -> Codec:
    return _load(dac_dir, "dac")


@pytest.fixture(scope="module")
def mimi(mimi_dir: Path) -> Codec:
    return _load(mimi_dir, "mimi")


@pytest.fixture(scope="module")
def enc48(enc48_dir: Path) -> Codec:
    return _load(enc48_dir, overlapping_chunks=True)


# ------------------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize(
    "variant, family, layout",
    [
        # sample rate, channels, hop, K, cardinality, frame rate
        ("dac_tiny", "dac", (44_100, 1, 512, 9, 1024, 44_100 / 512)),
        ("mimi_tiny", "mimi", (24_000, 1, 1920, 8, 2048, 12.5)),
        ("tiny_24khz", "encodec", (24_000, 1, 320, 2, 1024, 75.0)),
    ],
)
def test_layout_and_fingerprint(variant: str, family: str, layout: tuple) -> None:
    codec = _load(fixture_codec_dir(variant), family)
    got = (codec.sample_rate, codec.channels, codec.hop_length, codec.num_codebooks, codec.cardinality)
    assert got + (codec.frame_rate,) == layout
    fingerprint = codec.fingerprint()
    assert set(fingerprint) == FINGERPRINT_KEYS  # one schema whatever the family, so plans compare
    assert (fingerprint["family"], fingerprint["hop"], fingerprint["num_codebooks"]) == (family, layout[2], layout[3])
    assert fingerprint["bandwidth"] == (1.5 if family == "encodec" else None)
    assert (fingerprint["attn_implementation"] is None) == (family != "mimi")  # Mimi's transformers only


# ---------------------------------------------------------------------------------------------------------- DAC


@pytest.mark.parametrize("length", [1, 511, 512, 513, 44_100 + 17])
def test_dac_pads_to_the_hop_and_matches_transformers(dac: Codec, dac_dir: Path, length: int) -> None:
    audio = 0.1 * torch.randn(2, 1, length, generator=torch.Generator().manual_seed(length))
    codes = dac.encode(audio)
    assert codes.shape == (2, 9, math.ceil(length / 512)) == (2, 9, dac.n_frames(length))
    assert codes.dtype == torch.int64 and 0 <= int(codes.min()) and int(codes.max()) < 1024
    model = DacModel.from_pretrained(dac_dir).eval()
    padded = torch.nn.functional.pad(audio, (0, -length % 512))  # what DAC.preprocess / DacFeatureExtractor do
    with torch.inference_mode():
        assert torch.equal(codes, model.encode(padded).audio_codes)
        if length >= 512:  # unpadded, the strided convolutions drop the partial last frame
            assert model.encode(audio).audio_codes.shape[-1] == length // 512


def test_dac_hop_comes_from_the_ratios_not_the_stored_hop_length(tmp_path: Path) -> None:
    # descript/dac_24khz's config.json says hop_length 512 with ratios [2, 4, 5, 8]; the stored value wins on load.
    torch.manual_seed(0)
    config = DacConfig(encoder_hidden_size=4, decoder_hidden_size=32, downsampling_ratios=[2, 4, 5, 8],
                       hop_length=512, n_codebooks=4, sampling_rate=24_000)
    DacModel(config).save_pretrained(tmp_path)
    codec = _load(tmp_path, "dac")
    assert DacConfig.from_pretrained(tmp_path).hop_length == 512 and codec.hop_length == 320
    assert codec.frame_rate == 75.0
    codes = codec.encode(_audio(0.5, 24_000, [1]))
    assert codes.shape == (1, 4, math.ceil(12_000 / 320))
    # Odd strides make the decoder a few samples short of T * hop; the codec pads it back.
    assert codec.decode(codes).shape == (1, 1, codes.shape[-1] * 320)


# --------------------------------------------------------------------------------------------------------- Mimi


@pytest.mark.parametrize("length", [1, 1919, 1920, 1921, 2 * 24_000 + 5])
def test_mimi_frames_match_the_model(mimi: Codec, mimi_dir: Path, length: int) -> None:
    audio = 0.1 * torch.randn(2, 1, length, generator=torch.Generator().manual_seed(length))
    codes = mimi.encode(audio)
    model = MimiModel.from_pretrained(mimi_dir).eval()
    assert codes.shape == (2, 8, math.ceil(length / 1920)) == (2, 8, mimi.n_frames(length))
    assert int(model.get_encoded_length(torch.tensor(length))) == mimi.n_frames(length)
    with torch.inference_mode():
        assert torch.equal(codes, model.encode(audio, num_quantizers=8).audio_codes)


# ------------------------------------------------------------------------------------------------- both families


@pytest.mark.parametrize("family, seconds, floor", [("dac", 5.0, 100), ("mimi", 20.0, 60)])
def test_codes_spread_and_ignore_batch_mates(request, family: str, seconds: float, floor: int) -> None:
    # DAC: random codebooks, cosine distances; measured 303, 173..211 distinct codes of 431 frames. Mimi: fitted
    # codebooks; measured 190, 200, 226, 227, 204, 178, 140, 96 of 250 frames. Unfitted Mimi codebooks (all
    # zero) give 1.
    codec: Codec = request.getfixturevalue(family)
    audio = _audio(seconds, codec.sample_rate, [1, 2, 3])
    codes = codec.encode(audio)
    distinct = [len(torch.unique(row)) for row in codes[0]]
    assert min(distinct) > floor, distinct
    alone = torch.cat([codec.encode(audio[i : i + 1]) for i in range(len(audio))])
    assert torch.equal(codes, alone)


@pytest.mark.parametrize("family, fewer, low, high", [("dac", [1, 3], 1, 9), ("mimi", [1, 4], 1, 8)])
def test_num_codebooks_selects_an_rvq_prefix(request, family: str, fewer: list[int], low: int, high: int) -> None:
    path = request.getfixturevalue(f"{family}_dir")
    full = request.getfixturevalue(family)
    audio = _audio(2.0, full.sample_rate, [4, 5])
    codes = full.encode(audio)
    assert codes.shape[1] == high
    for k in fewer:
        codec = _load(path, family, num_codebooks=k)
        assert codec.num_codebooks == k and codec.fingerprint()["num_codebooks"] == k
        assert torch.equal(codec.encode(audio), codes[:, :k])
    for bad in (low - 1, high + 1):
        with pytest.raises(ValueError, match=f"{low}..{high}"):
            _load(path, family, num_codebooks=bad)
    with pytest.raises(ValueError, match="bandwidth"):
        _load(path, family, bandwidth=6.0)


@pytest.mark.parametrize("family", ["dac", "mimi"])
def test_decode_round_trip_shape(request, family: str) -> None:
    codec: Codec = request.getfixturevalue(family)
    codes = codec.encode(_audio(1.3, codec.sample_rate, [6, 7]))
    audio = codec.decode(codes)
    assert audio.shape == (2, 1, codes.shape[-1] * codec.hop_length)
    assert audio.dtype == torch.float32 and torch.isfinite(audio).all()
    assert codec.decode(codes[:, :1]).shape == audio.shape  # fewer codebooks: coarser, same length
    with pytest.raises(ValueError, match="scales"):
        codec.decode(codes, torch.ones(2, 1))


# -------------------------------------------------------------------------------------------------- EnCodec 24 kHz


def test_encodec_24khz_bandwidth_selects_k(enc24_dir: Path) -> None:
    audio = _audio(1.0, 24_000, [8, 9])
    model = EncodecModel.from_pretrained(enc24_dir).eval()
    widest = _load(enc24_dir, bandwidth=24.0).encode(audio)
    for bandwidth, k in [(1.5, 2), (3.0, 4), (6.0, 8), (12.0, 16), (24.0, 32)]:
        codec = _load(enc24_dir, bandwidth=bandwidth)
        codes = codec.encode(audio)
        assert codec.num_codebooks == k and codes.shape == (2, k, 75)
        assert torch.equal(codes, widest[:, :k])
        with torch.inference_mode():
            assert torch.equal(codes, model.encode(audio, bandwidth=bandwidth).audio_codes[0])
    with pytest.raises(ValueError, match="bandwidth"):
        _load(enc24_dir, bandwidth=2.2)


@pytest.mark.parametrize("length", [1, 319, 320, 321, 24_000 + 7])
def test_encodec_24khz_frames(enc24_dir: Path, length: int) -> None:
    codec = _load(enc24_dir, bandwidth=6.0)
    codes = codec.encode(0.1 * torch.randn(1, 1, length, generator=torch.Generator().manual_seed(length)))
    assert codes.shape == (1, 8, math.ceil(length / 320)) == (1, 8, codec.n_frames(length))


# -------------------------------------------------------------------------------------------------- EnCodec 48 kHz


def _transformers_chunk_frames(length: int) -> int:
    """Frames of EnCodec 48 kHz codes for ``length`` samples, from transformers' chunk loop: a chunk starts at
    every multiple of the stride inside the input; all but the last are whole (150 frames)."""
    starts = list(range(0, length, STRIDE))
    return 150 * (len(starts) - 1) + math.ceil((length - starts[-1]) / 320)


def test_encodec_48khz_needs_overlapping_chunks_accepted(enc48_dir: Path) -> None:
    with pytest.raises(ValueError, match="overlapping_chunks=true"):
        _load(enc48_dir)


def test_encodec_48khz_layout(enc48: Codec, enc48_dir: Path) -> None:
    assert (enc48.sample_rate, enc48.channels, enc48.hop_length, enc48.cardinality) == (48_000, 2, 320, 1024)
    assert enc48.num_codebooks == 2  # 3 kbps, the first bandwidth
    ks = [_load(enc48_dir, overlapping_chunks=True, bandwidth=bw).num_codebooks for bw in (3.0, 6.0, 12.0, 24.0)]
    assert ks == [2, 4, 8, 16]


@pytest.mark.parametrize("length", [1, 320, STRIDE - 1, STRIDE, STRIDE + 1, STRIDE + 481, CHUNK, 3 * STRIDE + 5])
def test_encodec_48khz_frames_and_scales(enc48: Codec, length: int) -> None:
    audio = 0.1 * torch.randn(2, 2, length, generator=torch.Generator().manual_seed(length))
    codes, scales = enc48.encode_with_scales(audio)
    n_chunks = math.ceil(length / STRIDE)
    assert codes.shape == (2, 2, _transformers_chunk_frames(length)) == (2, 2, enc48.n_frames(length))
    assert scales.shape == (2, n_chunks) == (2, enc48.n_chunks(length)) and (scales > 0).all()
    assert torch.equal(enc48.encode(audio), codes)


def test_encodec_48khz_codes_scales_and_decode_match_transformers(enc48: Codec, enc48_dir: Path) -> None:
    # 2 strides + a chunk: transformers encodes 3 whole chunks and a last 480-sample one (2 frames). The codec
    # zero-pads its last chunk to a whole one instead, so the first 3 chunks must be identical.
    audio = _audio((2 * STRIDE + CHUNK) / 48_000, 48_000, [1, 2], channels=2)
    codes, scales = enc48.encode_with_scales(audio)
    assert codes.shape[-1] == 3 * 150 + 2
    model = EncodecModel.from_pretrained(enc48_dir).eval()
    with torch.inference_mode():
        ref = model.encode(audio, bandwidth=3.0)
        ref_audio = model.decode(ref.audio_codes, ref.audio_scales, last_frame_pad_length=ref.last_frame_pad_length)
    ref_codes = ref.audio_codes.permute(1, 2, 0, 3).reshape(2, 2, -1)  # [chunks, B, K, 150] -> [B, K, T]
    assert torch.equal(codes[..., :450], ref_codes[..., :450])
    assert torch.equal(scales[:, :3], torch.cat(ref.audio_scales[:3], dim=1))
    decoded = enc48.decode(codes, scales)
    assert decoded.shape == ref_audio.audio_values.shape == (2, 2, 3 * STRIDE + 2 * 320)
    # Overlap-add of the same chunks with the same scales: identical up to where the last chunks differ.
    assert torch.equal(decoded[..., : 3 * STRIDE], ref_audio.audio_values[..., : 3 * STRIDE])


def test_encodec_48khz_scales_restore_the_level(enc48: Codec) -> None:
    # One chunk: decoding with its scale is decoding at unit loudness times the scale.
    audio = 0.02 * _audio(0.5, 48_000, [3], channels=2)
    codes, scales = enc48.encode_with_scales(audio)
    assert scales.shape == (1, 1) and float(scales) < 0.05  # quiet input, small RMS
    torch.testing.assert_close(enc48.decode(codes, scales), enc48.decode(codes) * scales[0, 0])
    with pytest.raises(ValueError, match="scales"):
        enc48.decode(codes, torch.ones(1, 2))


# ----------------------------------------------------------------------------------------------- loading & configs


def test_family_mismatch_fails_fast_with_a_hint(dac_dir: Path, mimi_dir: Path, tiny_codec_dir: Path) -> None:
    with pytest.raises(ValueError, match="'dac' checkpoint.*set codec.family=dac"):
        _load(dac_dir, "encodec")
    with pytest.raises(ValueError, match="'mimi' checkpoint.*set codec.family=mimi"):
        _load(mimi_dir, "dac")
    with pytest.raises(ValueError, match="'encodec' checkpoint.*set codec.family=encodec"):
        _load(tiny_codec_dir, "mimi")


@pytest.mark.parametrize("family, label", [("dac", "DAC"), ("mimi", "Mimi")])
def test_load_errors_are_shared(monkeypatch, tmp_path: Path, family: str, label: str) -> None:
    with pytest.raises(CodecLoadError, match=f"not a loadable {label} checkpoint"):
        _load(tmp_path, family)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CodecLoadError, match="hf download descript/dac_44khz --local-dir DIR"):
        load_codec(CodecConfig(family=family, pretrained="descript/dac_44khz", device="cpu"))


SHIPPED = {
    # name: family, pretrained (None: a fixture directory), bandwidth, num_codebooks, overlapping_chunks
    "encodec_32khz": ("encodec", "facebook/encodec_32khz", None, None, False),
    "encodec_24khz": ("encodec", "facebook/encodec_24khz", 6.0, None, False),
    "encodec_48khz": ("encodec", "facebook/encodec_48khz", 6.0, None, True),
    "dac_16khz": ("dac", "descript/dac_16khz", None, None, False),
    "dac_24khz": ("dac", "descript/dac_24khz", None, None, False),
    "dac_44khz": ("dac", "descript/dac_44khz", None, None, False),
    "mimi": ("mimi", "kyutai/mimi", None, 8, False),
    "fixture_tiny": ("encodec", None, None, None, False),
    "fixture_tiny_dac": ("dac", None, None, None, False),
    "fixture_tiny_mimi": ("mimi", None, None, None, False),
}


def test_every_shipped_codec_config_composes() -> None:
    assert {p.stem for p in (CONF / "codec").glob("*.yaml")} == set(SHIPPED)
    for name, (family, pretrained, bandwidth, k, overlapping) in SHIPPED.items():
        codec = compose([f"codec={name}", "dataset.path=/data", "output.dir=/out"]).codec
        got = (codec.family, codec.bandwidth, codec.num_codebooks, codec.overlapping_chunks)
        assert got == (family, bandwidth, k, overlapping), name
        assert codec.pretrained == pretrained if pretrained else Path(codec.pretrained).is_dir(), name


def test_fixture_configs_load(tmp_path: Path) -> None:
    for name, layout in [("fixture_tiny_dac", (44_100, 512, 9)), ("fixture_tiny_mimi", (24_000, 1920, 8))]:
        cfg = compose([f"codec={name}", "codec.device=cpu", "dataset.path=/data", "output.dir=/out"]).codec
        codec = load_codec(cfg)
        assert (codec.sample_rate, codec.hop_length, codec.num_codebooks) == layout


# --------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name, seconds, sr, channels in [("stereo.flac", 12.5, 44_100, 2), ("speech.wav", 4.0, 16_000, 1),
                                        ("hi.wav", 3.0, 48_000, 1)]:
        write_audio(root / name, synth(seconds, sr, channels, "music", seed=len(name)), sr, "PCM_16")
    return root


@pytest.mark.parametrize("family, extra, k", [("dac", [], 9), ("mimi", ["codec.num_codebooks=4"], 4)])
def test_end_to_end(request, corpus: Path, tmp_path: Path, family: str, extra: list[str], k: int) -> None:
    path = request.getfixturevalue(f"{family}_dir")
    out = tmp_path / "out"
    cfg = compose(base_overrides(corpus, out, path, f"codec.family={family}", "decode.workers=0", *extra))
    assert run(cfg) == 0
    codec = load_codec(cfg.codec)
    rows = read_rows(out)
    # 12.5 s in 10 s windows: 2 rows; 4 s and 3 s: one each.
    assert sorted(rows) == [("hi.wav", 0), ("speech.wav", 0), ("stereo.flac", 0), ("stereo.flac", 1)]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["codec"]["num_codebooks"] == k and stats["codec"]["frame_rate"] == codec.frame_rate
    for (item, _), row in rows.items():
        assert row["codes"].shape == (k, row["n_frames"]) and row["n_frames"] == codec.n_frames(row["n_samples"])
        assert row["sample_rate"] == codec.sample_rate
        np.testing.assert_array_equal(row["codes"], _reference_codes(codec, cfg, corpus / item, row), err_msg=item)
    assert len(np.unique(rows[("stereo.flac", 0)]["codes"][0])) > 30


def _reference_codes(codec: Codec, cfg, path: Path, row: dict) -> np.ndarray:
    """The codec's encode of the row's segment zero-padded as README "Tokens" defines, in a batch of the pipeline's
    shape (the fixtures' codes do not depend on batch-mates, checked above)."""
    samples = decode_audio(str(path), target_sr=codec.sample_rate).samples
    start = round(row["start_s"] * codec.sample_rate)
    segment = torch.from_numpy(samples[:, start : start + row["n_samples"]])
    padded = SegmentPolicy.from_config(cfg.segment, codec.sample_rate).padded_len(row["n_samples"])
    batch = torch.zeros(BatchPolicy.from_config(cfg.batch, codec.sample_rate, 1).rows_for(padded), 1, padded)
    batch[0, :, : row["n_samples"]] = segment
    return codec.encode(batch)[0, :, : row["n_frames"]].numpy()
