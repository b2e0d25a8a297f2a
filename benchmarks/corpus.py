"""The benchmark's input: music-like 44.1 kHz stereo files (FLAC and WAV), deterministic from a seed, and the
description of the machine the numbers came from."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from pipeline.plan import cpu_model
from pipeline.testing.dummies import synth, write_audio

SOURCE_RATE = 44_100
# synth's cost grows with length x notes, so long files are stitched from pieces of this many seconds.
_PIECE_S = 10.0


def music(seconds: float, seed: int, sr: int = SOURCE_RATE, channels: int = 2) -> np.ndarray:
    """``[channels, round(seconds * sr)]`` float32 music-like audio (notes + a little noise), made in pieces."""
    n = round(seconds * sr)
    pieces, done, i = [], 0, 0
    while done < n:
        piece = synth(min(_PIECE_S, (n - done) / sr), sr, channels, "music", seed=seed * 1000 + i)
        pieces.append(piece)
        done += piece.shape[-1]
        i += 1
    return np.concatenate(pieces, axis=1)[:, :n] if pieces else np.zeros((channels, 0), np.float32)


def make_corpus(root: Path, minutes: float, min_s: float = 10.0, max_s: float = 60.0, seed: int = 0,
                fmt: str | None = None) -> list[Path]:
    """Files of ``min_s..max_s`` seconds (uniform, seeded) until ``minutes`` of audio; FLAC and WAV alternate
    unless ``fmt="flac"`` (all FLAC).

    Args:
        root: folder to write into (created).
        minutes: total audio; the last file is shortened to fit, but never below ``min_s``.
        min_s, max_s: file length range in seconds.
        seed: the same seed gives the same files.

    Returns:
        The paths written, sorted.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total, paths, i = minutes * 60.0, [], 0
    while total > 1e-6:
        seconds = float(rng.uniform(min_s, max_s))
        seconds = max(min_s, min(seconds, total))
        suffix, subtype = (".flac", "PCM_16") if i % 2 == 0 or fmt == "flac" else (".wav", "PCM_16")
        paths.append(write_audio(root / f"track-{i:04d}{suffix}", music(seconds, seed + i), SOURCE_RATE, subtype))
        total -= seconds
        i += 1
    return sorted(paths)


def make_long_file(root: Path, minutes: float, seed: int = 7) -> Path:
    """One FLAC of ``minutes`` minutes (the memory check: one file far longer than a batch)."""
    root.mkdir(parents=True, exist_ok=True)
    return write_audio(root / "long.flac", music(minutes * 60.0, seed), SOURCE_RATE, "PCM_16")


def replicate(files: list[Path], root: Path, copies: int) -> list[Path]:
    """``copies`` hard links (copies across filesystems) of every file under ``root/copy-NN/``: a dataset
    ``copies`` times larger with the same decode and encode cost per item."""
    out = []
    for c in range(copies):
        folder = root / f"copy-{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for path in files:
            target = folder / path.name
            try:
                os.link(path, target)
            except OSError:
                target.write_bytes(path.read_bytes())
            out.append(target)
    return out


def audio_seconds(files: list[Path]) -> float:
    import soundfile as sf

    return sum(sf.info(str(p)).duration for p in files)


def machine() -> dict:
    """CPU model, core count, memory, GPU and library versions."""
    import torch
    import transformers

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_at_start": list(os.getloadavg()),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info

