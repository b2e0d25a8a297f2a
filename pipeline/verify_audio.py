"""The audio half of ``pipeline.verify``: re-encode sampled rows alone, decode rows back, and score the round trip.

Re-encoding follows README "Tokens" exactly, except for the batch: the source is decoded with
``decode_audio`` as the workers do, the segment is cut at ``[start, start + n_samples)``, zero-padded to the
``SegmentPolicy`` padded length, and encoded at batch 1 in fp32. A batch-1 encode differs from the pipeline's
fixed batch shape only by float reduction order, which can flip codes that sit on a near-tie; the flip rate
measures that, and a large one means the stored codes are not what the codec makes of the audio.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.audio import decode_audio
from pipeline.codecs.base import Codec
from pipeline.config import CodecConfig, DatasetConfig, SegmentConfig
from pipeline.encode import interleave
from pipeline.plan import Plan
from pipeline.segment import SegmentPolicy
from pipeline.sources import build_source
from pipeline.sources.base import Source
from pipeline.types import AudioItem


@dataclass
class SampledRow:
    """The stored facts of one row that re-encoding and decoding need."""

    id: str
    segment_index: int
    source: str
    start_s: float
    n_samples: int
    codes: np.ndarray  # int16 [K, T]
    scales: np.ndarray | None = None  # float32, one per chunk (chunked codecs such as EnCodec 48 kHz)


@dataclass
class ReencodeResult:
    """Flip counts of the re-encoded sample, per codebook, plus the rows that could not be re-encoded and why."""

    flips: np.ndarray
    frames: int = 0
    rows: int = 0
    skipped: list[str] = field(default_factory=list)
    mismatched_rows: list[str] = field(default_factory=list)

    @property
    def flip_rate_per_codebook(self) -> list[float]:
        return [float(f) / self.frames if self.frames else 0.0 for f in self.flips]

    @property
    def flip_rate(self) -> float:
        return float(self.flips.sum()) / (self.frames * len(self.flips)) if self.frames else 0.0


@dataclass
class RoundTrip:
    """One row decoded back to audio, its listening files and its quality against the source segment."""

    id: str
    segment_index: int
    si_snr_db: float
    log_mel_l1: float
    decoded_wav: str
    source_wav: str


@dataclass(frozen=True)
class AudioSetup:
    """How the pipeline turned this folder's sources into audio (from the plan), and the source to fetch from.

    Args:
        source: the plan's source rebuilt from its description, so rows are fetched through the same
            ``Source.fetch`` the decode workers used (HF rows, URLs, sidecars); None when it cannot be rebuilt
            (moved data, a source kind this version lacks), and then only local file paths are read.
        source_error: why ``source`` is None.
    """

    sample_rate: int
    channels: str
    quality: str
    policy: SegmentPolicy
    source: Source | None = None
    source_error: str | None = None

    @staticmethod
    def from_plan(plan: Plan, sample_rate: int, storage_options: dict[str, Any] | None = None) -> "AudioSetup":
        detail = plan.fingerprint_detail
        segment = SegmentConfig(**_known_fields(SegmentConfig, detail["segment"]))
        quality = detail.get("resampler", {}).get("quality", "HQ")
        source, error = _rebuild_source(plan.source, storage_options)
        return AudioSetup(sample_rate, detail.get("channels", "mono"), quality,
                          SegmentPolicy.from_config(segment, sample_rate), source, error)

    def segment_audio(self, row: SampledRow) -> np.ndarray:
        """float32 ``[C, n_samples]``: the row's segment, fetched and decoded as the workers do.

        Raises:
            FileNotFoundError: no source to fetch from, and the row's source is not a local file.
            ValueError: the source no longer holds the segment (it changed since tokenizing).
        """
        data, name = self._fetch(row)
        audio = decode_audio(data, target_sr=self.sample_rate, channels=self.channels, quality=self.quality,
                             name=name)
        start = round(row.start_s * self.sample_rate)
        segment = audio.samples[:, start : start + row.n_samples]
        if segment.shape[-1] != row.n_samples:
            raise ValueError(f"source {row.source} holds {segment.shape[-1]} samples from {start}, "
                             f"the row has {row.n_samples}: the file changed since it was tokenized")
        return segment

    def _fetch(self, row: SampledRow) -> tuple[str | bytes, str]:
        if self.source is not None:
            # A row's ``source`` column is its item's source, which is all ``fetch`` reads.
            fetched = self.source.fetch(AudioItem(id=row.id, source=row.source, index=-1))
            return fetched.data, fetched.name
        if Path(row.source).is_file():
            return row.source, row.source
        raise FileNotFoundError(f"source {row.source} is not a local file, and the plan's source could not be "
                                f"rebuilt ({self.source_error})")


def _rebuild_source(description: dict[str, Any],
                    storage_options: dict[str, Any] | None) -> tuple[Source | None, str | None]:
    """The plan's ``source`` (``Source.describe()``) back into a Source; (None, why) when that fails."""
    values = dict(description)
    if values.get("kind") == "folder" and "root" in values:
        values["path"] = values.pop("root")  # FolderSource describes its path as root
    try:
        cfg = DatasetConfig(**_known_fields(DatasetConfig, values))
        if storage_options is not None:
            cfg.storage_options = storage_options
        return build_source(cfg), None
    except Exception as e:  # noqa: BLE001 - any failure means "fall back to local paths"
        return None, f"{type(e).__name__}: {e}"


def codec_config(plan: Plan, pretrained: str | None, device: str, threads: int | None) -> CodecConfig:
    """The plan's codec settings forced to fp32, no TF32, no compile: the reference encode.

    Args:
        pretrained: overrides ``codec.pretrained`` (the weights moved, or offline copies).
        device: ``cpu`` or ``cuda``.
        threads: CPU intra-op threads; None takes the run's (fewest flips: same reduction order).
    """
    detail = plan.fingerprint_detail
    cfg = CodecConfig(**_known_fields(CodecConfig, detail["codec"]))
    return dataclasses.replace(cfg, pretrained=pretrained or cfg.pretrained, dtype="float32", tf32=False,
                               compile=False, device=device, backend="torch",
                               threads=threads or detail.get("cpu_threads") or 1)


def _known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Keep the keys ``cls`` has: the plan may come from a version with more or fewer settings."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def encode_alone(codec: Codec, segment: np.ndarray, padded_len: int, n_frames: int) -> np.ndarray:
    """Codes of one segment encoded at batch 1: each channel zero-padded to ``padded_len``, encoded on its own,
    trimmed to ``n_frames`` and interleaved like the pipeline's stereo rows. Returns int16 ``[C*K, n_frames]``.
    A stereo-input codec takes both channels in one row, as the pipeline feeds it."""
    if codec.channels == segment.shape[0]:
        audio = np.zeros((1, codec.channels, padded_len), dtype=np.float32)
        audio[0, :, : segment.shape[-1]] = segment
        return codec.encode(torch.from_numpy(audio).to(codec.device)).cpu().numpy()[0, :, :n_frames].astype(np.int16)
    per_channel = []
    for channel in segment:
        audio = np.zeros((1, 1, padded_len), dtype=np.float32)
        audio[0, 0, : channel.shape[-1]] = channel
        codes = codec.encode(torch.from_numpy(audio).to(codec.device)).cpu().numpy()
        per_channel.append(codes[0, :, :n_frames])
    return interleave(np.stack(per_channel)).astype(np.int16)


def reencode(codec: Codec, setup: AudioSetup, rows: list[SampledRow]) -> ReencodeResult:
    """Re-encode every sampled row alone and count code flips against the stored codes, per codebook."""
    result = ReencodeResult(flips=np.zeros(rows[0].codes.shape[0] if rows else 0, dtype=np.int64))
    for row in rows:
        name = f"{row.id}#{row.segment_index}"
        try:
            segment = setup.segment_audio(row)
        except Exception as e:  # noqa: BLE001 - a source that cannot be read back is reported, not fatal
            result.skipped.append(f"{name}: {type(e).__name__}: {e}")
            continue
        fresh = encode_alone(codec, segment, setup.policy.padded_len(row.n_samples), row.codes.shape[1])
        if fresh.shape != row.codes.shape:
            result.mismatched_rows.append(f"{name}: stored codes {row.codes.shape}, re-encoded {fresh.shape}")
            continue
        result.flips += (fresh != row.codes).sum(axis=1)
        result.frames += row.codes.shape[1]
        result.rows += 1
    return result


def decode_codes(codec: Codec, codes: np.ndarray, channels: int, n_samples: int,
                 scales: np.ndarray | None = None) -> np.ndarray:
    """Stored ``[C*K, T]`` codes -> float32 ``[C, n_samples]`` audio (stereo rows are de-interleaved first; a
    stereo-input codec decodes ``[K, T]`` with its stored per-chunk scales)."""
    if codec.channels == channels:
        batch_scales = None if scales is None else torch.from_numpy(np.asarray(scales, np.float32))[None]
        audio = codec.decode(torch.from_numpy(codes[None].astype(np.int64)), batch_scales)
        return audio[0, :, :n_samples].float().cpu().numpy()
    k = codes.shape[0] // channels
    per_channel = codes.reshape(k, channels, -1).transpose(1, 0, 2)  # undo [L0, R0, L1, R1, ...]
    audio = codec.decode(torch.from_numpy(np.ascontiguousarray(per_channel)).long())
    return audio[:, 0, :n_samples].float().cpu().numpy()


def round_trip(codec: Codec, setup: AudioSetup, row: SampledRow, audio_dir: Path, index: int) -> RoundTrip:
    """Decode one row, write it and its source segment as WAV files, and score the pair.

    Raises:
        Exception: the source segment cannot be read back (see ``AudioSetup.segment_audio``).
    """
    import soundfile as sf

    reference = setup.segment_audio(row)
    decoded = decode_codes(codec, row.codes, reference.shape[0], row.n_samples, row.scales)
    stem = f"{index:03d}_{_safe(row.id)}_seg{row.segment_index}"
    audio_dir.mkdir(parents=True, exist_ok=True)
    paths = audio_dir / f"{stem}_decoded.wav", audio_dir / f"{stem}_source.wav"
    for path, audio in zip(paths, (decoded, reference)):
        sf.write(path, np.clip(audio.T, -1.0, 1.0), setup.sample_rate, subtype="PCM_16")
    return RoundTrip(row.id, row.segment_index, si_snr_db(decoded, reference),
                     log_mel_l1(decoded, reference, setup.sample_rate), str(paths[0]), str(paths[1]))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-80:]


def si_snr_db(estimate: np.ndarray, reference: np.ndarray, eps: float = 1e-8) -> float:
    """Scale-invariant SNR in dB, averaged over channels (Le Roux et al. 2019).

    >>> t = np.sin(np.linspace(0, 100, 8000))[None]
    >>> round(si_snr_db(0.5 * t, t), 1) > 60, round(si_snr_db(t + 0.1 * np.cos(np.linspace(0, 77, 8000))[None], t))
    (True, 20)
    """
    scores = []
    for est, ref in zip(np.asarray(estimate, np.float64), np.asarray(reference, np.float64)):
        est, ref = est - est.mean(), ref - ref.mean()
        target = (est @ ref) / (ref @ ref + eps) * ref
        noise = est - target
        scores.append(10 * np.log10((target @ target + eps) / (noise @ noise + eps)))
    return float(np.mean(scores))


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None) -> np.ndarray:
    """Triangular filters on the HTK mel scale, ``[n_mels, n_fft // 2 + 1]`` (no area normalisation).

    >>> fb = mel_filterbank(16000, 512, 40)
    >>> fb.shape, bool((fb >= 0).all()), bool((fb.max(axis=1) > 0).all())
    ((40, 257), True, True)
    """
    f_max = f_max or sample_rate / 2
    mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)  # noqa: E731
    edges = hz(np.linspace(mel(f_min), mel(f_max), n_mels + 2))
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def log_mel(audio: np.ndarray, sample_rate: int, n_fft: int = 1024, hop: int = 256, n_mels: int = 80) -> np.ndarray:
    """log10 mel power spectrogram ``[C, n_mels, frames]`` (Hann window, floor 1e-5)."""
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), pad_mode="constant",
                      return_complex=True).abs() ** 2
    mel = torch.from_numpy(mel_filterbank(sample_rate, n_fft, n_mels)) @ spec
    return torch.log10(mel.clamp_min(1e-5)).numpy()


def log_mel_l1(estimate: np.ndarray, reference: np.ndarray, sample_rate: int) -> float:
    """Mean absolute difference of the two log10-mel spectrograms (80 mels, n_fft 1024, hop 256)."""
    return float(np.abs(log_mel(estimate, sample_rate) - log_mel(reference, sample_rate)).mean())


def weights_warning(codec: Codec, stored_model: str | None) -> str | None:
    """A warning when the loaded weights are not the ones the shards were made with (``--codec`` elsewhere)."""
    if not stored_model:
        return None
    stored = json.loads(stored_model).get("weights_sha256")
    loaded = codec.fingerprint().get("weights_sha256")
    if stored and loaded and stored != loaded:
        return f"loaded codec weights sha256 {loaded[:12]} differ from the shards' {stored[:12]}"
    return None
