"""The decode stage: one recording (a local path, or raw bytes from a Parquet audio column) -> float32 ``[C, n]``
at the codec rate.

Backends are tried in order, and when all fail the error names the file and every backend with its error
(lhotse ``audio/backend.py``):

1. soundfile (libsndfile): fast, and the header's frame count to check against; wav/aiff/flac/ogg/opus/mp3.
2. PyAV (ffmpeg): m4a/aac, wma, video containers with an audio stream, and whatever libsndfile rejects.

Bad data raises a typed ``AudioError`` whose ``reason`` is the stable label counted in failure totals
(lhotse ``audio/utils.py``). Silence is valid audio.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr

from pipeline.types import DecodedAudio

# A local path, or the encoded file's bytes (an HF Audio column, a remote object).
AudioSource = str | os.PathLike | bytes | bytearray


class AudioError(Exception):
    """A recording that cannot become audio; ``reason`` is the short label used in failure totals."""

    reason: str = "audio_error"


class EmptyFile(AudioError):
    reason = "empty"


class NoAudioFrames(AudioError):
    """A header, or a container, with zero audio frames."""

    reason = "no_frames"


class TruncatedAudio(AudioError):
    """The header declares more audio than the file holds (a cut download or interrupted copy)."""

    reason = "truncated"


class NonFiniteAudio(AudioError):
    reason = "non_finite"


class UndecodableAudio(AudioError):
    """Every backend failed; the message names the file and each backend with its error."""

    reason = "undecodable"


class NotAFile(AudioError):
    """A directory, a missing path, or anything else that is not a regular file, named like audio."""

    reason = "not_a_file"


CHANNEL_POLICIES = ("mono", "stereo")
QUALITIES = ("HQ", "VHQ")

# Formats whose header states the exact frame count, so a short decode means the file was cut. Not MP3: the
# count comes from the Xing/LAME header when there is one (exact), else mpg123 estimates it from the file size
# (measured: a 57330-frame CBR file without Xing declared 59272 and decoded 58752), and a VBR file without Xing
# can be off by far more, so a mismatch there is not evidence. Not Ogg: it declares no length at all.
_EXACT_FORMATS = frozenset({"WAV", "WAVEX", "AIFF", "AU", "FLAC", "W64", "RF64", "CAF"})

# libsndfile clamps ``frames`` to the bytes present (measured: a 57330-frame WAV cut in half reports 28654 and
# reads 28654 without error), so ``frames`` alone never shows a cut PCM file. The header's own claim survives
# only in libsndfile's log, e.g. ``data : 114660 (should be 57308)``; the chunk is named data (WAV), SSND (AIFF)
# or Data Size (AU). libsndfile logs "should be" for the data chunk only when it is longer than the file.
_SHORT_DATA_CHUNK = re.compile(r"^\s*(?:data|SSND|Data Size)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Streaming writers (ffmpeg to a pipe, sox) put 0xFFFFFFFF / 0x7FFFF000 in the size field for "unknown
# length"; libsndfile then reads to the end of the file, which is right, so such sizes are not claims.
_UNKNOWN_SIZE = 0x7FFFF000
# A judgement, not a measurement: sloppy writers overstate the data size by a header or a pad byte (tens of
# bytes). Losing under 1 KiB (6 ms of 44.1 kHz 16-bit stereo) is cheaper than dropping the whole item.
_SLACK_BYTES = 1024
# libsndfile's SF_COUNT_MAX: the length is unknown (measured: a FLAC whose STREAMINFO says 0 samples, as
# streamed encoders write). soundfile then cannot size its buffer, so leave such files to PyAV.
_UNKNOWN_FRAMES = 2**62


def decode_audio(
    source: AudioSource,
    *,
    target_sr: int,
    channels: str = "mono",
    quality: str = "HQ",
    name: str | None = None,
) -> DecodedAudio:
    """Decode, validate, apply the channel policy and resample to ``target_sr``.

    Args:
        source: a local path, or the file's raw bytes.
        target_sr: output sample rate in Hz (the codec's).
        channels: ``mono`` averages all channels; ``stereo`` duplicates mono input and keeps the first two
            channels otherwise (audiocraft ``convert_audio_channels``).
        quality: soxr quality, ``HQ`` or ``VHQ``.
        name: how messages name the recording (defaults to the path, or ``<bytes>``).

    Returns:
        ``DecodedAudio`` with float32 C-contiguous samples ``[1 or 2, n]`` at ``target_sr``.

    Raises:
        AudioError: a subclass whose ``reason`` says what is wrong with the file.
        ValueError: bad arguments.
    """
    _check_args(target_sr, channels, quality)
    label = name or ("<bytes>" if isinstance(source, bytes | bytearray) else str(source))
    _check_source(source, label)
    samples, source_sr = _read_any(source, label)
    _validate(samples, label)
    out = _resample(_apply_channel_policy(samples, channels), source_sr, target_sr, quality)
    return DecodedAudio(np.ascontiguousarray(out, dtype=np.float32), target_sr, source_sr, samples.shape[0])


def probe_duration(path: str | os.PathLike) -> float | None:
    """Duration in seconds from the header alone (soundfile, then PyAV); None when unknown. Never raises.

    For MP3 without a Xing header this is libsndfile's estimate from the file size, and for a cut WAV it is
    what the file holds; good enough for planning, not for validation.
    """
    try:
        info = sf.info(str(path))
        if 0 < info.frames < _UNKNOWN_FRAMES:
            return info.frames / info.samplerate
    except Exception:  # noqa: BLE001 - any failure means "ask the next backend"
        pass
    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration is not None else None
    except Exception:  # noqa: BLE001 - unknown is a valid answer for a probe
        return None


def _check_args(target_sr: int, channels: str, quality: str) -> None:
    if target_sr <= 0:
        raise ValueError(f"target_sr must be a positive rate in Hz, got {target_sr}")
    if channels not in CHANNEL_POLICIES:
        raise ValueError(f"channels must be one of {CHANNEL_POLICIES}, got {channels!r}")
    if quality not in QUALITIES:
        raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}")


def _check_source(source: AudioSource, label: str) -> None:
    """Reject what is not a regular non-empty file before any backend sees it (backend errors are vaguer)."""
    if isinstance(source, bytes | bytearray):
        size = len(source)
    else:
        path = Path(source)
        if not path.is_file():
            what = "a directory" if path.is_dir() else "not a regular file" if path.exists() else "missing"
            raise NotAFile(f"{label}: {what}")
        size = path.stat().st_size
    if size == 0:
        raise EmptyFile(f"{label}: 0 bytes")


def _open(source: AudioSource) -> str | io.BytesIO:
    # A fresh buffer per backend: a failed backend leaves the read position anywhere.
    return io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source)


def _read_soundfile(source: AudioSource, label: str) -> tuple[np.ndarray, int]:
    with sf.SoundFile(_open(source)) as f:
        if f.frames >= _UNKNOWN_FRAMES:
            raise ValueError("libsndfile does not know the length")
        samples = f.read(dtype="float32", always_2d=True)
        _check_complete(f, len(samples), label)
    if not len(samples):
        # Measured: a WAV whose writer never filled in the data size (0) reads as 0 frames here and whole in
        # ffmpeg; a real header-only file gives 0 frames there too and fails validation as no_frames.
        raise ValueError("0 frames")
    return samples.T, f.samplerate


def _check_complete(f: sf.SoundFile, n_read: int, label: str) -> None:
    if f.format not in _EXACT_FORMATS:
        return
    for declared, present in _SHORT_DATA_CHUNK.findall(f.extra_info):
        if int(present) + _SLACK_BYTES < int(declared) < _UNKNOWN_SIZE:
            raise TruncatedAudio(f"{label}: header declares {declared} bytes of audio, the file holds {present}")
    if n_read != f.frames:
        raise TruncatedAudio(f"{label}: header declares {f.frames} frames, decoded {n_read}")


def _read_pyav(source: AudioSource, label: str) -> tuple[np.ndarray, int]:
    with av.open(_open(source)) as container:
        if not container.streams.audio:
            raise NoAudioFrames(f"{label}: container has no audio stream")
        stream = container.streams.audio[0]
        # Planar float at the native rate and layout; the resampler also absorbs mid-stream format changes.
        resampler = av.AudioResampler(format="fltp")
        chunks = [out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray() for out in resampler.resample(None)]
        n_channels = stream.codec_context.channels
        rate = stream.codec_context.sample_rate
    samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((n_channels, 0), np.float32)
    return samples.astype(np.float32, copy=False), rate


_BACKENDS: tuple[tuple[str, Callable[[AudioSource, str], tuple[np.ndarray, int]]], ...] = (
    ("soundfile", _read_soundfile),
    ("pyav", _read_pyav),
)


def _read_any(source: AudioSource, label: str) -> tuple[np.ndarray, int]:
    errors = []
    for backend, read in _BACKENDS:
        try:
            return read(source, label)
        except AudioError:
            raise  # the file was read and is bad; a more lenient backend would only hide that
        except Exception as e:  # noqa: BLE001 - any backend failure means "try the next one"
            errors.append(f"{backend}: {type(e).__name__}: {e}")
    raise UndecodableAudio(f"{label}: every backend failed: " + "; ".join(errors))


def _validate(samples: np.ndarray, label: str) -> None:
    if samples.shape[1] == 0:
        raise NoAudioFrames(f"{label}: 0 audio frames")
    bad = samples.size - int(np.isfinite(samples).sum())
    if bad:
        raise NonFiniteAudio(f"{label}: {bad} NaN/Inf samples of {samples.size}")


def _apply_channel_policy(samples: np.ndarray, channels: str) -> np.ndarray:
    if channels == "mono":
        return samples.mean(axis=0, keepdims=True)
    if samples.shape[0] == 1:
        return np.repeat(samples, 2, axis=0)
    return samples[:2]


def _resample(samples: np.ndarray, sr: int, target_sr: int, quality: str) -> np.ndarray:
    if sr == target_sr:
        return samples
    # soxr wants [n, C]; it keeps float32 and filters each channel independently.
    return soxr.resample(samples.T, sr, target_sr, quality=quality).T
