"""Shared test helpers: compose the real config, make a small corpus of real files, read the output back."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import RunConfig, register_configs
from pipeline.testing.dummies import synth, write_audio, write_with_av

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# name, seconds, rate, channels, subtype: formats, rates, bit depths and channel counts a user meets.
CORPUS = [
    ("a/long_song.flac", 23.5, 44100, 2, "PCM_24"),
    ("a/short.wav", 4.2, 16000, 1, "PCM_16"),
    ("b/float.wav", 7.0, 48000, 1, "FLOAT"),
    ("b/eight_bit.wav", 3.0, 8000, 1, "PCM_U8"),
    ("c/vorbis.ogg", 12.3, 22050, 2, None),
    ("c/lame.mp3", 5.0, 32000, 1, None),
    ("d/six_channels.wav", 3.5, 96000, 6, "PCM_32"),
    ("d/tiny.wav", 0.3, 32000, 1, "PCM_16"),  # shorter than min_s: skipped by policy
]


def make_corpus(root: Path, with_m4a: bool = False) -> list[Path]:
    """Write the corpus (deterministic) plus sidecar metadata for one file; returns the audio paths."""
    paths = []
    for i, (name, seconds, sr, channels, subtype) in enumerate(CORPUS):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_audio(path, synth(seconds, sr, channels, "music", seed=i), sr, subtype)
        paths.append(path)
    if with_m4a:
        paths.append(write_with_av(root / "e/aac.m4a", synth(6.0, 44100, 2, "music", seed=99), 44100, "aac"))
    (root / "a/long_song.json").write_text(json.dumps(
        {"title": "Long song", "artist": "Tester", "genre": "rock", "bpm": "128", "moods": ["happy", "loud"],
         "keywords": "guitar, drums", "description": "A test song.", "label": "none", "year": 2024}))
    return paths


def compose(overrides: list[str]) -> RunConfig:
    """The config exactly as the CLI would build it (Hydra compose over conf/)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return RunConfig.from_dictconfig(cfg)


def base_overrides(data: Path, out: Path, codec_dir: Path, *extra: str) -> list[str]:
    """Small, fast settings: 10 s windows, tiny fixture codec, 2 decode workers, no progress bar."""
    return [
        "dataset=folder", f"dataset.path={data}", f"output.dir={out}", f"codec.pretrained={codec_dir}",
        "segment.length_s=10", "segment.min_s=1", "batch.max_audio_s=40", "output.unit_size=3",
        "progress=false", "decode.workers=2", *extra,
    ]


def read_rows(out: Path) -> dict[tuple[str, int], dict]:
    """All output rows keyed by (id, segment_index), with codes as int16 [K, T] arrays."""
    rows = {}
    for shard in sorted((out / "data").glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            row["codes"] = np.asarray(row["codes"], dtype=np.int16)
            key = (row["id"], row["segment_index"])
            assert key not in rows, f"duplicate row {key}"
            rows[key] = row
    return rows


def frames_for(n_samples: int, hop: int = 640) -> int:
    return math.ceil(n_samples / hop)


# Fake credentials for moto's S3 server, and no proxy for loopback (a proxy from the environment would swallow it).
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@contextlib.contextmanager
def moto_environment() -> Iterator[None]:
    """``MOTO_ENV`` set in ``os.environ`` (decode workers and runs started meanwhile inherit it), then restored."""
    saved = {k: os.environ.get(k) for k in MOTO_ENV}
    os.environ.update(MOTO_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
