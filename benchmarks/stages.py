"""The measured stages. ``benchmarks.run`` starts each in a fresh process (see ``benchmarks.measure``):

    python -m benchmarks.stages {naive|codec|pipeline} SPEC.json RESULT.json

- ``naive``: what users write today: per file, soundfile -> mono -> resample -> ``AutoProcessor`` ->
  ``EncodecModel.encode``, one file at a time, torch's default threads.
- ``codec``: the codec's limit: ``Codec.encode`` alone on the pipeline's own fixed-shape batches of the same
  audio, decoded and batched in memory before the clock starts (one warm-up batch per shape is not timed).
- ``pipeline``: ``pipeline.tokenize.run`` end to end into a fresh output folder.

Under ``torchrun`` every rank runs the stage (``codec`` takes every N-th batch) and writes ``RESULT.<rank>.json``.
Heavy imports happen before each stage's clock starts, so all stages are timed from the same point.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT, RunConfig, register_configs, resolve_auto


def compose(overrides: list[str]) -> RunConfig:
    """The config exactly as ``python -m pipeline.tokenize OVERRIDES`` builds it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        return RunConfig.from_dictconfig(hydra_compose(config_name="config", overrides=overrides))


def naive(spec: dict[str, Any]) -> dict[str, Any]:
    import soundfile as sf
    import soxr
    import torch
    from transformers import AutoProcessor, EncodecModel

    device = torch.device(spec["device"])
    if spec.get("naive_threads"):
        torch.set_num_threads(spec["naive_threads"])
    # The clocks, wall and CPU, include the model load: the pipeline stage's include its own (inside ``run``).
    start, cpu0 = time.time(), _cpu()
    processor = AutoProcessor.from_pretrained(spec["naive_codec_dir"])
    model = EncodecModel.from_pretrained(spec["naive_codec_dir"]).to(device).eval()
    loaded = time.time()
    sr_out, frames, audio_s = processor.sampling_rate, 0, 0.0
    for path in spec["files"]:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        wav = soxr.resample(data.mean(axis=1), sr, sr_out)
        inputs = processor(raw_audio=wav, sampling_rate=sr_out, return_tensors="pt")
        with torch.no_grad():
            out = model.encode(inputs["input_values"].to(device), inputs["padding_mask"].to(device))
        frames += out.audio_codes.cpu().shape[-1]
        audio_s += data.shape[0] / sr
    end = time.time()
    return {"start": start, "end": end, "setup_s": loaded - start, "work_s": end - loaded,
            "work_cpu_s": _cpu() - cpu0, "audio_s": audio_s,
            "frames": frames, "threads": torch.get_num_threads(), **_gpu_memory(device)}


def codec(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from pipeline.codecs import load_codec, resolve_device
    from pipeline.encode import encode_batch

    cfg = compose(spec["overrides"])
    rank, world = _rank()
    device = resolve_device(cfg.codec.device)
    cfg = resolve_auto(cfg, str(device))  # the batch size and threads the pipeline picks on this device
    torch.set_num_threads(cfg.codec.threads)  # as pipeline.tokenize.run does
    start = time.time()
    model = load_codec(cfg.codec, device)
    loaded = time.time()
    batches = _batches(cfg, model, spec.get("repeat", 1))[rank::world]
    decoded = time.time()
    warm_start = time.time()
    for shape in sorted({(b.rows, b.padded_len) for b in batches}):
        batch = next(b for b in batches if (b.rows, b.padded_len) == shape)
        if model.graphs is not None:  # codec.cuda_graph: captured per shape, as the pipeline's warm-up does
            model.graphs.capture((batch.rows, batch.row_channels, batch.padded_len))
        encode_batch(model, batch)  # waits for the device
    warm_s = time.time() - warm_start
    _reset_gpu_peak(device)
    _barrier(world)  # ranks start the clock together, after every one has loaded, decoded and warmed up
    t0, cpu0 = time.time(), _cpu()
    _encode_as_the_pipeline(model, batches)
    end, work_cpu = time.time(), _cpu() - cpu0
    _barrier(world, last=True)
    seg_s = sum(s.n_samples for b in batches for s in b.segments) / model.sample_rate
    padded_s = sum(b.rows * b.padded_len for b in batches) / model.sample_rate
    return {"start": t0, "end": end, "setup_s": loaded - start, "predecode_s": decoded - loaded,
            "warmup_s": warm_s, "export_s": getattr(model, "export_seconds", 0.0), "work_s": end - t0,
            "work_cpu_s": work_cpu,
            "batches": len(batches), "shapes": sorted({f"{b.rows}x{b.padded_len}" for b in batches}),
            "segment_audio_s": seg_s, "padded_audio_s": padded_s, "threads": torch.get_num_threads(),
            "fingerprint": model.fingerprint(), **_gpu_memory(device)}


def _batches(cfg: RunConfig, model, repeat: int = 1) -> list:
    """The batches the pipeline makes of this dataset: same decode, segment and batch code, run in memory.

    ``repeat``: the dataset is that many copies of these files; their segments are batched as the pipeline batches
    the copies (full batches throughout, one partial batch per bucket at the end), not as one copy's batches
    repeated (a partial batch per copy)."""
    from pipeline.batching import Batcher, BatchPolicy
    from pipeline.segment import SegmentPolicy
    from pipeline.sources import build_source
    from pipeline.workers import DecodeSpec, DecodeTask, process_item

    source = build_source(cfg.dataset)
    spec = DecodeSpec(source, model.sample_rate, cfg.channels, cfg.decode.resample_quality,
                      SegmentPolicy.from_config(cfg.segment, model.sample_rate))
    batcher = Batcher(BatchPolicy.for_codec(cfg.batch, cfg.channels, model))  # as build_stages
    segments = []
    for item in source.list_items():
        results: list = []
        process_item(DecodeTask(item, 0), spec, results.append)
        segments += [seg for r in results for seg in r.segments]
    batches = []
    for seg in segments * repeat:  # the same arrays, referenced again: no extra memory
        if (batch := batcher.add(seg)) is not None:
            batches.append(batch)
    return batches + batcher.flush()


def _encode_as_the_pipeline(model, batches: list) -> None:
    """The batches encoded as the pipeline encodes them (``Launcher`` + ``collect_batch``). On CUDA that is the
    launcher thread, pinned buffers, asynchronous copies and two batches in flight: the codec's limit includes
    moving the audio there, but not waiting on each copy (before, each batch's copies were synchronous and the
    pipeline's loop beat this stage). On CPU it is the encode, then splitting the codes."""
    import collections

    from pipeline.encode import Launcher, collect_batch

    launcher, pending = Launcher(model), collections.deque()
    try:
        for batch in batches:
            pending.append(launcher.launch(batch))
            if len(pending) > 2:
                collect_batch(model, pending.popleft())
        while pending:
            collect_batch(model, pending.popleft())
    finally:
        launcher.close()


def pipeline_stage(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers  # noqa: F401 - imported before the clock, as in the other stages

    from pipeline.tokenize import run

    cfg = compose(spec["overrides"])
    start, cpu0 = time.time(), _cpu()
    code = run(cfg)
    end, work_cpu = time.time(), _cpu() - cpu0  # decode workers are reaped by then, so they are counted
    device = torch.device("cuda" if cfg.codec.device.startswith("cuda") or
                          (cfg.codec.device == "auto" and torch.cuda.is_available()) else "cpu")
    return {"start": start, "end": end, "work_cpu_s": work_cpu, "exit_code": code, "threads": torch.get_num_threads(),
            **_gpu_memory(device)}


def host(spec: dict[str, Any]) -> dict[str, Any]:
    """The pipeline with an instant codec (codes of zeros, the right shape): everything but the encoder, i.e. the
    decode, batching (the fill into pinned memory on CUDA) and commit the host must keep up with (no copies to or
    from the GPU). Its audio s/s is the most a GPU can be fed."""
    import torch

    import pipeline.encode
    from pipeline.encode import LaunchedBatch

    def instant(codec, batch, launched=None, host=None):
        launched = launched or LaunchedBatch(batch)
        frames = codec.n_frames(batch.padded_len)
        # The fill into pinned memory stays (here, or in the Launcher's fill thread as in the pipeline).
        if host is None:
            pipeline.encode.fill_host(codec, batch)
        launched.codes = torch.zeros((batch.rows, codec.num_codebooks, frames), dtype=torch.int64)
        return launched

    pipeline.encode.launch_batch = instant
    return pipeline_stage(spec)


def _cpu() -> float:
    """CPU seconds (user + system) of this process's threads and of its reaped children. On a busy machine wall
    time stretches with the load, CPU time much less (with one thread per process): a second opinion."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world: int, last: bool = False) -> None:
    """A gloo barrier across torchrun's ranks (nothing when alone)."""
    if world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    if last:
        dist.destroy_process_group()


def _reset_gpu_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_memory(device) -> dict[str, Any]:
    import torch

    if device.type != "cuda":
        return {}
    return {"peak_gpu_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}


STAGES = {"naive": naive, "codec": codec, "pipeline": pipeline_stage, "host": host}


def main(argv: list[str]) -> int:
    stage, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    rank, world = _rank()
    result = {**STAGES[stage](spec), "rank": rank, "world_size": world, "pid": os.getpid()}
    out = Path(result_path)
    if world > 1:
        out = out.with_suffix(f".{rank}.json")
    out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
