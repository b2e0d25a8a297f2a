"""Where a decode worker's CPU goes, part by part: what decoding costs per audio second, and what could get cheaper.

One process, the pipeline's own functions on the same files (best of ``--repeat``: the page cache holds them):

- read: the file to ``[C, n]`` blocks as the worker reads it (``pipeline.audio``: soundfile, 16-bit PCM as int16),
  and the same through PyAV (ffmpeg's decoder), the other backend, for comparison;
- channels: the channel policy on those blocks (the mono downmix);
- resample: soxr at the run's quality from the source rate to the codec's, on the downmixed blocks;
- worker: the decode worker's whole path (``process_item``: read, validate, downmix, resample, segment).

Each part is timed in CPU seconds, best of ``--repeat``, and reported as audio seconds per CPU second and as a
share of the worker's. A part near 100% is the floor: the worker cannot get cheaper than its decoder.

    python -m benchmarks.decode_parts --files /tmp/gpu-bench/audio --limit 8
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soxr

from benchmarks.corpus import machine
from benchmarks.decode_scaling import _spec
from pipeline.audio import _apply_channel_policy, _pyav_open, _soundfile_open
from pipeline.workers import DecodeTask, process_item


def _cpu_best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return max(best, 1e-9)


def measure(root: str, limit: int = 0, repeat: int = 3) -> dict:
    """Each part's audio seconds per CPU second over the files under ``root`` (at most ``limit``; 0: all)."""
    spec = _spec(root)
    items = spec.source.list_items()
    items = items[:limit] if limit else items
    data = [spec.source.fetch(it).data for it in items]  # what the worker decodes: a path, or bytes

    def read(open_) -> list[list[np.ndarray]]:
        return [list(open_(d, "bench")[2]) for d in data]

    blocks = read(_soundfile_open)
    rates = [_soundfile_open(d, "bench")[0] for d in data]
    audio_s = sum(sum(b.shape[1] for b in bs) / sr for bs, sr in zip(blocks, rates))
    mixed = [[_apply_channel_policy(b, spec.channels) for b in bs] for bs in blocks]

    def resample() -> None:
        for bs, sr in zip(mixed, rates):
            if sr == spec.sample_rate:
                continue
            stream = soxr.ResampleStream(sr, spec.sample_rate, bs[0].shape[0], dtype="float32",
                                         quality=spec.quality)
            for i, b in enumerate(bs):
                stream.resample_chunk(b.T, last=i == len(bs) - 1)

    def worker() -> None:
        for it in items:
            process_item(DecodeTask(it, 0), spec, lambda _: None)

    parts = {
        "read (soundfile)": lambda: read(_soundfile_open),
        "read (pyav)": lambda: read(_pyav_open),
        "channels": lambda: [[_apply_channel_policy(b, spec.channels) for b in bs] for bs in blocks],
        "resample": resample,
        "worker": worker,
    }
    cpu = {name: _cpu_best(fn, repeat) for name, fn in parts.items()}
    return {"machine": machine(), "files": len(items), "audio_s": round(audio_s, 1), "quality": spec.quality,
            "parts": {name: {"audio_s_per_cpu_s": round(audio_s / s, 1), "share_of_worker": round(s / cpu["worker"], 3)}
                      for name, s in cpu.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", required=True, help="a folder of audio files (searched recursively)")
    ap.add_argument("--limit", type=int, default=8, help="use at most this many files (0: all)")
    ap.add_argument("--repeat", type=int, default=3, help="time each part this many times, keep the fastest")
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()
    result = measure(str(Path(args.files).resolve()), args.limit, args.repeat)
    print(f"{result['files']} files, {result['audio_s']:.0f} s of audio")
    for name, r in result["parts"].items():
        print(f"{name:18s} {r['audio_s_per_cpu_s']:8.0f} audio s per CPU s  ({r['share_of_worker']:.0%} of the worker)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
