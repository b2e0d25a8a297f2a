"""Regenerate the bundled example clips in examples/audio (deterministic; run from the repo root).

    python examples/make_examples.py

Small on purpose (well under 1 MB): a few seconds in each format, rate and channel count a user meets, plus
audiocraft-style sidecar JSON metadata, and one clip longer than a window so the tail rule shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import soundfile as sf

from pipeline.testing.dummies import synth, write_audio

OUT = Path(__file__).parent / "audio"

CLIPS = [
    # name, seconds, rate, channels, kind, sidecar metadata
    ("music/piano_loop.ogg", 32.0, 44100, 2, "music",
     {"title": "Piano loop", "artist": "Synth Ensemble", "genre": "ambient", "bpm": 120, "key": "C major",
      "moods": ["calm", "bright"], "keywords": "piano, loop", "description": "A synthetic piano-like loop."}),
    ("music/bass_line.flac", 4.0, 22050, 1, "music",
     {"title": "Bass line", "genre": "electronic", "bpm": 96.5, "moods": "dark, driving",
      "description": "Low synthetic notes.", "license": "CC0"}),
    ("speech/tone_8k.wav", 3.0, 8000, 1, "tone", None),
    ("fx/noise burst.mp3", 2.0, 48000, 2, "noise", None),
    ("fx/too_short.wav", 0.4, 32000, 1, "music", None),
]


def main() -> None:
    for i, (name, seconds, sr, channels, kind, meta) in enumerate(CLIPS):
        path = OUT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        audio = synth(seconds, sr, channels, kind, seed=i)
        if path.suffix == ".ogg":  # strongest Vorbis compression keeps the bundle small
            sf.write(path, audio.T, sr, format="OGG", subtype="VORBIS", compression_level=1.0)
        else:
            write_audio(path, audio, sr)
        if meta:
            path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(CLIPS)} clips to {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
