"""The codec's GPU options, each measured for speed and for token agreement against IEEE fp32, and the batch shape.

    python -m benchmarks.gpu_options [--codec full|tiny|DIR] [--device cuda] [--rows 16] [--out FILE.json]

One process, one batch of ``--rows`` different 30 s music rows (MusicGen's window) at the codec's rate:

- settings: ``codec.tf32=false`` (IEEE fp32, the reference), ``tf32=true`` (the default on CUDA), ``dtype=bfloat16``
  (autocast encoder, RVQ in IEEE fp32), and each of the last two with ``codec.compile=true``; the TF32 encode
  replayed as a CUDA graph (``codec.cuda_graph=true``); cuDNN autotuning (not a codec option). For each: audio
  seconds per second (best of ``--iters`` timed encodes after one warm-up; the warm-up's time is the compile
  time), peak GPU memory, and the codes' agreement with the reference, overall and per codebook (a flip in
  codebook k changes the residual of every later codebook, so later codebooks agree less).
- sweep: the default setting at ``--sweep-rows`` rows per batch (``batch.max_audio_s = rows * 30``): throughput and
  peak memory by batch size, which is what ``batch.max_audio_s`` for a GPU is chosen from.

On CPU it runs too (only the fp32 setting applies: TF32, bf16 and compile are CUDA-only and ignored there). The
fixture codecs have the real architecture and cost; token agreement on real weights can differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.corpus import machine, music
from benchmarks.run import resolve_codec
from pipeline.codecs import load_codec, resolve_device
from pipeline.config import CodecConfig

SETTINGS = {
    "fp32": {"tf32": False},
    "tf32": {"tf32": True},
    "bf16": {"dtype": "bfloat16"},
    "tf32+compile": {"tf32": True, "compile": True},
    "bf16+compile": {"dtype": "bfloat16", "compile": True},
    # Not a codec option (yet): cuDNN times its algorithms per shape and keeps the fastest. Measured here first.
    "tf32+cudnn_benchmark": {"tf32": True},
    # codec.cuda_graph: the encode captured once as a CUDA graph at the batch's shape and replayed, so the LSTM's
    # thousands of kernels per batch cost one launch (in the pipeline, queuing them kept a host thread 76-90% busy,
    # competing with the decode workers). Does it capture, how fast, the same codes as eager tf32?
    "tf32+cuda_graph": {"tf32": True, "cuda_graph": True},
}
WINDOW_S = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_options", description=__doc__.split("\n\n")[0])
    p.add_argument("--codec", default="full", help="full | tiny | save_pretrained dir (default full)")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default cuda)")
    p.add_argument("--rows", type=int, default=16, help="rows of 30 s per batch for the settings (default 16)")
    p.add_argument("--iters", type=int, default=5, help="timed encodes per setting (default 5)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {','.join(SETTINGS)}")
    p.add_argument("--sweep-rows", default="1,4,8,16,32,64", help="rows per batch for the sweep ('' to skip)")
    p.add_argument("--sweep-setting", default="tf32", help="the setting the sweep runs (default tf32)")
    p.add_argument("--budget-s", type=float, default=600.0, help="skip what starts after this many seconds")
    p.add_argument("--profile", action="store_true",
                   help="also print the CUDA kernels that take the time in one --rows batch of --sweep-setting")
    p.add_argument("--out", default=None, help="results JSON (default: print only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    base = CodecConfig(pretrained=resolve_codec(args.codec), device=str(device), tf32=False)
    t_start = time.time()
    result: dict[str, Any] = {"machine": machine(), "codec": base.pretrained, "rows": args.rows, "settings": {},
                              "sweep": []}
    sweep_rows = [int(r) for r in args.sweep_rows.split(",") if r]
    audio = rows_of_music(max([args.rows, *sweep_rows]), base, device)
    reference, codes_by_setting = None, {}
    for name in args.settings.split(","):
        if time.time() - t_start > args.budget_s:
            result["settings"][name] = {"skipped": "time budget"}
            continue
        cfg = dataclasses.replace(base, **SETTINGS[name])
        if "cuda_graph" in name and device.type != "cuda":
            result["settings"][name] = {"skipped": "CUDA only"}
            print(f"[gpu_options] {name}: skipped (CUDA only)", flush=True)
            continue
        try:
            record, codes = measure(cfg, audio[: args.rows], device, args.iters, "cudnn_benchmark" in name)
        except RuntimeError as e:  # out of memory; a graph that failed its capture or its check says why
            result["settings"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"[gpu_options] {name}: {result['settings'][name]['error']}", flush=True)
            continue
        if reference is None:
            reference = codes  # the first setting is the reference (fp32 by default)
        record["agreement"] = agreement(codes, reference)
        if name.startswith("tf32+") and "tf32" in codes_by_setting:  # a variant of the default: the same codes?
            record["agreement_with_tf32"] = agreement(codes, codes_by_setting["tf32"])["all"]
        codes_by_setting[name] = codes
        result["settings"][name] = record
        print(f"[gpu_options] {name}: {record['audio_s_per_s']:.0f} audio s/s, agreement "
              f"{record['agreement']['all']:.5f} {record['agreement']['per_codebook']}, "
              f"warm-up {record['warmup_s']:.1f} s, peak {record.get('peak_gpu_allocated_mb', 0):.0f} MB"
              + (f", agreement with eager tf32 {record['agreement_with_tf32']:.5f}"
                 if "agreement_with_tf32" in record else ""), flush=True)
    for rows in sweep_rows:
        if time.time() - t_start > args.budget_s:
            result["sweep"].append({"rows": rows, "skipped": "time budget"})
            continue
        cfg = dataclasses.replace(base, **SETTINGS[args.sweep_setting])
        try:
            record, _ = measure(cfg, audio[:rows], device, args.iters)
        except RuntimeError as e:  # out of memory, or past 32-bit indexing (64 x 30 s rows in EnCodec 32 kHz)
            record = {"rows": rows, "error": f"{type(e).__name__}: {e}"[:300]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        record["max_audio_s"] = rows * WINDOW_S
        result["sweep"].append(record)
        print(f"[gpu_options] sweep {rows} rows: {record.get('audio_s_per_s', float('nan')):.0f} audio s/s, peak "
              f"{record.get('peak_gpu_allocated_mb', 0):.0f} MB", flush=True)
    if args.profile and device.type == "cuda":
        result["profile"] = profile(dataclasses.replace(base, **SETTINGS[args.sweep_setting]), audio[: args.rows],
                                    device)
    result["total_s"] = round(time.time() - t_start, 1)
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


def rows_of_music(rows: int, cfg: CodecConfig, device: torch.device) -> torch.Tensor:
    """``[rows, C, 30 s]`` float32 of different music-like audio at the codec's rate, in pinned memory on CUDA."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.pretrained)  # rate and channels, without loading the weights
    sr, channels = int(config.sampling_rate), int(getattr(config, "audio_channels", 1))
    # A few distinct clips, cycled with a per-row gain: generating 64 x 30 s of music would take a minute.
    clips = [music(WINDOW_S, seed, sr, channels) for seed in range(min(rows, 8))]
    out = np.stack([clips[i % len(clips)] * (0.5 + 0.5 * ((i * 7919) % 97) / 97) for i in range(rows)])
    audio = torch.from_numpy(out.astype(np.float32))
    return audio.pin_memory() if device.type == "cuda" else audio


def measure(cfg: CodecConfig, audio: torch.Tensor, device: torch.device, iters: int,
            cudnn_benchmark: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """Load the codec with ``cfg``, encode ``audio`` once untimed, then ``iters`` times; keep the fastest.
    With ``cfg.cuda_graph`` the encode replays the pipeline's CUDA graph (the untimed part includes the capture and
    its check against eager)."""
    codec = load_codec(cfg, device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    encode = graphed_encode(codec, tuple(audio.shape)) if codec.graphs is not None else codec.encode
    codes = encode(audio.to(device, non_blocking=True)).cpu().numpy()
    warmup = time.time() - t0
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        encode(audio.to(device, non_blocking=True))
        sync()
        times.append(time.perf_counter() - t0)
    audio_s = audio.shape[0] * audio.shape[-1] / codec.sample_rate
    record: dict[str, Any] = {"rows": audio.shape[0], "fingerprint": {k: v for k, v in codec.fingerprint().items()
                                                                      if k in ("dtype", "tf32", "compile", "device_kind")},
                              "warmup_s": warmup, "best_s": min(times), "median_s": float(np.median(times)),
                              "audio_s_per_s": audio_s / min(times)}
    if device.type == "cuda":
        record["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    del codec, encode
    gc.collect()  # codec and its CUDA graphs refer to each other: free the graphs' memory pool before the next setting
    return record, codes


def graphed_encode(codec, shape: tuple[int, int, int]):
    """``encode(x)`` that replays the codec's CUDA graph for ``shape`` (``pipeline.cuda_graphs``): codes in the
    graph's output buffer, valid until the next call. Raises when the graph failed its capture or its check."""
    if not codec.graphs.capture(shape):
        raise RuntimeError(f"CUDA graph: {codec.graphs.failed[shape]}")
    return lambda x: codec.graphs.replay(x)[0]


def profile(cfg: CodecConfig, audio: torch.Tensor, device: torch.device, top: int = 15) -> dict[str, Any]:
    """Where one batch's GPU time goes: ``torch.profiler`` over one encode (after a warm-up), kernels by CUDA time,
    and the host time to queue it (short if nothing waits for the GPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    codec = load_codec(cfg, device)
    torch.backends.cudnn.benchmark = False
    x = audio.to(device)
    codec.encode(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    codec.encode(x)
    queued = time.perf_counter() - t0
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        codec.encode(x)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    gpu_total = sum(e.self_device_time_total for e in events)
    rows = [{"name": e.key[:90], "calls": e.count, "ms": round(e.self_device_time_total / 1e3, 2),
             "share": round(e.self_device_time_total / max(gpu_total, 1), 4)} for e in kernels]
    for r in rows:
        print(f"[gpu_options] profile {r['share']:6.1%} {r['ms']:9.2f} ms x{r['calls']:<4} {r['name']}", flush=True)
    print(f"[gpu_options] profile: queued in {queued * 1e3:.1f} ms, done in {total * 1e3:.1f} ms "
          f"(GPU kernels {gpu_total / 1e3:.1f} ms)", flush=True)
    return {"rows": audio.shape[0], "queue_ms": queued * 1e3, "total_ms": total * 1e3,
            "gpu_kernels_ms": gpu_total / 1e3, "top": rows}


def agreement(codes: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Fraction of codes equal to the reference's: all, per codebook, and frames whose every codebook agrees."""
    same = codes == reference  # [rows, K, T]
    return {"all": float(same.mean()), "per_codebook": [round(float(same[:, k].mean()), 5) for k in range(same.shape[1])],
            "frames_all_codebooks": float(same.all(axis=1).mean()), "codes": int(same.size),
            "distinct_codes_reference": int(len(np.unique(reference)))}


if __name__ == "__main__":
    sys.exit(main())
