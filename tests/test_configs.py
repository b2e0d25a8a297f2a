"""Every shipped config composes into a valid RunConfig; the CLI's help, --cfg and debug run work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import CONF, REPO, compose

GROUPS = ["dataset", "codec", "segment", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_shipped_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}", f"output.dir={tmp_path}"]
    if group == "dataset" and option not in ("example",):
        overrides.append(f"dataset.path={tmp_path}")
    cfg = compose(overrides)
    cfg.validate()
    assert cfg.output.dir == str(tmp_path) or group == "debug"


def test_default_config_is_the_documented_one():
    cfg = compose([])
    assert cfg.codec.pretrained == "facebook/encodec_32khz" and cfg.codec.family == "encodec"
    assert (cfg.segment.kind, cfg.segment.length_s, cfg.channels) == ("window", 30.0, "mono")
    assert cfg.dataset.path.endswith("examples/audio")


def test_bad_values_fail_at_composition():
    with pytest.raises(ValueError, match="segment.kind"):
        compose(["segment.kind=slices"])
    with pytest.raises(Exception):  # the schema rejects a typo'd key
        compose(["segment.lenght_s=3"])
    with pytest.raises(ValueError, match="dataset.path is required"):  # said in one line, not a traceback
        compose(["dataset=folder"])


def _cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.tokenize", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_groups():
    out = _cli("--help").stdout
    for group in GROUPS:
        assert f"{group}:" in out


def test_cfg_job_prints_composed_config():
    out = _cli("--cfg", "job", "segment=clip", "output.dir=/x").stdout
    assert "kind: clip" in out and "dir: /x" in out


def test_debug_run_on_bundled_example(tmp_path):
    """The README's offline command, end to end through the CLI, from another working directory."""
    proc = _cli("debug=default", f"output.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["items"] == 5 and stats["ok"] == 4 and stats["skipped"] == 1
    assert "items       5 listed: 4 ok" in proc.stdout


def test_missing_hub_weights_stop_before_any_work(tmp_path):
    """Default codec, no hub access here: a clear message naming the local-directory way, and no output."""
    proc = _cli(f"output.dir={tmp_path / 'out'}", "codec.pretrained=facebook/this-model-is-not-cached",
                cwd=tmp_path)
    assert proc.returncode == 2
    assert "codec.pretrained=DIR" in proc.stderr + proc.stdout
    assert not (tmp_path / "out" / ".state").exists() and not (tmp_path / "out" / "data").exists()


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path):
    """An output.dir that cannot be created (here: a file in the way; a read-only mount is the same error) stops
    the run with one line naming it, exit 2, instead of a traceback from Hydra making its log folder there."""
    (tmp_path / "file").write_text("not a folder")
    proc = _cli("debug=default", f"output.dir={tmp_path / 'file' / 'out'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is not writable" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_auto_settings_resolve_per_device():
    """``auto`` batch size and decode workers become numbers for the device; numbers pass through unchanged."""
    from pipeline.config import batch_audio_s, codec_threads, decode_workers, resolve_auto

    assert batch_audio_s("auto", "cpu") == 30.0 and batch_audio_s(90, "cuda:0") == 90.0
    assert codec_threads("auto", "cpu", local_ranks=2, cores=16) == 8 and codec_threads("auto", "cuda") == 1
    assert codec_threads("auto", "cpu", local_ranks=32, cores=16) == 1 and codec_threads(3, "cpu") == 3
    assert decode_workers("auto", "cpu") == 2 and decode_workers(5, "cuda") == 5
    assert decode_workers("auto", "cuda", local_ranks=1, cores=16) == 14  # all cores but the loop and collector
    assert decode_workers("auto", "cuda", local_ranks=4, cores=16) == 2  # a node's cores shared by its ranks
    assert decode_workers("auto", "cuda", local_ranks=8, cores=8) == 1
    cfg = resolve_auto(compose(["dataset=folder", "dataset.path=.", "decode.workers=3"]), "cpu")
    assert cfg.batch.max_audio_s == batch_audio_s("auto", "cpu") and cfg.decode.workers == 3
    assert cfg.codec.threads == 1  # the default: the same tokens whatever the launch
    assert resolve_auto(compose(["dataset=folder", "dataset.path=.", "codec.threads=auto"]), "cpu").codec.threads \
        == codec_threads("auto", "cpu") >= 1
    with pytest.raises(ValueError, match="batch.max_audio_s must be auto or a number"):
        compose(["dataset=folder", "dataset.path=.", "batch.max_audio_s=lots"])
    with pytest.raises(ValueError, match="decode.workers must be auto or an integer"):
        compose(["dataset=folder", "dataset.path=.", "decode.workers=-1"])


def test_batch_rows_stay_under_a_codecs_32bit_limit(tiny_codec_dir):
    """A batch cap past what CUDA's 32-bit indexing takes is cut to the codec's limit (DAC, Mimi), not failed batch
    by batch; EnCodec has no such limit: it runs its convolutions in row groups under it (SplitEncoder)."""
    from pipeline.batching import BatchPolicy
    from pipeline.codecs import load_codec
    from pipeline.config import BatchConfig, CodecConfig

    codec = load_codec(CodecConfig(pretrained=str(tiny_codec_dir), device="cpu"))
    assert codec.max_batch_samples is None
    width, window = 64, 30 * codec.sample_rate
    limit = (2**31 - 1) // (2 * width)  # what TransformersCodec sets for DAC and Mimi
    huge = BatchPolicy.from_config(BatchConfig(max_audio_s=7200, max_rows=1000), codec.sample_rate, 1, 1, limit)
    assert huge.rows_for(window) * window * 2 * width < 2**31
    small = BatchPolicy.from_config(BatchConfig(max_audio_s=240), codec.sample_rate, 1, 1, limit)
    assert small.rows_for(window) == 8  # an ordinary cap is untouched
    assert BatchPolicy.for_codec(BatchConfig(max_audio_s=7200, max_rows=1000), "mono", codec).rows_for(window) == 240


def test_cuda_graph_is_not_a_token_setting(tiny_codec_dir):
    """``codec.cuda_graph`` replays the very kernels eager runs (checked at capture), so it stays out of the plan's
    fingerprint (a job may resume with it flipped) and, on CPU, does nothing."""
    from pipeline.codecs import load_codec
    from pipeline.plan import fingerprint_detail, fingerprint_of

    base = ["dataset=folder", "dataset.path=.", f"codec.pretrained={tiny_codec_dir}"]
    off, on = compose(base), compose([*base, "codec.cuda_graph=true"])
    assert on.codec.cuda_graph and not off.codec.cuda_graph
    for kind in ("cuda:NVIDIA H100 80GB HBM3", "cpu:x"):
        assert fingerprint_of(fingerprint_detail(on, kind)) == fingerprint_of(fingerprint_detail(off, kind))
    assert fingerprint_of(fingerprint_detail(compose([*base, "codec.compile=true"]), "cuda:H100")) != \
        fingerprint_of(fingerprint_detail(off, "cuda:H100"))  # while a setting that changes tokens does
    assert load_codec(on.codec, torch.device("cpu")).graphs is None
