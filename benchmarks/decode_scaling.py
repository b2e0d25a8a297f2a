"""How much audio the host's decode stage can deliver, by process count: the decode workers' ceiling.

Each process runs the decode worker's own path (``pipeline.workers.process_item``: read, decode, downmix,
resample, segment) over its share of the files, with no codec, loop or pipe beside it. Aggregate audio seconds
per wall second at, say, 1, half, all-but-two and all the cores shows whether the cores scale (a machine whose
"cores" are hyper-threads gains little past the physical count), and so what a GPU on this host can be fed at
most.

    python -m benchmarks.decode_scaling --files /tmp/gpu-bench/audio --procs 1,8,14,16
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipeline.segment import SegmentPolicy
from pipeline.sources.folder import FolderSource
from pipeline.types import AudioItem
from pipeline.workers import DecodeSpec, DecodeTask, process_item


def _spec(root: str) -> DecodeSpec:
    policy = SegmentPolicy("window", length=30 * 32000, hop=30 * 32000, min_len=32000, quantum=30 * 32000)
    return DecodeSpec(FolderSource(root, ["flac", "wav"]), 32000, "mono", "HQ", policy)


def _decode(root: str, items: list[AudioItem], start_at: float) -> tuple[float, float, float, float]:
    """Decode ``items`` from ``start_at`` (a shared wall-clock start): (audio s, CPU s, start, end)."""
    spec, audio_s = _spec(root), 0.0
    time.sleep(max(0.0, start_at - time.time()))
    t0, cpu0 = time.time(), time.process_time()
    for item in items:
        out: list = []
        process_item(DecodeTask(item, 0), spec, out.append)
        audio_s += out[-1].audio_s
    return audio_s, time.process_time() - cpu0, t0, time.time()


def _warm(_: int) -> int:
    return os.getpid()


def measure(root: str, files: list[AudioItem], procs: int) -> dict:
    """Every file decoded once by ``procs`` processes (files dealt round-robin)."""
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_warm, range(procs * 4)))  # spawned and imported before the clock starts
        start_at = time.time() + 0.5
        parts = list(pool.map(_decode, [root] * procs, [files[i::procs] for i in range(procs)], [start_at] * procs))
    audio_s = sum(p[0] for p in parts)
    wall = max(p[3] for p in parts) - min(p[2] for p in parts)
    cpu = sum(p[1] for p in parts)
    # The sum of each process's own rate is the rate while all run at once (the slowest share sets the wall).
    return {"procs": procs, "audio_s": round(audio_s, 1), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "audio_s_per_s": round(audio_s / wall, 1), "audio_s_per_s_concurrent": round(
                sum(p[0] / (p[3] - p[2]) for p in parts), 1), "audio_s_per_cpu_s": round(audio_s / cpu, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", required=True, help="a folder of audio files (searched recursively)")
    ap.add_argument("--procs", default=f"1,{os.cpu_count()}", help="comma-separated process counts")
    ap.add_argument("--limit", type=int, default=0, help="use at most this many files (0: all)")
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()
    root = str(Path(args.files).resolve())
    files = _spec(root).source.list_items()
    files = files[: args.limit] if args.limit else files
    print(f"{len(files)} files under {root}; {os.cpu_count()} CPUs")
    results = []
    for n in (int(x) for x in args.procs.split(",") if x):
        r = measure(root, files, n)
        results.append(r)
        print(f"{n:3d} processes: {r['audio_s_per_s']:8.0f} audio s/s, {r['audio_s_per_s_concurrent']:.0f} while all "
              f"ran ({r['audio_s_per_cpu_s']:.0f} per CPU s, "
              f"{r['cpu_s'] / r['wall_s']:.1f} cores busy)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"files": len(files), "cpus": os.cpu_count(), "results": results},
                                             indent=2))


if __name__ == "__main__":
    main()
