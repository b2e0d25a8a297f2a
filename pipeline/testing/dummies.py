"""Tiny synthetic audio and hostile files for tests and the bundled example (like lhotse ``testing/dummies.py``).

Everything is deterministic from its arguments, so a test can regenerate the exact input it decoded.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf

# soundfile format and default subtype per suffix; int PCM by default because most real datasets are 16-bit.
_SF_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
    ".aiff": ("AIFF", "PCM_16"),
}
# PyAV channel layouts by channel count; 6 channels is the usual 5.1 film/music master.
_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 6: "5.1"}


def synth(duration_s: float, sr: int, channels: int = 1, kind: str = "music", seed: int = 0) -> np.ndarray:
    """Synthesize ``[channels, round(duration_s * sr)]`` float32 audio with peaks well below 1 (no clipping).

    Args:
        duration_s: length in seconds.
        sr: sample rate in Hz.
        channels: channel count. Channels play the same notes but differ (gain, detune, own noise), like a
            real mix, so channel policies are testable.
        kind: ``music`` (harmonic notes with envelopes plus a little noise), ``tone`` (440 Hz sine),
            ``noise`` (white), or ``silence`` (zeros).
        seed: seeds the notes and the noise.
    """
    t = np.arange(round(duration_s * sr)) / sr
    out = np.stack([_synth_channel(kind, t, sr, seed, c) for c in range(channels)])
    return out.astype(np.float32)


def _synth_channel(kind: str, t: np.ndarray, sr: int, seed: int, c: int) -> np.ndarray:
    gain = 0.5 / (1 + 0.25 * c)
    noise = np.random.default_rng([seed, c])
    if kind == "silence":
        return np.zeros_like(t)
    if kind == "tone":
        return gain * np.sin(2 * np.pi * 440.0 * (1 + 0.01 * c) * t)
    if kind == "noise":
        return gain * 0.5 * noise.uniform(-1, 1, t.size)
    if kind == "music":
        return gain * _notes(t, sr, seed, detune=1 + 0.003 * c) + 0.01 * noise.standard_normal(t.size)
    raise ValueError(f"unknown kind {kind!r}; expected music, tone, noise or silence")


def _notes(t: np.ndarray, sr: int, seed: int, detune: float, note_s: float = 0.25) -> np.ndarray:
    """Notes of ``note_s`` seconds, three harmonics under an attack/decay envelope; pitches kept below Nyquist."""
    out = np.zeros_like(t)
    n_notes = int(np.ceil(t.size / sr / note_s))
    pitches = np.random.default_rng(seed).integers(0, 24, n_notes)  # two octaves up from A2
    for start, pitch in zip(np.arange(n_notes) * note_s, pitches):
        f0 = min(110.0 * 2 ** (pitch / 12) * detune, sr / 8)
        idx = (t >= start) & (t < start + note_s)
        local = t[idx] - start
        env = np.minimum(local / 0.01, 1.0) * np.exp(-local / 0.08)
        out[idx] = env * sum(np.sin(2 * np.pi * f0 * h * local) / h for h in (1, 2, 3)) / 1.9
    return out


def write_audio(path: str | Path, audio: np.ndarray, sr: int, subtype: str | None = None) -> Path:
    """Write ``[C, n]`` float audio with soundfile; format from the suffix (wav, flac, ogg, mp3, aiff).

    Args:
        subtype: soundfile subtype, e.g. ``PCM_U8``/``PCM_16``/``PCM_24``/``PCM_32``/``FLOAT`` for wav; the
            suffix's default (16-bit PCM, Vorbis, MPEG layer III) when None.
    """
    path = Path(path)
    fmt, default = _SF_FORMATS[path.suffix.lower()]
    sf.write(path, np.asarray(audio).T, sr, format=fmt, subtype=subtype or default)
    return path


def write_with_av(
    path: str | Path,
    audio: np.ndarray,
    sr: int,
    codec: str = "aac",
    bit_rate: int | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode ``[C, n]`` float audio with PyAV (ffmpeg); the container comes from the suffix (m4a, opus, mka...).

    Args:
        codec: ffmpeg encoder name (``aac``, ``libopus``, ``libmp3lame``, ``flac``...). libopus only takes
            8/12/16/24/48 kHz.
        bit_rate: bits per second, encoder default when None (wmav2 needs one, e.g. 128000).
        options: muxer options, e.g. ``{"write_xing": "0"}`` for an mp3 without the header that states its length.
    """
    path = Path(path)
    with av.open(str(path), "w", options=options or {}) as container:
        stream, frame = _add_audio_stream(container, audio, sr, codec, bit_rate)
        _encode(container, stream, [frame])
    return path


def write_video(path: str | Path, audio: np.ndarray | None, sr: int = 48000, n_frames: int = 10) -> Path:
    """A tiny mpeg4 video (the first stream) plus, unless ``audio`` is None, an AAC audio stream after it."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        # Every stream must exist before the first packet is muxed (that writes the container header).
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = _add_audio_stream(container, audio, sr, "aac", None) if audio is not None else None
        pixels = [np.full((48, 64, 3), 20 * i, np.uint8) for i in range(n_frames)]
        _encode(container, video, [av.VideoFrame.from_ndarray(p, format="rgb24") for p in pixels])
        if sound is not None:
            _encode(container, sound[0], [sound[1]])
    return path


def _add_audio_stream(
    container: av.container.OutputContainer, audio: np.ndarray, sr: int, codec: str, bit_rate: int | None
) -> tuple[av.audio.stream.AudioStream, av.AudioFrame]:
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    layout = _LAYOUTS[audio.shape[0]]
    stream = container.add_stream(codec, rate=sr, layout=layout)
    if bit_rate:
        stream.bit_rate = bit_rate
    frame = av.AudioFrame.from_ndarray(audio, format="fltp", layout=layout)
    frame.sample_rate = sr
    # A timestamp lets the muxer record the encoder's priming delay (mp4 edit list, Ogg pre-skip).
    frame.pts, frame.time_base = 0, Fraction(1, sr)
    return stream, frame


def _encode(container: av.container.OutputContainer, stream: av.stream.Stream, frames: list) -> None:
    # The stream re-frames audio to the encoder's frame size; None flushes the encoder's delayed packets.
    for frame in [*frames, None]:
        container.mux(stream.encode(frame))


def write_truncated_wav(path: str | Path, duration_s: float = 1.0, sr: int = 16000) -> Path:
    """A 16-bit WAV whose header declares ``duration_s`` of audio but whose data stops halfway (a cut download)."""
    path = write_audio(path, synth(duration_s, sr), sr, "PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: 44 + (len(data) - 44) // 2])
    return path


def write_header_only_wav(path: str | Path, sr: int = 16000) -> Path:
    """A valid 44-byte WAV header with zero frames."""
    return write_audio(path, np.zeros((1, 0), np.float32), sr, "PCM_16")


def write_garbage(path: str | Path, n_bytes: int = 4096, seed: int = 0) -> Path:
    """Random bytes under an audio name; no backend can parse it."""
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).bytes(n_bytes))
    return path


def write_nan_wav(path: str | Path, sr: int = 16000, value: float = np.nan) -> Path:
    """A float WAV that is valid except for a few NaN (or ``value``) samples, as a broken DSP step leaves."""
    audio = synth(0.5, sr, kind="tone")
    audio[0, 100:110] = value
    return write_audio(path, audio, sr, "FLOAT")


def write_empty(path: str | Path) -> Path:
    """A 0-byte file under an audio name (an interrupted copy)."""
    path = Path(path)
    path.write_bytes(b"")
    return path
