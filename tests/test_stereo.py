"""MusicGen stereo (``channels=stereo``): the left and right channels are encoded separately by the mono 32 kHz
codec and interleaved per codebook, ``[L0, R0, L1, R1, ...]`` (K = 8), as audiocraft does.

audiocraft (facebookresearch/audiocraft, ``audiocraft/models/encodec.py``), ``InterleaveStereoCompressionModel``::

    indices_c0, scales_c0 = self.model.encode(x[:, 0, ...].unsqueeze(1))
    indices_c1, scales_c1 = self.model.encode(x[:, 1, ...].unsqueeze(1))
    indices = torch.stack([indices_c0, indices_c1], dim=0)
    indices = rearrange(indices, 'c b k t -> b (k c) t', c=2)   # per_timestep=False, MusicGen-stereo's setting

so output codebook ``2 k + c`` is codebook ``k`` of channel ``c``. ``_audiocraft_interleave`` below is that
``rearrange`` written with torch ops (einops is not a dependency here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import base_overrides, compose, frames_for, read_rows
from pipeline.audio import decode_audio
from pipeline.batching import BatchPolicy
from pipeline.codecs import Codec, load_codec
from pipeline.encode import interleave
from pipeline.segment import SegmentPolicy
from pipeline.testing.dummies import synth, write_audio
from pipeline.tokenize import run

SR = 32_000
# name, seconds, rate, channels: a stereo file (two windows), mono input (duplicated) and six channels (the first
# two are kept, as audiocraft's convert_audio_channels does).
FILES = [("stereo.flac", 12.5, 44_100, 2), ("mono.wav", 6.0, SR, 1), ("six.wav", 3.5, 48_000, 6)]


def _audiocraft_interleave(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``rearrange(torch.stack([left, right]), 'c b k t -> b (k c) t', c=2)`` for ``[B, K, T]`` codes."""
    indices = torch.stack([left, right], dim=0)  # [c, b, k, t]
    c, b, k, t = indices.shape
    return indices.permute(1, 2, 0, 3).reshape(b, k * c, t)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stereo_corpus")
    for i, (name, seconds, sr, channels) in enumerate(FILES):
        audio = synth(seconds, sr, channels, "music", seed=i)
        if channels == 2:  # make sure the channels differ clearly: the right one is other music
            audio[1] = synth(seconds, sr, 1, "music", seed=100 + i)[0]
        write_audio(root / name, audio, sr, "PCM_16")
    return root


@pytest.fixture(scope="module")
def tokenized(corpus: Path, tmp_path_factory, tiny_codec_dir: Path):
    out = tmp_path_factory.mktemp("stereo_out")
    cfg = compose(base_overrides(corpus, out, tiny_codec_dir, "channels=stereo", "decode.workers=0"))
    assert run(cfg) == 0
    return cfg, out


@pytest.fixture(scope="module")
def codec(tokenized) -> Codec:
    cfg, _ = tokenized
    return load_codec(cfg.codec)


def _per_channel_codes(codec: Codec, cfg, path: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """Left and right codes ``[4, T]`` of the row's segment: decoded with the stereo policy, each channel
    zero-padded to the segment's padded length and encoded by the mono codec as rows 0 and 1 of a batch of the
    pipeline's shape (a row's codes do not depend on its batch-mates: tests/test_tokenize.py)."""
    samples = decode_audio(str(path), target_sr=SR, channels="stereo").samples
    start = round(row["start_s"] * SR)
    segment = torch.from_numpy(samples[:, start : start + row["n_samples"]])
    padded = SegmentPolicy.from_config(cfg.segment, SR).padded_len(row["n_samples"])
    batch = torch.zeros(BatchPolicy.from_config(cfg.batch, SR, channels=2).rows_for(padded), 1, padded)
    batch[:2, 0, : row["n_samples"]] = segment
    codes = codec.encode(batch)[:2, :, : row["n_frames"]].numpy()
    return codes[0], codes[1]


def test_rows_have_eight_codebooks(tokenized) -> None:
    _, out = tokenized
    rows = read_rows(out)
    assert sorted(rows) == [("mono.wav", 0), ("six.wav", 0), ("stereo.flac", 0), ("stereo.flac", 1)]
    for row in rows.values():
        assert row["codes"].shape == (8, frames_for(row["n_samples"])) == (8, row["n_frames"])
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["codec"]["num_codebooks"], stats["codec"]["channels"]) == (8, "stereo")
    assert "[L0, R0, L1, R1, ...]" in (out / "README.md").read_text()


def test_even_codebooks_are_left_and_odd_are_right(tokenized, corpus: Path, codec: Codec) -> None:
    cfg, out = tokenized
    for (item, segment), row in read_rows(out).items():
        left, right = _per_channel_codes(codec, cfg, corpus / item, row)
        np.testing.assert_array_equal(row["codes"][0::2], left, err_msg=f"{item} {segment} left")
        np.testing.assert_array_equal(row["codes"][1::2], right, err_msg=f"{item} {segment} right")
        expected = _audiocraft_interleave(torch.from_numpy(left)[None], torch.from_numpy(right)[None])[0]
        np.testing.assert_array_equal(row["codes"], expected.numpy())


def test_stereo_channels_give_different_codes(tokenized) -> None:
    _, out = tokenized
    codes = read_rows(out)[("stereo.flac", 0)]["codes"]
    assert (codes[0::2] != codes[1::2]).mean() > 0.5


def test_mono_input_gives_identical_left_and_right(tokenized) -> None:
    _, out = tokenized
    codes = read_rows(out)[("mono.wav", 0)]["codes"]
    np.testing.assert_array_equal(codes[0::2], codes[1::2])


def test_interleave_is_audiocraft_order() -> None:
    left, right = torch.randint(2048, (2, 1, 4, 7), generator=torch.Generator().manual_seed(0))
    ours = interleave(torch.stack([left[0], right[0]]).numpy())
    np.testing.assert_array_equal(ours, _audiocraft_interleave(left, right)[0].numpy())
    # Written out for K = 2: [L0, R0, L1, R1].
    small = interleave(np.array([[[10], [11]], [[20], [21]]]))  # [C=2, K=2, T=1]
    assert small[:, 0].tolist() == [10, 20, 11, 21]


def test_training_reader_delays_stereo_pairs_together(tokenized) -> None:
    """``TokenDataset`` on a stereo output takes ``delay_group=2`` from the shards' metadata: L and R of a
    codebook share their delay (MusicGen-stereo), 4 added steps for K=8; ``undelay`` gives the stored codes."""
    from pipeline.data import TokenDataset, delay_group_of, undelay

    _, out = tokenized
    assert delay_group_of(out) == 2
    rows = read_rows(out)
    ds = TokenDataset(out, crop_frames=100, random_crop=False, delay_pattern=True)
    examples = list(ds)
    assert examples and ds.opts.delay_group == 2
    for e in examples:
        assert e["codes"].shape == (8, 104) and int(e["mask"].sum()) == e["length"] + 4
        stored = rows[(e["id"], e["segment_index"])]["codes"]
        np.testing.assert_array_equal(undelay(e["codes"], group=2)[:, : e["length"]].numpy(),
                                      stored[:, : e["length"]])
        tokens = e["token_mask"]  # where real codes sit: L and R of a codebook on the same steps, the next later
        assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[2], tokens[3])
        assert not torch.equal(tokens[1], tokens[2])
