"""EnCodec 48 kHz end to end (``codec=encodec_48khz``, here the tiny 48 kHz fixture): a stereo-input, normalising,
chunked codec. A row is one segment with both channels in one encode call (K codebooks, not interleaved), its codes
are the chunks' codes one after another, and its ``scales`` column holds one loudness scale per chunk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import base_overrides, compose, read_rows
from pipeline.audio import decode_audio
from pipeline.batching import BatchPolicy
from pipeline.codecs import Codec, load_codec
from pipeline.codecs.testing import fixture_codec_dir
from pipeline.layout import OutputLayout
from pipeline.segment import SegmentPolicy
from pipeline.testing.dummies import synth, write_audio
from pipeline.tokenize import run
from pipeline.verify import VerifyOptions, verify
from pipeline.finalize import CodecInfo

SR = 48_000
# name, seconds, rate, channels: in 3 s windows (tails down to 0.5 s kept) these give rows of 1 to 4 chunks, from
# stereo files at and off the codec rate and from mono files (duplicated to both channels by channels=stereo).
FILES = [("stereo.flac", 3.8, 48_000, 2), ("mono.wav", 2.4, 44_100, 1), ("stereo32.wav", 2.0, 32_000, 2)]
ROWS = [("mono.wav", 0), ("stereo.flac", 0), ("stereo.flac", 1), ("stereo32.wav", 0)]


def _overrides(corpus: Path, out: Path, codec_dir: Path, *extra: str) -> list[str]:
    return base_overrides(corpus, out, codec_dir, "codec.family=encodec", "codec.overlapping_chunks=true",
                          "segment.length_s=3", "segment.min_s=0.5", "decode.workers=0", *extra)


@pytest.fixture(scope="module")
def enc48_dir() -> Path:
    return fixture_codec_dir("tiny_48khz")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("enc48_corpus")
    for i, (name, seconds, sr, channels) in enumerate(FILES):
        audio = synth(seconds, sr, channels, "music", seed=i)
        if channels == 2:  # channels that clearly differ: the right one is other music
            audio[1] = synth(seconds, sr, 1, "music", seed=100 + i)[0]
        write_audio(root / name, audio, sr, "PCM_16")
    return root


@pytest.fixture(scope="module")
def tokenized(corpus: Path, enc48_dir: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc48_out")
    cfg = compose(_overrides(corpus, out, enc48_dir, "channels=stereo"))
    assert run(cfg) == 0
    return cfg, out


@pytest.fixture(scope="module")
def codec(tokenized) -> Codec:
    cfg, _ = tokenized
    return load_codec(cfg.codec)


def _reference(codec: Codec, cfg, path: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """The codec's own ``encode_with_scales`` of the row's stereo segment, zero-padded as README "Tokens" defines, in a
    batch of the pipeline's shape; codes trimmed to ``n_frames`` and scales to the segment's chunks."""
    samples = decode_audio(str(path), target_sr=SR, channels="stereo").samples
    start = round(row["start_s"] * SR)
    segment = torch.from_numpy(samples[:, start : start + row["n_samples"]])
    padded = SegmentPolicy.from_config(cfg.segment, SR).padded_len(row["n_samples"])
    rows = BatchPolicy.from_config(cfg.batch, SR, channels=1, row_channels=2).rows_for(padded)
    batch = torch.zeros(rows, 2, padded)
    batch[0, :, : row["n_samples"]] = segment
    codes, scales = codec.encode_with_scales(batch)
    return codes[0, :, : row["n_frames"]].numpy(), scales[0, : codec.n_chunks(row["n_samples"])].numpy()


def test_rows_have_the_codecs_k_and_one_scale_per_chunk(tokenized, codec: Codec) -> None:
    _, out = tokenized
    rows = read_rows(out)
    assert sorted(rows) == ROWS
    chunks = set()
    for key, row in rows.items():
        assert row["codes"].shape == (codec.num_codebooks, codec.n_frames(row["n_samples"])), key  # K not doubled
        if len(row["scales"]) > 1:  # overlapping chunks: more frames than ceil(n / hop)
            assert row["n_frames"] > -(-row["n_samples"] // codec.hop_length), key
        assert len(row["scales"]) == codec.n_chunks(row["n_samples"]) and min(row["scales"]) > 0, key
        chunks.add(len(row["scales"]))
    assert chunks == {1, 3, 4}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["codec"] == {
        "pretrained": str(fixture_codec_dir("tiny_48khz")), "sample_rate": SR, "frame_rate": 150.0,
        "num_codebooks": codec.num_codebooks, "cardinality": 1024, "channels": "stereo", "family": "encodec",
        "input_channels": 2, "chunk_length": 48_000, "chunk_stride": 47_520,
    }


def test_codes_and_scales_are_the_codecs_own(tokenized, corpus: Path, codec: Codec) -> None:
    cfg, out = tokenized
    for (item, segment), row in read_rows(out).items():
        codes, scales = _reference(codec, cfg, corpus / item, row)
        np.testing.assert_array_equal(row["codes"], codes, err_msg=f"{item} {segment}")
        np.testing.assert_allclose(np.asarray(row["scales"], np.float32), scales, rtol=1e-6, err_msg=item)


def test_decoding_with_the_stored_scales(tokenized, corpus: Path, codec: Codec) -> None:
    cfg, out = tokenized
    row = read_rows(out)[("stereo.flac", 0)]
    codes, scales = _reference(codec, cfg, corpus / "stereo.flac", row)
    stored_codes = torch.from_numpy(row["codes"].astype(np.int64))[None]
    decoded = codec.decode(stored_codes, torch.tensor([row["scales"]], dtype=torch.float32))
    torch.testing.assert_close(decoded, codec.decode(torch.from_numpy(codes)[None], torch.from_numpy(scales)[None]))
    # 4 chunks: 3 strides, then the 5 frames of the last one.
    assert decoded.shape == (1, 2, 3 * 47_520 + 5 * 320)
    # The scales restore the level: decoding without them is at unit loudness, far louder than this audio.
    assert decoded.pow(2).mean() < 0.1 * codec.decode(stored_codes).pow(2).mean()


def test_card_and_verify(tokenized, tmp_path: Path) -> None:
    _, out = tokenized
    card = (out / "README.md").read_text()
    assert "[L0, R0" not in card and "not interleaved" in card and "- encodec" in card
    assert "ceil(n_samples / 320)" not in card and "n_chunks = ceil(n_samples / 47520)" in card
    result = verify(out, VerifyOptions(sample=0, decode=0, report_dir=tmp_path / "report"))
    assert result.ok, result.problems
    # The default verify re-encodes (both channels in one row) and decodes with the stored scales.
    full = verify(out, VerifyOptions(sample=4, decode=2, report_dir=tmp_path / "report2"))
    assert full.ok, full.problems
    assert full.report["reencode"]["rows"] == 4 and full.report["reencode"]["flip_rate"] == 0.0
    assert len(list((tmp_path / "report2" / "audio").glob("*_decoded.wav"))) == 2


def test_verify_counts_frames_as_the_codec_does(codec: Codec) -> None:
    facts = CodecInfo("x", SR, 150.0, codec.num_codebooks, 1024, "stereo", "encodec", 2, 48_000, 47_520)
    lengths = np.array([1, 319, 320, 47_519, 47_520, 47_521, 48_000, 95_040, 144_000, 10 * SR + 7])
    assert facts.n_frames(lengths).tolist() == [codec.n_frames(int(n)) for n in lengths]


def test_mono_codec_rows_have_null_scales_and_the_same_schema(tokenized, corpus: Path, tiny_codec_dir: Path,
                                                              tmp_path: Path) -> None:
    _, out48 = tokenized
    out = tmp_path / "out"
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir, "decode.workers=0", "dataset.limit=1"))) == 0
    rows = read_rows(out)
    assert rows and all(row["scales"] is None for row in rows.values())
    mono, stereo = (pq.read_schema(next((o / "data").glob("*.parquet"))) for o in (out, out48))
    assert mono.equals(stereo, check_metadata=False) and mono.field("scales").type.value_type == pa.float32()


def test_stereo_input_codec_needs_channels_stereo(corpus: Path, enc48_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="takes stereo input, but channels=mono; set channels=stereo"):
        run(compose(_overrides(corpus, out, enc48_dir, "channels=mono")))
    assert not OutputLayout(out).plan.exists()
