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
import itertools
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr

from pipeline import mp3
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


class GrowingAudio(AudioError):
    """A WAV whose header says "unknown size" and that changed lately or while it was read: still being written."""

    reason = "growing"


class BadSampleRate(AudioError):
    """A header rate outside ``SAMPLE_RATE_RANGE``: a damaged or forged header, not a recording."""

    reason = "bad_sample_rate"


class BadChannels(AudioError):
    """A channel count outside ``CHANNELS_RANGE``."""

    reason = "bad_channels"


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
# length"; libsndfile then reads to the end of the file, as ffmpeg does, so such sizes are not claims.
_UNKNOWN_SIZE = 0x7FFFF000
# But the end of such a file is only where its writer is now: a WAV still being written was read as whole (8 of
# 20 s, stored as ok). Growth cannot be seen in general, but an unknown-size header can, so for those (local
# files) we ask for evidence the writer is done: the last change at least _SETTLE_S before the read, the same
# size and mtime after it, and whole frames (a writer stopped mid-frame left a partial one, which libsndfile
# drops without a word). Otherwise the item fails as ``growing`` and ``output.retry_failed=true`` takes it
# later. Bytes (a dataset's stored audio) are complete by construction: only the whole-frame check applies.
_SETTLE_S = 60.0
_BLOCK_ALIGN = re.compile(r"^\s*Block Align\s*:\s*(\d+)", re.MULTILINE)
# Plausible formats: 1 kHz to 768 kHz (the highest rate of DACs and DAWs; telephone audio is 8 kHz), 1 to 64
# channels (Ambisonics of order 7 and ADM beds stay below). A header outside is damaged or forged: a WAV
# claiming 1 Hz made 120 rows of 30 s from 1.2 KB, a 65535-channel one would make each frame a huge vector.
SAMPLE_RATE_RANGE = (1000, 768000)
CHANNELS_RANGE = (1, 64)
# A judgement, not a measurement: sloppy writers overstate the data size by a header or a pad byte (tens of
# bytes). Losing under 1 KiB (6 ms of 44.1 kHz 16-bit stereo) is cheaper than dropping the whole item.
_SLACK_BYTES = 1024
# Ogg Vorbis and Opus store 3 to 8 channels in Vorbis order (front left, centre, front right, ...; Vorbis I spec
# 4.3.9, RFC 7845 5.1.1.2) and libsndfile hands them over as stored, where WAV, FLAC and ffmpeg (PyAV) give WAV
# order (FL, FR, FC, LFE, back/side pairs). Reordered, so ``stereo`` keeps front left and right (measured: a 5.1
# Opus from ffmpeg kept FL and FC) and every backend gives the same channels. Index i of a tuple: the Vorbis
# channel that goes to WAV position i.
_VORBIS_TO_WAV = {3: (0, 2, 1), 5: (0, 2, 1, 3, 4), 6: (0, 2, 1, 5, 3, 4), 7: (0, 2, 1, 6, 5, 3, 4),
                  8: (0, 2, 1, 7, 5, 6, 3, 4)}
# An MP3's Xing/VBRI header against the bytes present (``pipeline.mp3``). mpg123 warns past 1% either way; a cut
# download is called one past 2% missing (a judgement: whole files measured here match to the byte), and more
# than 1% extra goes to PyAV, which decodes the same frames either way, so a false alarm costs nothing.
_MP3_CUT = 0.98
_MP3_JOINED = 1.01
# libsndfile's SF_COUNT_MAX: the length is unknown (measured: a FLAC whose STREAMINFO says 0 samples, as
# streamed encoders write). soundfile then cannot size its buffer, so leave such files to PyAV.
_UNKNOWN_FRAMES = 2**62


# Frames read (and resampled) per block. Streaming keeps a worker's memory bounded by one block plus one segment,
# whatever the file length; measured: soxr's stream gives bit-identical output to one-shot resampling.
BLOCK_FRAMES = 1 << 17

# Subtypes read as int16 and scaled here: libsndfile's float for 16-bit PCM is exactly ``x / 32768`` (WAV, AIFF,
# FLAC; tested bit for bit), integers need no NaN check, and the stereo downmix is exact in integers. Measured:
# a decode worker gets through 8% more 16-bit stereo FLAC per CPU second (702 -> 758 audio s, three alternating
# runs each): libsndfile's per-sample float loop, the finite check and the float downmix get cheaper.
_INT16_SUBTYPES = frozenset({"PCM_16"})


@dataclass(slots=True)
class AudioStream:
    """An opened recording: its source format, and its audio as resampled ``[C, n]`` float32 blocks.

    The blocks are validated as they are read; errors found late (a NaN block, a truncated file detected at the
    end) raise from the iterator, after earlier blocks were handed out.
    """

    source_sample_rate: int
    source_channels: int
    blocks: Iterator[np.ndarray]


def open_audio(
    source: AudioSource,
    *,
    target_sr: int,
    channels: str = "mono",
    quality: str = "HQ",
    name: str | None = None,
) -> AudioStream:
    """Open, then stream: decode, validate, apply the channel policy and resample to ``target_sr`` block by block.

    Args:
        source: a local path, or the file's raw bytes.
        target_sr: output sample rate in Hz (the codec's).
        channels: ``mono`` averages all channels; ``stereo`` duplicates mono input and keeps the first two
            channels otherwise (audiocraft ``convert_audio_channels``).
        quality: soxr quality, ``HQ`` or ``VHQ``.
        name: how messages name the recording (defaults to the path, or ``<bytes>``).

    Raises:
        AudioError: a subclass whose ``reason`` says what is wrong with the file (from here or from the blocks).
        ValueError: bad arguments.
    """
    _check_args(target_sr, channels, quality)
    label = name or ("<bytes>" if isinstance(source, bytes | bytearray) else str(source))
    _check_source(source, label)
    rate, n_channels, raw = _open_any(source, label)
    out_channels = 1 if channels == "mono" else 2
    resampler = None if rate == target_sr else soxr.ResampleStream(rate, target_sr, out_channels, dtype="float32",
                                                                   quality=quality)
    return AudioStream(rate, n_channels, _process(raw, channels, resampler, label))


def decode_audio(
    source: AudioSource,
    *,
    target_sr: int,
    channels: str = "mono",
    quality: str = "HQ",
    name: str | None = None,
) -> DecodedAudio:
    """The whole recording at once (``open_audio`` with the blocks joined): float32 ``[1 or 2, n]`` at ``target_sr``.

    Same arguments and errors as ``open_audio``; same samples as the stream, by construction.
    """
    stream = open_audio(source, target_sr=target_sr, channels=channels, quality=quality, name=name)
    blocks = list(stream.blocks)
    samples = np.concatenate(blocks, axis=1) if blocks else np.zeros((1 if channels == "mono" else 2, 0), np.float32)
    return DecodedAudio(np.ascontiguousarray(samples), target_sr, stream.source_sample_rate, stream.source_channels)


def _process(raw: Iterator[np.ndarray], channels: str, resampler, label: str) -> Iterator[np.ndarray]:
    """Validate, apply the channel policy and resample each raw ``[C, n]`` block; check the total at the end."""
    n_frames = 0
    blocks = _lookahead(raw)
    for block, last in blocks:
        _validate_block(block, label, n_frames)
        n_frames += block.shape[1]
        mixed = _apply_channel_policy(block, channels)
        out = mixed if resampler is None else resampler.resample_chunk(mixed.T, last=last).T
        if out.shape[1]:
            yield np.ascontiguousarray(out, dtype=np.float32)
    if n_frames == 0:
        raise NoAudioFrames(f"{label}: 0 audio frames")


def _lookahead(blocks: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, bool]]:
    """``(block, is_last)`` pairs: the resampler must flush its filter tail on the last block."""
    prev = None
    for block in blocks:
        if prev is not None:
            yield prev, False
        prev = block
    if prev is not None:
        yield prev, True


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


class _NoLength(ValueError):
    """soundfile read the header but cannot size the audio (0 or unknown frames), or would stop before the end (an
    MP3 whose header covers less than the file): an audio file, left to PyAV."""


def _open(source: AudioSource) -> str | io.BytesIO:
    # A fresh buffer per backend: a failed backend leaves the read position anywhere.
    return io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source)


def _soundfile_open(source: AudioSource, label: str) -> tuple[int, int, Iterator[np.ndarray]]:
    f = sf.SoundFile(_open(source))
    if f.frames >= _UNKNOWN_FRAMES or f.frames == 0:
        # Measured: a WAV whose writer never filled in the data size (0) reads as 0 frames here and whole in
        # ffmpeg; a FLAC streamed without a length reports SF_COUNT_MAX. Both go to PyAV; a real header-only
        # file gives 0 frames there too and fails as no_frames.
        f.close()
        raise _NoLength("libsndfile does not know the length" if f.frames else "0 frames")
    try:
        if f.format == "MP3":
            _check_mp3_extent(source, label)
        done = _check_unknown_size(f, source, label)
    except Exception:
        f.close()
        raise
    return f.samplerate, f.channels, _soundfile_blocks(f, label, done)


def _check_unknown_size(f: sf.SoundFile, source: AudioSource, label: str) -> Callable[[], None]:
    """For a WAV whose data size says "unknown" (see ``_SETTLE_S``): refuse a partial last frame and a file
    changed lately; return the check to run once it is read (same size and mtime). A no-op check otherwise."""
    sizes = [(int(d), int(p)) for d, p in _SHORT_DATA_CHUNK.findall(f.extra_info) if int(d) >= _UNKNOWN_SIZE]
    if not sizes:
        return lambda: None
    declared, present = sizes[0]
    align = _BLOCK_ALIGN.search(f.extra_info)
    header = f"header declares an unknown data size (0x{declared:X}, as streaming writers leave it)"
    if align and int(align.group(1)) and present % int(align.group(1)):
        raise TruncatedAudio(f"{label}: {header} and the file ends inside a frame ({present} data bytes, "
                             f"frames of {align.group(1)}): its writer stopped or was cut mid-write")
    if isinstance(source, bytes | bytearray):
        return lambda: None
    before = os.stat(source)
    age = time.time() - before.st_mtime
    if age < _SETTLE_S:  # a future mtime (clock skew) is no evidence of an old file either
        raise GrowingAudio(f"{label}: {header} and the file was modified {age:.0f} s ago (under {_SETTLE_S:.0f} s): "
                           "it may still be written; rerun with output.retry_failed=true once it is complete")

    def unchanged() -> None:
        after = os.stat(source)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise GrowingAudio(f"{label}: {header} and the file changed while it was read ({before.st_size} -> "
                               f"{after.st_size} bytes): it is still being written; rerun with "
                               "output.retry_failed=true once it is complete")
    return unchanged


def _check_mp3_extent(source: AudioSource, label: str) -> None:
    """An MP3 holding less audio than its header states is cut; one holding more (files joined with ``cat``) would
    be read only as far as the header says by libsndfile, so it goes to PyAV, which reads to the end."""
    extent = mp3.read_extent(source)
    if extent is None:
        return
    declared, present = extent.declared_bytes, extent.present_bytes
    if present < declared * _MP3_CUT:
        raise TruncatedAudio(f"{label}: MP3 header declares {declared} bytes of audio, the file holds {present}")
    if present > declared * _MP3_JOINED + _SLACK_BYTES:
        raise _NoLength(f"the MP3 header covers {declared} of {present} bytes of audio (files joined?)")


def _soundfile_blocks(f: sf.SoundFile, label: str, done: Callable[[], None]) -> Iterator[np.ndarray]:
    """``[C, n]`` blocks: int16 for 16-bit PCM (see ``_INT16_SUBTYPES``), float32 otherwise; channels in WAV order.
    ``done`` runs after the last block (``_check_unknown_size``)."""
    dtype = "int16" if f.subtype in _INT16_SUBTYPES else "float32"
    order = _VORBIS_TO_WAV.get(f.channels) if f.format == "OGG" else None
    with f:
        n_read = 0
        while True:
            try:
                block = f.read(BLOCK_FRAMES, dtype=dtype, always_2d=True)
            except Exception as e:  # noqa: BLE001 - past the header, a read error means the data is broken
                raise UndecodableAudio(f"{label}: soundfile failed after {n_read} frames: {type(e).__name__}: {e}")
            if not len(block):
                break
            n_read += len(block)
            yield block.T if order is None else block.T[order]
        _check_complete(f, n_read, label)
        done()


def _check_complete(f: sf.SoundFile, n_read: int, label: str) -> None:
    if f.format not in _EXACT_FORMATS:
        return
    for declared, present in _SHORT_DATA_CHUNK.findall(f.extra_info):
        if int(present) + _SLACK_BYTES < int(declared) < _UNKNOWN_SIZE:
            raise TruncatedAudio(f"{label}: header declares {declared} bytes of audio, the file holds {present}")
    if n_read != f.frames:
        raise TruncatedAudio(f"{label}: header declares {f.frames} frames, decoded {n_read}")


def _pyav_open(source: AudioSource, label: str) -> tuple[int, int, Iterator[np.ndarray]]:
    container = av.open(_open(source))
    if not container.streams.audio:
        container.close()
        raise NoAudioFrames(f"{label}: container has no audio stream")
    stream = container.streams.audio[0]
    ctx = stream.codec_context
    return ctx.sample_rate, ctx.channels, _pyav_blocks(container, stream, label)


def _pyav_blocks(container, stream, label: str) -> Iterator[np.ndarray]:
    # Planar float at the native rate and layout; the resampler also absorbs mid-stream format changes.
    resampler = av.AudioResampler(format="fltp")
    # MP3 frames stand alone: past bytes that are no frame (the tags where files were joined with cat) the decoder
    # goes on at the next frame, as ffmpeg's command line does. A few such packets per file; more is a broken file.
    skippable = stream.codec_context.name.startswith("mp3")
    with container:
        pending, n_pending, packets, skipped = [], 0, 0, 0
        try:
            for packet in container.demux(stream):
                packets += 1
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    skipped += 1
                    if not skippable or skipped > max(8, packets // 100):
                        raise
                    continue
                for frame in frames:
                    for out in resampler.resample(frame):
                        pending.append(out.to_ndarray())
                        n_pending += pending[-1].shape[1]
                if n_pending >= BLOCK_FRAMES:  # hand out blocks of about the same size as soundfile's
                    yield np.concatenate(pending, axis=1).astype(np.float32, copy=False)
                    pending, n_pending = [], 0
            pending += [out.to_ndarray() for out in resampler.resample(None)]
        except av.error.FFmpegError as e:
            raise UndecodableAudio(f"{label}: pyav failed mid-stream: {type(e).__name__}: {e}")
        if pending:
            yield np.concatenate(pending, axis=1).astype(np.float32, copy=False)


_BACKENDS: tuple[tuple[str, Callable[[AudioSource, str], tuple[int, int, Iterator[np.ndarray]]]], ...] = (
    ("soundfile", _soundfile_open),
    ("pyav", _pyav_open),
)


def _open_any(source: AudioSource, label: str) -> tuple[int, int, Iterator[np.ndarray]]:
    """Open with the first backend that takes the file, and make sure it yields audio.

    A backend counts as taking the file once its first block decodes, so a file libsndfile opens but cannot
    read still goes to PyAV. Later failures belong to the file, not the backend. A file that no backend before
    recognised and the next one reads as 0 frames is undecodable, not empty: ffmpeg guesses a demuxer from the
    name, and takes random bytes called ``.flac`` for a FLAC stream without frames.
    """
    errors, recognised = [], False
    for backend, open_ in _BACKENDS:
        try:
            rate, n_channels, blocks = open_(source, label)
            first = next(blocks, None)
        except AudioError:
            raise  # the file was read and is bad; a more lenient backend would only hide that
        except Exception as e:  # noqa: BLE001 - any backend failure means "try the next one"
            errors.append(f"{backend}: {type(e).__name__}: {e}")
            recognised = recognised or isinstance(e, _NoLength)
            continue
        if first is None and errors and not recognised:
            raise UndecodableAudio(f"{label}: every backend failed: " + "; ".join([*errors, f"{backend}: 0 frames"]))
        if first is None:  # the backend reads the file and finds it empty (a header, a silent container)
            raise NoAudioFrames(f"{label}: 0 audio frames ({backend})")
        _check_format(rate, n_channels, label)  # once audio was found: random bytes are undecodable, not 0 Hz
        return rate, n_channels, itertools.chain([first], blocks)
    raise UndecodableAudio(f"{label}: every backend failed: " + "; ".join(errors))


def _check_format(rate: int, n_channels: int, label: str) -> None:
    """Refuse a header whose rate or channel count no recording has (see ``SAMPLE_RATE_RANGE``)."""
    low, high = SAMPLE_RATE_RANGE
    if not low <= rate <= high:
        raise BadSampleRate(f"{label}: header sample rate {rate} Hz is outside [{low}, {high}] Hz")
    low, high = CHANNELS_RANGE
    if not low <= n_channels <= high:
        raise BadChannels(f"{label}: header has {n_channels} channels, outside [{low}, {high}]")


def _validate_block(block: np.ndarray, label: str, offset: int) -> None:
    if block.dtype.kind == "i":  # integer samples are finite
        return
    bad = block.size - int(np.count_nonzero(np.isfinite(block)))
    if bad:
        raise NonFiniteAudio(f"{label}: {bad} NaN/Inf samples in the block at frame {offset}")


def _apply_channel_policy(samples: np.ndarray, channels: str) -> np.ndarray:
    """float32 ``[1 or 2, n]`` from a ``[C, n]`` block (float32, or int16 read as such: see ``_INT16_SUBTYPES``)."""
    if samples.dtype == np.int16:
        if channels == "mono" and samples.shape[0] == 2:
            # (L + R) / 2 of the float samples, exactly: L + R is exact in int32 and in float32 (17 bits), and
            # scaling by a power of two is exact, so this equals the float path's result bit for bit.
            total = samples[0].astype(np.int32)
            total += samples[1]
            out = total.astype(np.float32)
            out *= np.float32(2.0**-16)
            return out[None]
        samples = samples.astype(np.float32)
        samples *= np.float32(2.0**-15)
    if channels == "mono":
        if samples.shape[0] == 2:
            # 4x faster than mean() on the [C, n] view of soundfile's frames (a reduction over a 2-long axis) and
            # bit-identical to it: numpy computes a0 + (0 + a1), then divides by 2 (the + 0 turns -0.0 into +0.0).
            out = samples[1] + np.float32(0.0)
            out += samples[0]
            out /= np.float32(2.0)
            return out[None]
        return samples.mean(axis=0, keepdims=True)
    if samples.shape[0] == 1:
        return np.repeat(samples, 2, axis=0)
    return samples[:2]
