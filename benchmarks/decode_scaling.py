"""How much audio the host's decode stage can deliver, by process count: the decode workers' ceiling.

Each process runs the decode worker's own path (``pipeline.workers.process_item``: read, decode, downmix,
resample, segment) over its share of the files, with no codec, loop or pipe beside it. Aggregate audio seconds
per wall second at, say, 1, half, all-but-two and all the cores shows whether the cores scale (a machine whose
"cores" are hyper-threads gains little past the physical count), and so what a GPU on this host can be fed at
most.

    python -m benchmarks.decode_scaling --files /tmp/gpu-bench/audio --procs 1,8,14,16 --seconds 8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipeline.config import DecodeConfig, SegmentConfig
from pipeline.segment import SegmentPolicy
from pipeline.sources.folder import FolderSource
from pipeline.types import AudioItem
from pipeline.workers import DecodeSpec, DecodeTask, process_item


def _spec(root: str) -> DecodeSpec:
    """The default run's decode settings (segments, resampler quality) for the default codec's 32 kHz mono."""
    sr = 32000
    return DecodeSpec(FolderSource(root, ["flac", "wav"]), sr, "mono", DecodeConfig().resample_quality,
                      SegmentPolicy.from_config(SegmentConfig(), sr))


def _decode(root: str, items: list[AudioItem], start_at: float, seconds: float) -> tuple[float, float, float, float]:
    """From ``start_at`` (a shared wall-clock start), decode ``items`` once, then again from the first, until
    ``seconds`` have passed: (audio s, CPU s, start, end). Every process is busy for the whole window (a fixed
    share of the files would leave the fast ones idle while the slowest finishes)."""
    spec, audio_s, done = _spec(root), 0.0, 0
    time.sleep(max(0.0, start_at - time.time()))
    t0, cpu0 = time.time(), time.process_time()
    while done < len(items) or time.time() < t0 + seconds:
        out: list = []
        process_item(DecodeTask(items[done % len(items)], 0), spec, out.append)
        audio_s += out[-1].audio_s
        done += 1
    return audio_s, time.process_time() - cpu0, t0, time.time()


def _warm(_: int) -> int:
    return os.getpid()


def measure(root: str, files: list[AudioItem], procs: int, seconds: float = 8.0) -> dict:
    """``procs`` processes decoding at once for ``seconds`` (files dealt round-robin, each share at least once)."""
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_warm, range(procs * 4)))  # spawned and imported before the clock starts
        start_at = time.time() + 0.5
        shares = [files[i::procs] or files for i in range(procs)]
        parts = list(pool.map(_decode, [root] * procs, shares, [start_at] * procs, [seconds] * procs))
    audio_s, cpu = sum(p[0] for p in parts), sum(p[1] for p in parts)
    walls = [p[3] - p[2] for p in parts]
    rate = sum(p[0] / w for p, w in zip(parts, walls))  # the processes ran side by side: their rates add up
    return {"procs": procs, "audio_s": round(audio_s, 1), "wall_s": round(max(walls), 2), "cpu_s": round(cpu, 2),
            "audio_s_per_s": round(rate, 1), "audio_s_per_cpu_s": round(audio_s / cpu, 1),
            "cores_busy": round(cpu / (sum(walls) / procs), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", required=True, help="a folder of audio files (searched recursively)")
    ap.add_argument("--procs", default=f"1,{os.cpu_count()}", help="comma-separated process counts")
    ap.add_argument("--limit", type=int, default=0, help="use at most this many files (0: all)")
    ap.add_argument("--seconds", type=float, default=8.0, help="how long each count of processes decodes")
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()
    root = str(Path(args.files).resolve())
    files = _spec(root).source.list_items()
    files = files[: args.limit] if args.limit else files
    print(f"{len(files)} files under {root}; {os.cpu_count()} CPUs")
    results = []
    for n in (int(x) for x in args.procs.split(",") if x):
        r = measure(root, files, n, args.seconds)
        results.append(r)
        print(f"{n:3d} processes: {r['audio_s_per_s']:8.0f} audio s/s ({r['audio_s_per_cpu_s']:.0f} per CPU s, "
              f"{r['cores_busy']:.1f} cores busy)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"files": len(files), "cpus": os.cpu_count(), "results": results},
                                             indent=2))


if __name__ == "__main__":
    main()
