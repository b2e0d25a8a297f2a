"""The decode stage on real files generated in tmp_path: formats, rates, channel policies, hostile files."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from pipeline.audio import (
    AudioError,
    BadChannels,
    BadSampleRate,
    EmptyFile,
    GrowingAudio,
    NoAudioFrames,
    NonFiniteAudio,
    NotAFile,
    TruncatedAudio,
    UndecodableAudio,
    decode_audio,
    open_audio,
    probe_duration,
)
from pipeline import mp3
from pipeline.testing import dummies

TARGET_SR = 32000
DURATION_S = 0.5


def _reference(audio: np.ndarray, sr: int) -> np.ndarray:
    """What decode should return for ``audio`` [C, n] at ``sr``: soxr HQ resample to the target rate."""
    return soxr.resample(np.ascontiguousarray(audio.T), sr, TARGET_SR, quality="HQ").T


def _cut(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# --- lossless: exact length and samples --------------------------------------------------------------------------

# Worst-case per-sample error after averaging and resampling is about one quantization step of the subtype.
_QUANT_TOL = {"PCM_U8": 1.5e-2, "PCM_16": 1e-4, "PCM_24": 1e-5, "PCM_32": 1e-5, "FLOAT": 1e-5}


@pytest.mark.parametrize(
    ("suffix", "subtype", "sr", "channels"),
    [
        (".wav", "PCM_U8", 8000, 1),
        (".wav", "PCM_16", 16000, 2),
        (".wav", "PCM_24", 22050, 1),
        (".wav", "PCM_32", 44100, 6),
        (".wav", "FLOAT", 48000, 2),
        (".wav", "PCM_16", 96000, 1),
        (".flac", "PCM_16", 44100, 2),
        (".flac", "PCM_24", 96000, 6),
        (".aiff", "PCM_16", 22050, 2),
    ],
)
def test_lossless_decodes_exactly(tmp_path, suffix, subtype, sr, channels):
    audio = dummies.synth(DURATION_S, sr, channels, seed=sr)
    path = dummies.write_audio(tmp_path / f"x{suffix}", audio, sr, subtype)

    out = decode_audio(path, target_sr=TARGET_SR)

    n = audio.shape[1]
    assert out.samples.shape == (1, round(n * TARGET_SR / sr))  # soxr's output length, measured exact
    assert out.samples.dtype == np.float32 and out.samples.flags.c_contiguous
    assert (out.sample_rate, out.source_sample_rate, out.source_channels) == (TARGET_SR, sr, channels)
    expected = _reference(audio.mean(axis=0, keepdims=True), sr)
    np.testing.assert_allclose(out.samples, expected, atol=_QUANT_TOL[subtype])


def test_same_rate_is_not_resampled(tmp_path):
    audio = dummies.synth(DURATION_S, TARGET_SR, 1)
    path = dummies.write_audio(tmp_path / "x.wav", audio, TARGET_SR, "FLOAT")
    out = decode_audio(path, target_sr=TARGET_SR)
    np.testing.assert_array_equal(out.samples, audio)


# --- lossy and ffmpeg-only formats: length within a codec frame, waveform close -----------------------------------


def _sf(suffix):
    return lambda path, audio, sr: dummies.write_audio(path.with_suffix(suffix), audio, sr)


def _av(suffix, codec, **kw):
    return lambda path, audio, sr: dummies.write_with_av(path.with_suffix(suffix), audio, sr, codec, **kw)


def _video(path, audio, sr):
    return dummies.write_video(path.with_suffix(".mp4"), audio, sr)


# (writer, file rate, channels, rate the decoder reports, lag in source samples). libsndfile decodes Ogg Opus at
# the rate in its header; ffmpeg's opus decoder always gives 48 kHz, but soundfile is tried first. Lags measured:
# an mp3 without the Xing/LAME header keeps LAME's 576 + 529 samples of encoder+decoder delay (nothing says how
# much to drop), and ffmpeg's own wmav2 encoder loses the first 2048 samples; every other priming is removed.
LOSSY = {
    "ogg-44k-2ch": (_sf(".ogg"), 44100, 2, 44100, 0),
    "ogg-96k-6ch": (_sf(".ogg"), 96000, 6, 96000, 0),
    "mp3-44k-2ch": (_sf(".mp3"), 44100, 2, 44100, 0),
    "mp3-8k-1ch": (_sf(".mp3"), 8000, 1, 8000, 0),
    "mp3-noxing-48k": (_av(".mp3", "libmp3lame", options={"write_xing": "0"}), 48000, 2, 48000, 1105),
    "opus-48k-2ch": (_av(".opus", "libopus"), 48000, 2, 48000, 0),
    "opus-16k-1ch": (_av(".opus", "libopus"), 16000, 1, 16000, 0),
    "m4a-44k-2ch": (_av(".m4a", "aac"), 44100, 2, 44100, 0),
    "m4a-96k-1ch": (_av(".m4a", "aac"), 96000, 1, 96000, 0),
    "m4a-8k-1ch": (_av(".m4a", "aac"), 8000, 1, 8000, 0),
    "m4a-48k-6ch": (_av(".m4a", "aac"), 48000, 6, 48000, 0),
    "wma-44k-2ch": (_av(".wma", "wmav2", bit_rate=128000), 44100, 2, 44100, -2048),
    "mp4-video-48k": (_video, 48000, 2, 48000, 0),
}


@pytest.mark.parametrize("case", LOSSY)
def test_lossy_and_ffmpeg_formats(tmp_path, case):
    write, sr, channels, decoded_sr, lag = LOSSY[case]
    audio = dummies.synth(DURATION_S, sr, channels, seed=1)
    path = write(tmp_path / "x", audio, sr)

    out = decode_audio(path, target_sr=TARGET_SR)

    assert (out.sample_rate, out.source_sample_rate, out.source_channels) == (TARGET_SR, decoded_sr, channels)
    # Lossy codecs pad (aac to its 1024-sample frame) or shift (lag above) by under two codec frames.
    expected_len = round(DURATION_S * TARGET_SR)
    assert abs(out.samples.shape[1] - expected_len) <= 2304 * TARGET_SR / sr
    # The waveform lines up at the expected lag, ``out[t + lag] ~ ref[t]``: correlation peaks there (to a sample).
    ref = _reference(audio.mean(axis=0, keepdims=True), sr)[0]
    lag = round(lag * TARGET_SR / sr)
    corr = {k: _corr_at_lag(ref, out.samples[0], k) for k in range(lag - 20, lag + 21)}
    best = max(corr, key=corr.get)
    assert abs(best - lag) <= 1 and corr[best] > 0.95, (best, corr[best])


@pytest.mark.parametrize("writer", ["libsndfile", "ffmpeg"])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_joined_mp3_files_decode_in_full(tmp_path, writer, as_bytes):
    # ``cat a.mp3 b.mp3``: the first file's Xing header speaks for 2 s, libsndfile would stop there.
    sr = 44100
    parts = [dummies.synth(s, sr, 2, seed=i) for i, s in enumerate((2.0, 3.0))]
    write = _sf(".mp3") if writer == "libsndfile" else _av(".mp3", "libmp3lame")
    joined = b"".join(write(tmp_path / f"part{i}", a, sr).read_bytes() for i, a in enumerate(parts))
    path = tmp_path / "joined.mp3"
    path.write_bytes(joined)

    out = decode_audio(joined if as_bytes else path, target_sr=TARGET_SR)

    # Both parts, give or take the second one's encoder delay and a frame of padding at the join.
    assert abs(out.samples.shape[1] / TARGET_SR - 5.0) < 0.1, out.samples.shape[1] / TARGET_SR
    whole = decode_audio(write(tmp_path / "whole", parts[0], sr), target_sr=TARGET_SR)
    np.testing.assert_allclose(out.samples[:, : TARGET_SR], whole.samples[:, : TARGET_SR], atol=1e-4)


@pytest.mark.parametrize("tags", ["", "id3v1", "ape+id3v1"])
def test_mp3_extent_counts_only_audio_bytes(tmp_path, tags):
    path = _sf(".mp3")(tmp_path / "x", dummies.synth(1.0, 44100, 2), 44100)
    whole = mp3.read_extent(path)
    assert whole is not None and whole.present_bytes == whole.declared_bytes
    ape_items = b"\x05\x00\x00\x00\x00\x00\x00\x00Title\x00hello"
    ape = (b"APETAGEX" + struct.pack("<IIII", 2000, 32 + len(ape_items), 1, 0) + bytes(8))
    trailer = {"": b"", "id3v1": b"TAG" + bytes(125), "ape+id3v1": ape_items + ape + b"TAG" + bytes(125)}[tags]
    path.write_bytes(path.read_bytes() + trailer)
    assert mp3.read_extent(path) == whole
    assert decode_audio(path, target_sr=TARGET_SR).samples.shape[1] == round(1.0 * TARGET_SR)


def test_mp3_without_xing_states_nothing(tmp_path):
    path = _av(".mp3", "libmp3lame", options={"write_xing": "0"})(tmp_path / "x", dummies.synth(1.0, 44100, 2), 44100)
    assert mp3.read_extent(path) is None


def _corr_at_lag(ref: np.ndarray, got: np.ndarray, lag: int) -> float:
    got, ref = got[max(lag, 0) :], ref[max(-lag, 0) :]
    n = min(len(ref), len(got)) - 800  # the last few ms may be the codec's padding
    return float(np.corrcoef(ref[:n], got[:n])[0, 1])


def test_bytes_source_matches_path(tmp_path):
    for path in (
        dummies.write_audio(tmp_path / "x.flac", dummies.synth(DURATION_S, 44100, 2), 44100),
        dummies.write_with_av(tmp_path / "x.m4a", dummies.synth(DURATION_S, 44100, 2), 44100),
    ):
        from_path = decode_audio(path, target_sr=TARGET_SR)
        from_bytes = decode_audio(path.read_bytes(), target_sr=TARGET_SR, name=path.name)
        np.testing.assert_array_equal(from_bytes.samples, from_path.samples)


# --- channel policy ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_stereo_policy(tmp_path, channels):
    sr = 44100
    audio = dummies.synth(DURATION_S, sr, channels)
    path = dummies.write_audio(tmp_path / "x.wav", audio, sr, "FLOAT")

    out = decode_audio(path, target_sr=TARGET_SR, channels="stereo")

    # audiocraft convert_audio_channels: duplicate mono, keep the first two channels otherwise.
    expected = _reference(np.repeat(audio, 2, axis=0) if channels == 1 else audio[:2], sr)
    np.testing.assert_allclose(out.samples, expected, atol=1e-5)
    assert out.source_channels == channels


def _dominant_hz(samples: np.ndarray, sr: int = TARGET_SR) -> float:
    return float(np.fft.rfftfreq(len(samples), 1 / sr)[np.argmax(np.abs(np.fft.rfft(samples)))])


@pytest.mark.parametrize("freqs", [(200, 300, 450), (200, 300, 450, 50, 600, 750)], ids=["3.0", "5.1"])
def test_ogg_multichannel_comes_in_wav_order(tmp_path, freqs):
    # One tone per channel, given in WAV order (FL, FR, FC, LFE, BL, BR); ffmpeg stores them in Vorbis order
    # (FL, FC, FR, ...), which libsndfile hands over as stored: stereo must still keep front left and right.
    sr = 48000
    t = np.arange(sr) / sr
    audio = np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)
    path = dummies.write_with_av(tmp_path / "x.opus", audio, sr, "libopus", bit_rate=256000)
    assert sf.info(str(path)).format == "OGG"  # decoded by libsndfile, not PyAV

    out = decode_audio(path, target_sr=TARGET_SR, channels="stereo")

    assert [_dominant_hz(ch) for ch in out.samples] == [200.0, 300.0]
    assert out.source_channels == len(freqs)


def test_silence_is_valid(tmp_path):
    path = dummies.write_audio(tmp_path / "x.wav", dummies.synth(DURATION_S, 16000, kind="silence"), 16000)
    out = decode_audio(path, target_sr=TARGET_SR)
    assert out.samples.shape == (1, round(DURATION_S * TARGET_SR)) and not out.samples.any()


# --- resampler quality -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quality", ["HQ", "VHQ"])
def test_resampler_matches_analytic_sine(tmp_path, quality):
    sr, freq = 44100, 1000.0
    sine = 0.5 * np.sin(2 * np.pi * freq * np.arange(sr) / sr)
    path = dummies.write_audio(tmp_path / "sine.wav", sine[None].astype(np.float32), sr, "FLOAT")

    out = decode_audio(path, target_sr=TARGET_SR, quality=quality)

    analytic = 0.5 * np.sin(2 * np.pi * freq * np.arange(out.samples.shape[1]) / TARGET_SR)
    # The first and last few ms ring (the input starts and stops abruptly); judge the steady state.
    err = np.abs(out.samples[0] - analytic)[1000:-1000]
    # Measured: max 3.7e-7 (HQ) and 3e-8 (VHQ), i.e. float32 precision; 1e-5 is -100 dBFS.
    assert err.max() < 1e-5, err.max()


# --- hostile files -----------------------------------------------------------------------------------------------


def _streaming_wav(path, seconds: float = DURATION_S, age_s: float = 3600.0, extra: bytes = b""):
    """A valid WAV whose RIFF and data sizes say "unknown" (0xFFFFFFFF), as ffmpeg writes to a pipe, last modified
    ``age_s`` ago (a finished file, by default), with ``extra`` bytes appended (a partial frame)."""
    path = dummies.write_audio(path, dummies.synth(seconds, 16000), 16000)
    data = bytearray(path.read_bytes())
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data) + extra)
    os.utime(path, (time.time() - age_s,) * 2)
    return path


HOSTILE = {
    "empty": (lambda d: dummies.write_empty(d / "x.wav"), EmptyFile, "empty"),
    "header_only": (lambda d: dummies.write_header_only_wav(d / "x.wav"), NoAudioFrames, "no_frames"),
    "video_without_audio": (lambda d: dummies.write_video(d / "x.mp4", None), NoAudioFrames, "no_frames"),
    "truncated_wav": (lambda d: dummies.write_truncated_wav(d / "x.wav"), TruncatedAudio, "truncated"),
    "truncated_aiff": (
        lambda d: _cut(dummies.write_audio(d / "x.aiff", dummies.synth(1.0, 16000), 16000)),
        TruncatedAudio,
        "truncated",
    ),
    "nan": (lambda d: dummies.write_nan_wav(d / "x.wav"), NonFiniteAudio, "non_finite"),
    "inf": (lambda d: dummies.write_nan_wav(d / "x.wav", value=np.inf), NonFiniteAudio, "non_finite"),
    "garbage": (lambda d: dummies.write_garbage(d / "x.mp3"), UndecodableAudio, "undecodable"),
    # ffmpeg takes random bytes named .flac for a FLAC stream of 0 frames; libsndfile did not recognise the file,
    # so it is undecodable, not an audio file without frames.
    "garbage_named_flac": (lambda d: dummies.write_garbage(d / "x.flac"), UndecodableAudio, "undecodable"),
    # A cut FLAC loses sync in both libsndfile and ffmpeg, so it is undecodable rather than "truncated".
    "truncated_flac": (
        lambda d: _cut(dummies.write_audio(d / "x.flac", dummies.synth(1.0, 16000), 16000)),
        UndecodableAudio,
        "undecodable",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_hostile_file_raises_typed_error(tmp_path, case, as_bytes):
    make, error, reason = HOSTILE[case]
    path = make(tmp_path)
    source = path.read_bytes() if as_bytes else path

    with pytest.raises(error) as info:
        decode_audio(source, target_sr=TARGET_SR, name=str(path))

    assert info.value.reason == reason
    assert str(path) in str(info.value)


def test_undecodable_names_every_backend(tmp_path):
    path = dummies.write_garbage(tmp_path / "x.wav")
    with pytest.raises(UndecodableAudio, match=r"x\.wav.*soundfile: .*pyav: "):
        decode_audio(path, target_sr=TARGET_SR)


@pytest.mark.parametrize("make", [lambda d: (d / "x.wav").mkdir() or d / "x.wav", lambda d: d / "missing.wav"])
def test_not_a_file(tmp_path, make):
    with pytest.raises(NotAFile) as info:
        decode_audio(make(tmp_path), target_sr=TARGET_SR)
    assert info.value.reason == "not_a_file" and isinstance(info.value, AudioError)


def test_unknown_length_wav_is_not_truncated(tmp_path):
    out = decode_audio(_streaming_wav(tmp_path / "x.wav"), target_sr=TARGET_SR)
    assert out.samples.shape[1] == round(DURATION_S * TARGET_SR)


def test_unknown_length_wav_still_being_written_is_not_ok(tmp_path):
    """An unknown-size WAV is read to its end, but its end is only where its writer is now: one still being written
    was stored as ok with 8 of 20 s. Now it must show it is done (see ``audio._SETTLE_S``): changed lately, changed
    while read, or ending inside a frame, it fails with the header's sizes named; as bytes, only whole frames count."""
    fresh = _streaming_wav(tmp_path / "fresh.wav", age_s=0.0)
    with pytest.raises(GrowingAudio, match=r"fresh\.wav: header declares an unknown data size \(0xFFFFFFFF.*modified"):
        decode_audio(fresh, target_sr=TARGET_SR)
    assert decode_audio(fresh.read_bytes(), target_sr=TARGET_SR).samples.shape[1] == round(DURATION_S * TARGET_SR)
    partial = _streaming_wav(tmp_path / "partial.wav", extra=b"\x01")  # 16-bit mono: a frame is 2 bytes
    for source in (partial, partial.read_bytes()):
        with pytest.raises(TruncatedAudio, match=r"ends inside a frame") as info:
            decode_audio(source, target_sr=TARGET_SR)
        assert info.value.reason == "truncated"
    # Appended to while it is read (the stream reads one block at a time; 20 s is more than one block).
    growing = _streaming_wav(tmp_path / "growing.wav", seconds=20.0)
    stream = open_audio(growing, target_sr=16000)
    next(stream.blocks)
    with growing.open("ab") as f:
        f.write(bytes(32000))
    with pytest.raises(GrowingAudio, match=r"changed while it was read") as info:
        list(stream.blocks)
    assert info.value.reason == "growing"


def _patched_wav(path: Path, rate: int | None = None, channels: int | None = None) -> Path:
    """A real 16-bit WAV whose fmt chunk is rewritten to claim ``rate`` Hz / ``channels`` channels."""
    path = dummies.write_audio(path, dummies.synth(0.2, 16000), 16000, "PCM_16")
    data = bytearray(path.read_bytes())
    if rate is not None:
        data[24:28], data[28:32] = struct.pack("<I", rate), struct.pack("<I", rate * 2)
    if channels is not None:
        data[22:24], data[32:34] = struct.pack("<H", channels), struct.pack("<H", 2 * channels)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_header_rate_and_channels_are_bounded(tmp_path, as_bytes):
    """A WAV claiming 1 Hz made 120 rows of 30 s from 1.2 KB. Rates outside [1000, 768000] Hz and channel counts
    outside [1, 64] fail, each with its own reason; the bounds themselves are fine."""
    cases = {"1hz": (dict(rate=1), BadSampleRate), "2mhz": (dict(rate=2_000_000), BadSampleRate),
             "100ch": (dict(channels=100), BadChannels), "1000hz": (dict(rate=1000), None),
             "64ch": (dict(channels=64), None)}
    for name, (patch, error) in cases.items():
        path = _patched_wav(tmp_path / f"{name}.wav", **patch)
        source = path.read_bytes() if as_bytes else path
        if error is None:
            assert decode_audio(source, target_sr=TARGET_SR).samples.shape[1] > 0
            continue
        with pytest.raises(error, match="header") as info:
            decode_audio(source, target_sr=TARGET_SR, name=str(path))
        assert info.value.reason in ("bad_sample_rate", "bad_channels") and str(path) in str(info.value)


def test_unknown_length_flac_falls_back_to_pyav(tmp_path):
    """STREAMINFO total samples = 0 ("unknown", as streamed encoders write): libsndfile cannot size it, ffmpeg can."""
    path = dummies.write_audio(tmp_path / "x.flac", dummies.synth(DURATION_S, 16000), 16000)
    data = bytearray(path.read_bytes())
    data[21] &= 0xF0  # the low 36 bits of bytes 18..25 are the total sample count
    data[22:26] = bytes(4)
    path.write_bytes(bytes(data))
    out = decode_audio(path, target_sr=TARGET_SR)
    assert out.samples.shape == (1, round(DURATION_S * TARGET_SR))


def test_unclosed_wav_falls_back_to_pyav(tmp_path):
    """A recorder that crashed before filling in the data size (0): libsndfile reads 0 frames, ffmpeg all."""
    path = dummies.write_audio(tmp_path / "x.wav", dummies.synth(DURATION_S, 16000), 16000)
    data = bytearray(path.read_bytes())
    data[40:44] = bytes(4)
    path.write_bytes(bytes(data))
    assert decode_audio(path, target_sr=TARGET_SR).samples.shape == (1, round(DURATION_S * TARGET_SR))


def test_slightly_overstated_wav_size_is_not_truncated(tmp_path):
    """A writer that counts a few header bytes into the data size has not lost audio."""
    path = dummies.write_audio(tmp_path / "x.wav", dummies.synth(DURATION_S, 16000), 16000)
    data = bytearray(path.read_bytes())
    data[40:44] = (int.from_bytes(data[40:44], "little") + 36).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert decode_audio(path, target_sr=TARGET_SR).samples.shape == (1, round(DURATION_S * TARGET_SR))


def test_bad_arguments_fail_fast(tmp_path):
    path = dummies.write_audio(tmp_path / "x.wav", dummies.synth(DURATION_S, 16000), 16000)
    for kwargs in ({"channels": "5.1"}, {"quality": "LQ"}, {"target_sr": 0}):
        with pytest.raises(ValueError):
            decode_audio(path, **{"target_sr": TARGET_SR, **kwargs})


# --- probe -------------------------------------------------------------------------------------------------------


def test_probe_duration(tmp_path):
    wav = dummies.write_audio(tmp_path / "x.wav", dummies.synth(DURATION_S, 22050), 22050)
    m4a = dummies.write_with_av(tmp_path / "x.m4a", dummies.synth(DURATION_S, 44100), 44100)
    assert probe_duration(wav) == pytest.approx(DURATION_S)
    assert probe_duration(m4a) == pytest.approx(DURATION_S, abs=0.03)
    assert probe_duration(dummies.write_garbage(tmp_path / "g.wav")) is None
    assert probe_duration(tmp_path) is None
    assert probe_duration(tmp_path / "missing.flac") is None
    # libsndfile's 0 frames may mean "size never written", so the probe asks ffmpeg, which knows nothing either.
    assert probe_duration(dummies.write_header_only_wav(tmp_path / "h.wav")) is None
    assert sf.info(str(wav)).frames == round(DURATION_S * 22050)


@pytest.mark.parametrize("channels", [2, 3, 6])
def test_mono_downmix_is_numpy_mean_bit_for_bit(channels):
    """The fast stereo downmix must give the very floats of ``mean(axis=0)`` (tokens depend on every bit), signed
    zeros and subnormals included; other channel counts use mean itself."""
    from pipeline.audio import _apply_channel_policy

    rng = np.random.default_rng(channels)
    frames = (rng.standard_normal((100_003, channels)) * rng.choice([1e-4, 1.0, 1e4], (100_003, channels)))
    frames = frames.astype(np.float32)
    frames[::97] = -0.0
    frames[1::101, 0] = 0.0
    frames[2::89] = np.float32(1e-40)  # subnormal
    samples = frames.T  # soundfile's [n, C] frames seen as [C, n], as the decoder hands them on
    want = samples.mean(axis=0, keepdims=True)
    got = _apply_channel_policy(samples, "mono")
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("channels_out", ["mono", "stereo"])
@pytest.mark.parametrize(("suffix", "channels"), [(".wav", 2), (".flac", 2), (".flac", 1), (".aiff", 3)])
def test_16_bit_pcm_read_as_integers_is_bit_identical(tmp_path, monkeypatch, suffix, channels, channels_out):
    """16-bit PCM is read as int16 and scaled here (faster); the floats must be libsndfile's float read's, bit for
    bit, through the downmix and the resampler: full-scale samples, both extremes, more than one block."""
    import pipeline.audio as audio_mod

    sr = 44100
    rng = np.random.default_rng(channels)
    n = audio_mod.BLOCK_FRAMES + 4321
    ints = rng.integers(-32768, 32768, (channels, n), dtype=np.int32)
    ints[:, :50] = -32768
    ints[:, 50:100] = 32767
    ints[0, 100:150], ints[-1, 100:150] = -32768, 32767  # L + R = -1
    path = tmp_path / f"x{suffix}"
    sf.write(str(path), (ints.T / 32768.0).astype(np.float64), sr, subtype="PCM_16")

    _, _, blocks = audio_mod._soundfile_open(str(path), "x")
    assert next(blocks).dtype == np.int16  # the integer path is the one under test
    fast = decode_audio(path, target_sr=TARGET_SR, channels=channels_out).samples
    monkeypatch.setattr(audio_mod, "_INT16_SUBTYPES", frozenset())
    _, _, blocks = audio_mod._soundfile_open(str(path), "x")
    assert next(blocks).dtype == np.float32
    slow = decode_audio(path, target_sr=TARGET_SR, channels=channels_out).samples

    assert fast.dtype == slow.dtype == np.float32 and fast.shape == slow.shape
    assert np.array_equal(fast.view(np.int32), slow.view(np.int32))


def test_24_bit_pcm_is_read_as_floats(tmp_path):
    import pipeline.audio as audio_mod

    path = dummies.write_audio(tmp_path / "x.flac", dummies.synth(0.2, 44100, 2), 44100, "PCM_24")
    _, _, blocks = audio_mod._soundfile_open(str(path), "x")
    assert next(blocks).dtype == np.float32
