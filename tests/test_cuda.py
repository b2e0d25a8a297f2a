"""The CUDA paths: asynchronous launch/collect, the pipeline end to end on a GPU, the GPU options' fingerprint.

Skipped without CUDA (CI has none); run on a GPU machine with ``python -m pytest -q tests/test_cuda.py``.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.batching import Batch
from pipeline.codecs import load_codec
from pipeline.config import CodecConfig
from pipeline.encode import Launcher, collect_batch, encode_batch, launch_batch, warm_up
from pipeline.tokenize import run
from pipeline.types import AudioItem, Segment
from tests.helpers import base_overrides, compose, make_corpus, read_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(rows: int, seconds: float, sr: int = 32000, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    n = round(seconds * sr)
    t = np.arange(n) / sr
    segments = []
    for i in range(rows - 1):  # one zero row left for padding
        length = n - i * 1000
        audio = (0.3 * np.sin(2 * np.pi * (110 + 40 * i) * t[:length]) + 0.05 * rng.standard_normal(length))
        item = AudioItem(index=i, id=f"item-{i}", source=f"item-{i}.wav")
        segments.append(Segment(item=item, unit=0, segment_index=0, start_s=0.0, audio=audio[None].astype(np.float32),
                                padded_len=n, source_sample_rate=sr, source_channels=1))
    return Batch(padded_len=n, rows=rows, segments=segments)


def _spread(codes: np.ndarray) -> int:
    return len(np.unique(codes))


def test_launch_collect_overlapped_equals_synchronous(tiny_codec_dir):
    """Batch N+1 launched before N is collected: every batch's codes equal its own synchronous encode."""
    codec = load_codec(CodecConfig(pretrained=str(tiny_codec_dir), device="cuda", tf32=False))
    batches = [_batch(4, 5.0, seed=s) for s in range(3)]
    sync = [encode_batch(codec, b) for b in batches]
    pending, overlapped = None, []
    for b in batches:
        launched = launch_batch(codec, b)
        if pending is not None:
            overlapped.append(collect_batch(codec, pending))
        pending = launched
    overlapped.append(collect_batch(codec, pending))
    for a, b in zip(sync, overlapped):
        for x, y in zip(a, b):
            assert np.array_equal(x.codes, y.codes)
    assert _spread(np.concatenate([s.codes.ravel() for s in sync[0]])) > 100


def test_launcher_thread_queues_in_order(tiny_codec_dir):
    """Batches queued from the launcher thread, collected oldest first: each one's codes are its own."""
    codec = load_codec(CodecConfig(pretrained=str(tiny_codec_dir), device="cuda", tf32=False))
    assert codec.device.index is not None  # the thread must not fall back to device 0
    batches = [_batch(4, 5.0, seed=s) for s in range(4)]
    sync = [encode_batch(codec, b) for b in batches]
    launcher = Launcher(codec)
    try:
        launched = [launcher.launch(b) for b in batches]
        threaded = [collect_batch(codec, lb) for lb in launched]
    finally:
        launcher.close()
    assert all(lb.done() for lb in launched)
    for a, b in zip(sync, threaded):
        for x, y in zip(a, b):
            assert np.array_equal(x.codes, y.codes)


def test_warm_up_runs_the_shape_and_leaves_codes_alone(tiny_codec_dir):
    """The warm-up encodes a zero batch of the bucket's shape (on CUDA only) and changes no later codes."""
    codec = load_codec(CodecConfig(pretrained=str(tiny_codec_dir), device="cuda", tf32=False))
    batch = _batch(4, 5.0)
    before = encode_batch(codec, batch)
    assert warm_up(codec, 4, batch.padded_len) > 0
    after = encode_batch(codec, batch)
    assert all(np.array_equal(a.codes, b.codes) for a, b in zip(before, after))
    assert _spread(np.concatenate([s.codes.ravel() for s in after])) > 100
    cpu = load_codec(CodecConfig(pretrained=str(tiny_codec_dir), device="cpu"))
    assert warm_up(cpu, 4, batch.padded_len) == 0.0


def test_pipeline_on_cuda_agrees_with_cpu(tmp_path, tiny_codec_dir):
    """The same job on CUDA (IEEE fp32) and on CPU: same rows, codes agree (not bit-identical: other kernels)."""
    make_corpus(tmp_path / "in")
    outs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        extra = [f"codec.device={device}", "codec.tf32=false", "decode.workers=auto"]
        assert run(compose(base_overrides(tmp_path / "in", out, tiny_codec_dir, *extra))) == 0
        outs[device] = read_rows(out)
    assert outs["cpu"].keys() == outs["cuda"].keys() and outs["cuda"]
    cpu = np.concatenate([r["codes"].ravel() for r in outs["cpu"].values()])
    gpu = np.concatenate([r["codes"].ravel() for r in outs["cuda"].values()])
    assert _spread(gpu) > 500
    agree = float((cpu == gpu).mean())
    print(f"CPU vs CUDA fp32 code agreement: {agree:.5f} of {cpu.size}")
    assert agree > 0.97
    shard = next((tmp_path / "cuda" / "data").glob("*.parquet"))
    model = json.loads(pq.read_metadata(shard).metadata[b"pipeline.codec_model"])
    assert model["device_kind"].startswith("cuda") and model["tf32"] is False


@pytest.mark.parametrize("options", [{"tf32": True}, {"dtype": "bfloat16"}, {"tf32": True, "compile": True}])
def test_gpu_options_in_fingerprint_and_agreement(tiny_codec_dir, options):
    """Each option is recorded as effective in the fingerprint; its codes stay close to IEEE fp32's."""
    base = CodecConfig(pretrained=str(tiny_codec_dir), device="cuda", tf32=False)
    ref_codec = load_codec(base)
    codec = load_codec(dataclasses.replace(base, **options))
    fp = codec.fingerprint()
    assert fp["tf32"] == options.get("tf32", False)
    assert fp["dtype"] == options.get("dtype", "float32")
    assert fp["compile"] == options.get("compile", False)
    batch = _batch(4, 5.0)
    ref = np.concatenate([s.codes.ravel() for s in encode_batch(ref_codec, batch)])
    got = np.concatenate([s.codes.ravel() for s in encode_batch(codec, batch)])
    agree = float((ref == got).mean())
    print(f"{options}: agreement with IEEE fp32 {agree:.5f}")
    # bf16 moves the encoder output by ~1e-2 relative: codes near a boundary flip, and a flip in codebook k changes
    # the residual of every later one (0.47 on this fixture, 0.76 on the full-size one, measured on an H200).
    assert agree > (0.3 if options.get("dtype") == "bfloat16" else 0.9)


def test_encode_does_not_wait_for_the_gpu(tiny_codec_dir):
    """Queuing an encode never reads a value back from the GPU (transformers' padding arithmetic on device tensors
    did, at every convolution), so ``launch_batch`` returns while the GPU works; with the convolutions split into
    row groups too. cuDNN picks its algorithms by shape, so groups of other sizes round a little differently (on
    CPU they give the very codes: tests/test_codec.py)."""
    codec = load_codec(CodecConfig(pretrained=str(tiny_codec_dir), device="cuda", tf32=False))
    audio = 0.1 * torch.randn(6, 1, 5 * 32000, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    whole = codec.encode(audio)  # warm-up: cuDNN and cuBLAS handles, allocator
    codec._encoder.max_elements = int(2 * codec._encoder.width * (audio.shape[-1] + 1024))  # 3 groups of 2 rows
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        split = codec.encode(audio)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    agree = float((split.cpu() == whole.cpu()).float().mean())
    print(f"row groups vs whole batch on CUDA (IEEE fp32): {agree:.5f} of the codes equal")
    assert agree > 0.97 and _spread(whole.cpu().numpy()) > 100


def test_cuda_graph_replays_give_eager_codes(tiny_codec_dir):
    """``codec.cuda_graph``: the encode captured once per shape (checked against eager at capture) and replayed
    through the launch path on new audio gives eager's codes, batch after batch, with batches in flight; a shape
    without a graph runs eager."""
    cfg = CodecConfig(pretrained=str(tiny_codec_dir), device="cuda", tf32=True)
    eager, graphed = load_codec(cfg), load_codec(dataclasses.replace(cfg, cuda_graph=True))
    assert eager.graphs is None and graphed.graphs is not None
    assert graphed.fingerprint() == eager.fingerprint()  # not a token setting
    batches = [_batch(4, 5.0, seed=s) for s in range(3)]
    assert warm_up(graphed, 4, batches[0].padded_len) > 0
    assert graphed.graphs.captured == [(4, 1, batches[0].padded_len)] and not graphed.graphs.failed
    want = [encode_batch(eager, b) for b in batches]
    launcher = Launcher(graphed)
    try:
        got = [collect_batch(graphed, lb) for lb in [launcher.launch(b) for b in batches]]
    finally:
        launcher.close()
    for a, b in zip(want, got):
        assert all(np.array_equal(x.codes, y.codes) for x, y in zip(a, b))
    assert _spread(np.concatenate([s.codes.ravel() for s in got[1]])) > 100
    other = _batch(2, 3.0)  # no graph at this shape: eager
    assert all(np.array_equal(x.codes, y.codes) for x, y in zip(encode_batch(eager, other),
                                                                encode_batch(graphed, other)))


def test_cuda_graph_that_fails_or_differs_runs_eager(tiny_codec_dir, monkeypatch):
    """An encode that syncs with the host (found before capturing) and a capture whose replay differs from eager
    are both dropped with the reason, their shapes encode eagerly with eager's codes, and the next capture works."""
    cfg = CodecConfig(pretrained=str(tiny_codec_dir), device="cuda", tf32=True)
    eager, graphed = load_codec(cfg), load_codec(dataclasses.replace(cfg, cuda_graph=True))
    real = graphed.encode_with_scales

    def syncs(audio):
        codes, scales = real(audio)
        return codes + int(codes.sum().item() * 0), scales  # .item() reads the GPU: not allowed while capturing

    def differs(audio):
        codes, scales = real(audio)
        return (codes + 1 if torch.cuda.is_current_stream_capturing() else codes), scales

    n = 5 * 32000
    for patch, rows in ((syncs, 4), (differs, 2)):
        monkeypatch.setattr(graphed, "encode_with_scales", patch)
        assert not graphed.graphs.capture((rows, 1, n))
    monkeypatch.setattr(graphed, "encode_with_scales", real)
    assert set(graphed.graphs.failed) == {(4, 1, n), (2, 1, n)} and not graphed.graphs.captured
    assert "capture failed" in graphed.graphs.failed[(4, 1, n)]
    assert "synchroniz" in graphed.graphs.failed[(4, 1, n)].lower()  # caught by the sync check, before capture
    assert "differ from eager" in graphed.graphs.failed[(2, 1, n)]
    assert graphed.graphs.capture((3, 1, n)) and graphed.graphs.captured == [(3, 1, n)]  # a fresh pool
    for rows in (4, 2, 3):
        batch = _batch(rows, 5.0)
        assert all(np.array_equal(x.codes, y.codes) for x, y in zip(encode_batch(eager, batch),
                                                                    encode_batch(graphed, batch)))


def test_pipeline_with_cuda_graphs_writes_the_eager_tokens(tmp_path, tiny_codec_dir, capsys):
    """The whole job with ``codec.cuda_graph=true`` (one window bucket; several clip buckets): the same rows and
    codes as eager, a graph per bucket, and the summary says so."""
    make_corpus(tmp_path / "in")
    outs = {}
    for name, extra in (("eager", []), ("graphs", ["codec.cuda_graph=true"]),
                        ("eager_clip", ["segment=clip", "segment.bucket_s=2"]),
                        ("graphs_clip", ["segment=clip", "segment.bucket_s=2", "codec.cuda_graph=true"])):
        out = tmp_path / name
        assert run(compose(base_overrides(tmp_path / "in", out, tiny_codec_dir, "codec.device=cuda", *extra))) == 0
        outs[name] = read_rows(out)
    printed = capsys.readouterr().out
    assert "CUDA graphs for" in printed and "graph failed" not in printed
    for a, b in (("eager", "graphs"), ("eager_clip", "graphs_clip")):
        assert outs[a].keys() == outs[b].keys() and outs[a]
        assert all(np.array_equal(outs[a][k]["codes"], outs[b][k]["codes"]) for k in outs[a])
    assert _spread(np.concatenate([r["codes"].ravel() for r in outs["graphs"].values()])) > 500
