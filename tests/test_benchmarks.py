"""``python -m benchmarks.run`` on a tiny workload (tiny fixture codec, seconds of audio): it runs every stage and
writes every field with sane values. No timing thresholds: timings on a shared CI machine are noise."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

STAGE_FIELDS = ("timed_s", "audio_s_per_s", "rtf", "cpu_s", "peak_rss_mb", "peak_tree_rss_mb", "outer_wall_s",
                "audio_s")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_benchmark_writes_every_field(tmp_path: Path, tiny_codec_dir: Path) -> None:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "benchmarks.run", "--minutes", "0.2", "--min-s", "3", "--max-s", "6",
           "--codec", str(tiny_codec_dir), "--device", "cpu", "--out", str(out), "--work", str(tmp_path / "work"),
           "--set", "segment.length_s=5", "--max-audio-s", "20", "--workers", "1",
           "--stages", "naive,codec,pipeline,host"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["ok"] and result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    assert result["corpus"]["files"] >= 2 and _positive(result["corpus"]["audio_s"])
    assert set(result["stages"]) == {"naive", "codec", "pipeline", "host"}
    for name, stage in result["stages"].items():
        for field in STAGE_FIELDS:
            assert _positive(stage[field]), (name, field, stage.get(field))
        assert stage["returncode"] == 0
        assert math.isclose(stage["rtf"] * stage["audio_s_per_s"], 1.0, rel_tol=1e-6)
        # Every stage saw the same audio.
        assert stage["audio_s"] == result["corpus"]["audio_s"]
    pipeline = result["stages"]["pipeline"]
    assert pipeline["processes"] >= 2  # the main process and its decode worker were both sampled
    assert pipeline["stats"]["failed"] == 0 and pipeline["stats"]["ok"] == result["corpus"]["files"]
    assert math.isclose(pipeline["stats"]["audio_s"], result["corpus"]["audio_s"], rel_tol=1e-3)
    # The host stage (instant codec) makes the same rows from the same audio, and both report their loop.
    host = result["stages"]["host"]
    assert host["stats"]["rows"] == pipeline["stats"]["rows"] and host["stats"]["ok"] == pipeline["stats"]["ok"]
    assert pipeline["rank_loop"].startswith("this rank") and "codec idle" in host["rank_loop"]
    # Where a faster codec would hit the host: the parent's threads and the workers' busy share, measured.
    busy = re.search(r"decode workers (\d+)% busy \((\d+)\)", pipeline["rank_loop"])
    assert busy and int(busy.group(2)) >= 1, pipeline["rank_loop"]  # a tiny job: the share may round to 0%
    assert re.search(r"loop [1-9]\d*%", pipeline["rank_loop"]), pipeline["rank_loop"]
    codec = result["stages"]["codec"]
    assert codec["batches"] >= 1 and codec["padded_audio_s"] >= codec["segment_audio_s"] > 0

    for name, value in result["ratios"].items():
        assert _positive(value), name
    storage = result["storage"]
    assert storage["tokens"] == pipeline["stats"]["tokens"] > 0
    assert 0 < storage["codes_column_bytes"] < storage["shard_bytes"]
    for field in ("bits_per_token", "marginal_bits_per_token", "codes_bits_per_token", "codes_data_bits_per_token",
                  "unigram_entropy_bits"):
        assert _positive(storage[field]), field
    assert set(result["targets"]) == {"pipeline_over_codec >= 0.9", "pipeline_over_naive >= 1.8",
                                      "marginal_bits_per_token < 11.5"}
    assert "audio s/s" in proc.stdout and "bits/token" in proc.stdout


def test_rejects_unknown_stage() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--stages", "naive,bogus"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bogus" in proc.stderr


def test_decode_scaling_decodes_every_file(tmp_path: Path) -> None:
    """The decode-ceiling benchmark: every file decoded at least once whatever the process count (each process
    keeps going for the window), rates filled in."""
    from benchmarks.decode_scaling import measure
    from pipeline.sources.folder import FolderSource
    from pipeline.testing import dummies

    for i, seconds in enumerate((2.0, 3.0, 1.5)):
        dummies.write_audio(tmp_path / f"song{i}.flac", dummies.synth(seconds, 44100, 2, seed=i), 44100, "PCM_16")
    items = FolderSource(str(tmp_path), ["flac"]).list_items()
    for procs in (1, 2):
        r = measure(str(tmp_path), items, procs, seconds=0.0)  # one pass over each share
        assert r["procs"] == procs and math.isclose(r["audio_s"], 6.5, abs_tol=0.05)
        assert r["audio_s_per_s"] > 0 and r["audio_s_per_cpu_s"] > 0 and 0 < r["cores_busy"] <= procs * 1.1
    r = measure(str(tmp_path), items, 1, seconds=1.0)  # then round again until the window closes
    assert r["audio_s"] > 6.5 and r["wall_s"] >= 1.0


def test_decode_parts_times_each_part_of_the_worker(tmp_path: Path) -> None:
    """The decode-cost breakdown runs the pipeline's own read, downmix, resample and worker path on real files and
    reports a rate for each (no thresholds: only that every part ran on all the audio)."""
    from benchmarks.decode_parts import measure
    from pipeline.testing import dummies

    for i, seconds in enumerate((2.0, 3.0)):
        dummies.write_audio(tmp_path / f"song{i}.flac", dummies.synth(seconds, 44100, 2, seed=i), 44100, "PCM_16")
    r = measure(str(tmp_path), repeat=1)
    assert r["files"] == 2 and math.isclose(r["audio_s"], 5.0, abs_tol=0.05)
    assert set(r["parts"]) == {"read (soundfile)", "read (pyav)", "channels", "resample", "worker"}
    assert all(_positive(p["audio_s_per_cpu_s"]) for p in r["parts"].values())
    assert r["parts"]["worker"]["share_of_worker"] == 1.0
