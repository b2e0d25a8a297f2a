"""Long files stream: a worker holds one decode block and one window, never the whole recording."""

from __future__ import annotations

import tracemalloc

import numpy as np
import soundfile as sf

from pipeline.audio import decode_audio
from pipeline.config import SegmentConfig
from pipeline.segment import SegmentPolicy, segment_item
from pipeline.sources.folder import FolderSource
from pipeline.workers import DecodeSpec, DecodeTask, process_item


def _long_wav(path, minutes: float, sr: int = 44100, channels: int = 2):
    """A long 16-bit file written in chunks (noise: cheap to make, impossible to compress away)."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", sr, channels, subtype="PCM_16") as f:
        for _ in range(int(minutes * 60)):
            f.write((0.1 * rng.standard_normal((sr, channels))).astype(np.float32))
    return path


def _spec(root, length_s=30.0):
    policy = SegmentPolicy.from_config(SegmentConfig(length_s=length_s, min_s=1.0), 32000)
    return DecodeSpec(FolderSource(str(root), ["wav"]), 32000, "mono", "HQ", policy)


def test_twelve_minute_file_streams_in_bounded_memory(tmp_path):
    _long_wav(tmp_path / "long.wav", minutes=12)
    spec = _spec(tmp_path)
    item = spec.source.list_items()[0]
    windows, finals = [], []

    def emit(result):  # keep what the runner would keep: the accounting, not the audio
        windows.extend((s.start_s, s.n_samples) for s in result.segments)
        if result.final:
            finals.append(result)

    tracemalloc.start()
    process_item(DecodeTask(item, 0), spec, emit)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert finals[0].failure is None and finals[0].audio_s == 720.0
    assert windows == [(30.0 * i, 960000) for i in range(24)]
    whole_file = 720 * 44100 * 2 * 4  # the source decoded whole, as float32: 254 MB
    assert peak < 40e6, f"peak {peak / 1e6:.0f} MB: the file was held whole ({whole_file / 1e6:.0f} MB)"


def test_stream_equals_whole_file_decode(tmp_path):
    """Streamed segments are sample-identical to cutting the whole decoded file (verify re-encodes that way)."""
    path = _long_wav(tmp_path / "song.wav", minutes=0.75, sr=48000)
    spec = _spec(tmp_path, length_s=10.0)
    item = spec.source.list_items()[0]
    parts = []
    process_item(DecodeTask(item, 0), spec, lambda r: parts.extend(r.segments))
    whole = segment_item(item, 0, decode_audio(str(path), target_sr=32000), spec.policy).segments
    assert len(parts) == len(whole) == 5
    for a, b in zip(parts, whole):
        assert (a.start_s, a.padded_len) == (b.start_s, b.padded_len)
        np.testing.assert_array_equal(a.audio, b.audio)


def test_streamed_segments_are_the_spans_of_the_whole_item():
    """Blocks of any size, windows with overlap or gaps, clips, short tails: the streamed segments are exactly the
    policy's spans cut from the whole array (then the min_len rule), each is its own contiguous copy, and the
    dropped seconds are the samples in no kept segment (gaps between windows included)."""
    from pipeline.segment import StreamSegmenter
    from pipeline.types import AudioItem

    rng = np.random.default_rng(3)
    item = AudioItem(index=0, id="x", source="x.wav")
    policies = [SegmentPolicy("window", 100, 100, 30, 100), SegmentPolicy("window", 100, 40, 0, 50),
                SegmentPolicy("window", 60, 150, 10, 60), SegmentPolicy("clip", 120, 120, 0, 40)]
    for policy in policies:
        for n in (0, 1, 99, 100, 101, 257, 1000):
            audio = rng.standard_normal((2, n)).astype(np.float32)
            cutter = StreamSegmenter(item, 0, policy, 32000, 44100, 2)
            got, pos = [], 0
            while pos < n:
                step = int(rng.integers(1, 130))
                got += cutter.push(audio[:, pos : pos + step])
                pos += step
            tail, dropped_s = cutter.finish()
            got += tail
            want = [(a, b) for a, b in policy.spans(n) if b - a >= policy.min_len]
            assert [(round(s.start_s * 32000), s.n_samples) for s in got] == [(a, b - a) for a, b in want]
            for seg, (a, b) in zip(got, want):
                assert np.array_equal(seg.audio, audio[:, a:b]) and seg.audio.flags["C_CONTIGUOUS"]
                assert not np.shares_memory(seg.audio, audio)
            covered = np.zeros(n, bool)  # dropped: every sample in no kept segment (gaps between windows too)
            for a, b in want:
                covered[a:b] = True
            assert dropped_s == (n - int(covered.sum())) / 32000
