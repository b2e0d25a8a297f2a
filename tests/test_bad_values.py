"""One bad value costs one item, named: metadata no column can hold, sidecars that are huge, endless or not files,
and what a long item's metadata costs on the way from the decode workers (issue 14)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

from helpers import base_overrides
from pipeline.config import SegmentConfig
from pipeline.segment import SegmentPolicy
from pipeline.sources.folder import FolderSource
from pipeline.testing import dummies as d
from pipeline.workers import DecodePool, DecodeSpec, DecodeTask

CAP = 4096  # dataset.sidecar_max_bytes in the CLI run

# audio id -> (sidecar text, or a callable making the sidecar at a path; expected (stage, reason) or None = rows)
SIDECARS = {
    "good.wav": ('{"title": "fine", "moods": ["calm"], "bpm": 90}', None),
    "moods_int.wav": ('{"moods": 5}', ("read", "bad_metadata")),
    "bpm_huge.wav": ('{"bpm": ' + "9" * 400 + "}", ("read", "bad_metadata")),
    "title_surrogate.wav": ('{"title": "bad \\ud800"}', ("read", "bad_metadata")),
    "other_surrogate.wav": ('{"label": {"x": ["\\udce9"]}}', ("read", "bad_metadata")),
    "big.wav": (json.dumps({"description": "x" * CAP}), ("read", "bad_sidecar")),
    "at_cap.wav": (json.dumps({"description": "y" * (CAP - 20)}).ljust(CAP), None),
    "dev_zero.wav": (lambda p: p.symlink_to("/dev/zero"), ("read", "bad_sidecar")),
    "fifo.wav": (lambda p: os.mkfifo(p), ("read", "bad_sidecar")),
}


def _corpus(root: Path) -> Path:
    root.mkdir()
    for name, (sidecar, _) in SIDECARS.items():
        d.write_audio(root / name, d.synth(1.5, 16000, seed=3), 16000)
        path = (root / name).with_suffix(".json")
        sidecar(path) if callable(sidecar) else path.write_text(sidecar)
    return root


def test_bad_sidecar_values_fail_their_item_alone_named(tmp_path, tiny_codec_dir):
    """Through the CLI: ``{"moods": 5}`` (TypeError) and a 400-digit bpm (OverflowError) stopped the run in the
    writer thread with exit 1, nothing committed; a lone surrogate stopped every rerun with exit 2; a sidecar
    linked to /dev/zero was read until memory ran out; a FIFO blocked its worker. Now each fails its item in the
    read stage, naming the sidecar, and the others are written."""
    data, out = _corpus(tmp_path / "data"), tmp_path / "out"
    args = base_overrides(data, out, tiny_codec_dir, f"dataset.sidecar_max_bytes={CAP}", "decode.timeout_s=30")
    proc = subprocess.run([sys.executable, "-m", "pipeline.tokenize", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r["item_id"]: r for f in (out / "failures").glob("*.jsonl") for r in map(json.loads, f.read_text()
                                                                                          .splitlines())}
    assert {i: (r["stage"], r["reason"]) for i, r in records.items()} == {
        i: want for i, (_, want) in SIDECARS.items() if want is not None}
    for item_id, record in records.items():
        assert str(data / Path(item_id).with_suffix(".json")) in record["message"], record
    assert "field 'moods' is int (5)" in records["moods_int.wav"]["message"]
    assert "beyond float64" in records["bpm_huge.wav"]["message"]
    assert "lone surrogate \\ud800" in records["title_surrogate.wav"]["message"]
    assert f"dataset.sidecar_max_bytes={CAP}" in records["big.wav"]["message"]
    assert "not a regular file" in records["dev_zero.wav"]["message"]
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["ok"], stats["failed"]) == (2, len(SIDECARS) - 2)


def test_a_long_items_metadata_travels_once_not_once_per_segment(tmp_path):
    """A 100 s item cut into 20 segments with a 256 KB sidecar: every part message carried the item again, and the
    parent unpickled a copy per part (an 18 MB sidecar on a 12-minute file: 6.8 GB). Now the segments the pool
    returns share one item, so the results pickle to about one copy of the metadata, not twenty."""
    description = "lyrics " * (256 * 1024 // 7)
    d.write_audio(tmp_path / "long.wav", d.synth(100.0, 8000, seed=1), 8000)
    (tmp_path / "long.json").write_text(json.dumps({"description": description, "genre": "folk"}))
    source = FolderSource(str(tmp_path), ["wav"])
    (item,) = source.list_items()
    policy = SegmentPolicy.from_config(SegmentConfig(length_s=5.0, min_s=1.0), 8000)
    pool = DecodePool(DecodeSpec(source, 8000, "mono", "HQ", policy), workers=1, timeout_s=60)
    try:
        pool.submit(DecodeTask(item, 0))
        results = []
        while not any(r.final for r in results):
            results += pool.poll(timeout=5.0)
    finally:
        pool.close()
    segments = [seg for r in results for seg in r.segments]
    assert len(segments) == 20 and results[-1].failure is None
    assert all(seg.item.metadata["description"] == description for seg in segments)
    assert results[-1].item.metadata["genre"] == "folk"
    # Audio goes out of band: what is left is the records, and the metadata in them once.
    head = len(pickle.dumps(results, protocol=5, buffer_callback=lambda b: None))
    assert head < 2 * len(description), (head, len(description))
