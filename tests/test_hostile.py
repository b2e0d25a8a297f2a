"""Bad input never stops a run: a hostile corpus end to end (in process and through the CLI), decoders that
crash or hang, and ``output.retry_failed``.

Every item is accounted for exactly once (ok + failed + skipped = inputs), and each failure carries the reason
``pipeline.audio`` can actually establish. What libsndfile and ffmpeg can and cannot tell apart (measured, see the
notes in ``pipeline/audio.py``):

- a cut WAV or AIFF is ``truncated``: the header states the data size and libsndfile logs the shortfall;
- a cut FLAC loses sync in both decoders and a cut M4A loses its index (the ``moov`` atom is written last), so
  both are ``undecodable`` rather than ``truncated``;
- a cut MP3 with a Xing/Info header is ``truncated`` (the header states the stream's bytes, ``pipeline.mp3``); one
  without such a header decodes, shorter, and is *ok*: nothing states its length, so a short decode is no evidence.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from helpers import base_overrides, compose, read_rows
from pipeline.config import DatasetConfig, SegmentConfig
from pipeline.segment import SegmentPolicy
from pipeline.sources.folder import FolderSource
from pipeline.testing import dummies as d
from pipeline.tokenize import run
from pipeline.workers import FAULT_ENV, DecodePool, DecodeSpec, DecodeTask

OK = None  # expected outcome of an item that must produce rows

# Good files: every format a user meets, 8-96 kHz, 8-32 bit, 1-6 channels. (id, seconds, rate, channels, writer)
GOOD = [
    ("good/u8_8k_mono.wav", 1.5, 8000, 1, "PCM_U8"),
    ("good/s16_16k_stereo.flac", 1.5, 16000, 2, "PCM_16"),
    ("good/s24_96k_6ch.flac", 1.2, 96000, 6, "PCM_24"),
    ("good/s32_44k_stereo.wav", 1.5, 44100, 2, "PCM_32"),
    ("good/float_48k_mono.wav", 1.5, 48000, 1, "FLOAT"),
    ("good/lame_22k_stereo.mp3", 1.5, 22050, 2, None),
    ("good/vorbis_32k_mono.ogg", 1.5, 32000, 1, None),
    ("good/opus_48k_stereo.opus", 1.5, 48000, 2, "libopus"),
    ("good/opus_8k_mono.opus", 1.5, 8000, 1, "libopus"),
    ("good/aac_96k_mono.m4a", 1.5, 96000, 1, "aac"),
    ("good/aac_48k_6ch.m4a", 1.5, 48000, 6, "aac"),
    # Inside a directory that is itself named like audio (the directory is a hostile item, its content is not).
    ("bad/folder.wav/inner.flac", 1.5, 22050, 1, "PCM_16"),
]


def _write_good(path: Path, seconds: float, sr: int, channels: int, writer: str | None, seed: int) -> None:
    audio = d.synth(seconds, sr, channels, "music", seed=seed)
    if writer in ("libopus", "aac"):
        d.write_with_av(path, audio, sr, writer)
    else:
        d.write_audio(path, audio, sr, writer)


def _cut(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _tone(path: Path, seconds: float = 1.5, sr: int = 16000) -> Path:
    return d.write_audio(path, d.synth(seconds, sr, seed=7), sr)


def _noxing_mp3(path: Path, seconds: float, sr: int = 16000) -> Path:
    return d.write_with_av(path, d.synth(seconds, sr, seed=7), sr, "libmp3lame", options={"write_xing": "0"})


# id -> (writer, expected (stage, reason) or OK)
HOSTILE = {
    "bad/empty.wav": (d.write_empty, ("decode", "empty")),
    "bad/empty.m4a": (d.write_empty, ("decode", "empty")),
    "bad/header_only.wav": (d.write_header_only_wav, ("decode", "no_frames")),
    # A valid Ogg Vorbis stream that holds zero samples: it opens, and decodes to nothing.
    "bad/zero_frames.ogg": (lambda p: d.write_audio(p, np.zeros((1, 0), np.float32), 16000), ("decode", "no_frames")),
    "bad/video_only.mp4": (lambda p: d.write_video(p, None), ("decode", "no_frames")),
    "bad/truncated.wav": (lambda p: d.write_truncated_wav(p, 2.0), ("decode", "truncated")),
    "bad/truncated.aiff": (lambda p: _cut(d.write_audio(p, d.synth(2.0, 16000), 16000)), ("decode", "truncated")),
    "bad/truncated.flac": (lambda p: _cut(_tone(p)), ("decode", "undecodable")),
    "bad/truncated.m4a": (lambda p: _cut(d.write_with_av(p, d.synth(2.0, 16000), 16000)), ("decode", "undecodable")),
    # An MP3 with a Xing header (libsndfile's LAME writer adds one) states its bytes; one without states nothing.
    "bad/truncated.mp3": (lambda p: _cut(_tone(p, 3.0)), ("decode", "truncated")),
    "bad/truncated_noxing.mp3": (lambda p: _cut(_noxing_mp3(p, 3.0)), OK),
    "bad/nan.wav": (d.write_nan_wav, ("decode", "non_finite")),
    "bad/inf.wav": (lambda p: d.write_nan_wav(p, value=np.inf), ("decode", "non_finite")),
    "bad/random_bytes.mp3": (d.write_garbage, ("decode", "undecodable")),
    "bad/text.wav": (lambda p: p.write_text("this is not audio\n" * 100), ("decode", "undecodable")),
    "bad/folder.wav": (lambda p: p.mkdir(), ("decode", "not_a_file")),
    "bad/broken_link.wav": (lambda p: p.symlink_to(p.parent / "does_not_exist.wav"), ("decode", "not_a_file")),
    "bad/too_short.wav": (lambda p: _tone(p, 0.3), ("policy", "too_short")),
    # Digital silence is valid audio and must give rows.
    "good/silence.wav": (lambda p: d.write_audio(p, d.synth(1.5, 16000, kind="silence"), 16000), OK),
}
EXPECTED = {**{name: OK for name, *_ in GOOD}, **{name: want for name, (_, want) in HOSTILE.items()}}
# Segments padded to the next second rather than to the 10 s window: keeps the tiny codec fast.
FAST = ("segment.bucket_s=1",)


def make_hostile_corpus(root: Path) -> Path:
    for name, (write, _) in HOSTILE.items():  # first, so that bad/folder.wav exists before its content
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write(root / name)
    for seed, (name, seconds, sr, channels, writer) in enumerate(GOOD):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _write_good(root / name, seconds, sr, channels, writer, seed)
    return root


def ledger(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "failures").glob("*.jsonl")) for line in f.read_text().splitlines()]


def outcomes(out: Path) -> dict[str, tuple[str, str] | None]:
    """Every item's outcome as the output folder records it: rows (OK) or its failure record's (stage, reason)."""
    result: dict[str, tuple[str, str] | None] = {item: OK for item, _ in read_rows(out)}
    for record in ledger(out):
        assert record["item_id"] not in result, f"{record['item_id']} has rows and a failure record, or two records"
        result[record["item_id"]] = (record["stage"], record["reason"])
    return result


def assert_accounted(out: Path, expected: dict[str, tuple[str, str] | None]) -> dict:
    """Each input exactly once, with the expected outcome; stats.json totals agree with the ledger and the rows."""
    assert outcomes(out) == expected
    stats = json.loads((out / "stats.json").read_text())
    wanted = Counter("ok" if e is OK else "skipped" if e[0] == "policy" else "failed" for e in expected.values())
    assert (stats["ok"], stats["failed"], stats["skipped"]) == (wanted["ok"], wanted["failed"], wanted["skipped"])
    assert stats["ok"] + stats["failed"] + stats["skipped"] == stats["items"] == len(expected)
    assert stats["failures_by_reason"] == dict(Counter(f"{r['stage']}:{r['reason']}" for r in ledger(out)))
    assert stats["rows"] == len(read_rows(out))
    return stats


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    return make_hostile_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def tokenized(hostile, tmp_path_factory, tiny_codec_dir) -> Path:
    out = tmp_path_factory.mktemp("out")
    assert run(compose(base_overrides(hostile, out, tiny_codec_dir, *FAST))) == 0
    return out


def test_every_hostile_input_is_accounted_for(tokenized, hostile):
    assert len(FolderSource(str(hostile), DatasetConfig().extensions).list_items()) == len(EXPECTED)
    stats = assert_accounted(tokenized, EXPECTED)
    assert stats["failures_by_reason"]["decode:undecodable"] == 4
    rows = read_rows(tokenized)
    assert rows[("good/silence.wav", 0)]["codes"].size > 0
    # The cut MP3 without a Xing header is ok (nothing states its length) but shorter than the 3 s written.
    assert rows[("bad/truncated_noxing.mp3", 0)]["duration_s"] < 2.0
    assert "MP3 header declares" in {r["item_id"]: r for r in ledger(tokenized)}["bad/truncated.mp3"]["message"]
    assert rows[("good/s24_96k_6ch.flac", 0)]["source_channels"] == 6
    assert rows[("good/u8_8k_mono.wav", 0)]["source_sample_rate"] == 8000


def test_failure_records_name_the_file_and_the_problem(tokenized, hostile):
    by_id = {r["item_id"]: r for r in ledger(tokenized)}
    for item, record in by_id.items():
        assert record["source"] == str(hostile / item)
        assert record["error_type"] and record["message"], record
    assert "every backend failed" in by_id["bad/text.wav"]["message"]
    assert "soundfile" in by_id["bad/text.wav"]["message"] and "pyav" in by_id["bad/text.wav"]["message"]
    assert "directory" in by_id["bad/folder.wav"]["message"]
    assert "header declares" in by_id["bad/truncated.wav"]["message"]


def test_summary_shows_failure_totals(tokenized, hostile, tiny_codec_dir, capsys):
    """A rerun of the finished job does no work and prints the summary, failure totals included."""
    assert run(compose(base_overrides(hostile, tokenized, tiny_codec_dir, *FAST))) == 0
    printed = capsys.readouterr().out
    assert "failed by   decode:undecodable 4," in printed
    assert "skipped by  policy:too_short 1" in printed


# --- decoders that crash or hang ---------------------------------------------------------------------------------


def test_pool_survives_crash_and_hang(tmp_path, monkeypatch):
    """The pool on its own: crashed and hung workers are replaced, their running item fails, every other item
    (including those queued on the dead worker) comes back exactly once."""
    # Upper-case markers: the test's own tmp_path holds "crash" and "hang" in lower case.
    names = [f"item_{i:02d}{'.CRASH' if i in (1, 4) else '.HANG' if i == 6 else ''}.wav" for i in range(10)]
    for name in names:
        _tone(tmp_path / name, 0.2)
    monkeypatch.setenv(FAULT_ENV, "crash:.CRASH.,hang:.HANG.")
    source = FolderSource(str(tmp_path), ["wav"])
    spec = DecodeSpec(source, 32000, "mono", "HQ", SegmentPolicy.from_config(SegmentConfig(min_s=0.1), 32000))
    pool = DecodePool(spec, workers=2, timeout_s=3, depth=2)  # depth 2: a task waits behind each running one
    try:
        for item in source.list_items():
            pool.submit(DecodeTask(item, unit=0))
        results, start = [], time.monotonic()
        while pool.outstanding and time.monotonic() - start < 60:
            results += [r for r in pool.poll(0.1) if r.final]  # parts carry segments, finals the outcome
        elapsed = time.monotonic() - start
        assert len(mp.active_children()) == 2, "a crashed or hung worker is still around"
    finally:
        pool.close()
    got = {r.item.id: r.failure for r in results}
    assert len(results) == len(got) == len(names)
    assert {k: (f.stage, f.reason) for k, f in got.items() if f} == {
        "item_01.CRASH.wav": ("crash", "crash"), "item_04.CRASH.wav": ("crash", "crash"),
        "item_06.HANG.wav": ("timeout", "timeout")}
    assert "killed by SIGSEGV" in got["item_01.CRASH.wav"].message
    assert pool.replaced == 3
    # Decoded items report their CPU time in the worker (the run summary's "decode workers N% busy"), the pipe
    # reader its own; items that died with their worker report none.
    assert all(r.cpu_s > 0 for r in results if r.failure is None) and pool.receive_cpu_s > 0
    assert all(r.cpu_s == 0 for r in results if r.failure is not None)
    assert 3 <= elapsed < 30


def test_pool_spreads_tasks_and_dispatches_from_the_collector(tmp_path, monkeypatch):
    """Every worker gets a task before any gets a second, and a worker that finishes gets its next task at once,
    from the collector thread: the loop does not poll while batches wait for the codec."""
    (tmp_path / "hang").mkdir()
    (tmp_path / "quick").mkdir()
    for i in range(4):
        _tone(tmp_path / "hang" / f"item_{i}.HANG.wav", 0.2)
    for i in range(8):
        _tone(tmp_path / "quick" / f"item_{i}.wav", 0.2)
    monkeypatch.setenv(FAULT_ENV, "hang:.HANG.")
    policy = SegmentPolicy.from_config(SegmentConfig(min_s=0.1), 32000)

    source = FolderSource(str(tmp_path / "hang"), ["wav"])
    pool = DecodePool(DecodeSpec(source, 32000, "mono", "HQ", policy), workers=4, timeout_s=60, depth=2)
    try:
        for item in source.list_items():
            pool.submit(DecodeTask(item, unit=0))
        pool.poll(0)
        assert [len(w.assigned) for w in pool._workers] == [1, 1, 1, 1]
    finally:
        pool.close()

    source = FolderSource(str(tmp_path / "quick"), ["wav"])
    pool = DecodePool(DecodeSpec(source, 32000, "mono", "HQ", policy), workers=2, timeout_s=60, depth=2)
    try:
        for item in source.list_items():
            pool.submit(DecodeTask(item, unit=0))
        assert pool.poll(0) == []  # the loop's poll hands out 4 tasks; the collector must hand out the other 4
        start = time.monotonic()
        while pool._finals_queued < 8 and time.monotonic() - start < 20:
            time.sleep(0.05)
        assert pool._finals_queued == 8, "tasks waited for the loop's next poll"
        results, start = [], time.monotonic()
        while pool.outstanding and time.monotonic() - start < 10:
            results += [r for r in pool.poll(0.1) if r.final]
    finally:
        pool.close()
    assert sorted(r.item.id for r in results) == [f"item_{i}.wav" for i in range(8)]
    assert all(r.failure is None for r in results)


@pytest.fixture(scope="module")
def cli_run(hostile, tmp_path_factory, tiny_codec_dir) -> tuple[Path, str]:
    """Through the CLI as users run it, on the hostile corpus plus two good files whose decoder crashes / hangs."""
    corpus = tmp_path_factory.mktemp("cli") / "data"
    shutil.copytree(hostile, corpus, symlinks=True)  # the link stays broken
    for name in ("good/CRASH_ME.wav", "good/HANG_ME.wav"):
        _tone(corpus / name)
    out = corpus.parent / "out"
    env = {**os.environ, FAULT_ENV: "crash:CRASH_ME,hang:HANG_ME", "PYTHONUNBUFFERED": "1"}
    args = [*base_overrides(corpus, out, tiny_codec_dir, *FAST, "decode.timeout_s=4")]
    proc = subprocess.run([sys.executable, "-m", "pipeline.tokenize", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_cli_crash_and_hang_cost_one_item_each(cli_run, tokenized):
    out, printed = cli_run
    expected = {**EXPECTED, "good/CRASH_ME.wav": ("crash", "crash"), "good/HANG_ME.wav": ("timeout", "timeout")}
    assert_accounted(out, expected)
    # Their neighbours in the same unit are fine (unit_size=3), and every row equals the in-process run's: other
    # units, other batch-mates, a replaced worker; same codes.
    rows, reference = read_rows(out), read_rows(tokenized)
    assert rows.keys() == reference.keys()
    for key, row in reference.items():
        np.testing.assert_array_equal(rows[key]["codes"], row["codes"], err_msg=str(key))
    assert "crash:crash 1" in printed and "timeout:timeout 1" in printed


# --- output.retry_failed -----------------------------------------------------------------------------------------


def _retry_corpus(root: Path) -> Path:
    """Units of 3: [a, b, c] with b garbage; [d, e, f] with d too short (policy); [g] empty."""
    root.mkdir()
    for i, name in enumerate("acef"):
        d.write_audio(root / f"{name}.wav", d.synth(1.5, 16000, seed=i), 16000)
    d.write_garbage(root / "b.wav")
    _tone(root / "d.wav", 0.3)
    d.write_empty(root / "g.wav")
    return root


def test_retry_failed_redoes_only_failed_items(tmp_path, tiny_codec_dir, monkeypatch):
    data, out = _retry_corpus(tmp_path / "data"), tmp_path / "out"
    overrides = base_overrides(data, out, tiny_codec_dir, *FAST)
    assert run(compose(overrides)) == 0
    before, shards = read_rows(out), {p.name: p.stat() for p in (out / "data").iterdir()}
    assert outcomes(out)["b.wav"] == ("decode", "undecodable")

    d.write_audio(data / "b.wav", d.synth(1.5, 16000, seed=11), 16000)  # the file is fixed
    # An item decoded again would crash: proves the kept items (ok, and skipped by policy) are not redone.
    monkeypatch.setenv(FAULT_ENV, "crash:a.wav,crash:c.wav,crash:d.wav,crash:e.wav,crash:f.wav")
    assert run(compose([*overrides, "output.retry_failed=true"])) == 0
    monkeypatch.delenv(FAULT_ENV)

    expected = {"a.wav": OK, "b.wav": OK, "c.wav": OK, "d.wav": ("policy", "too_short"), "e.wav": OK, "f.wav": OK,
                "g.wav": ("decode", "empty")}
    stats = assert_accounted(out, expected)
    assert stats["failures_by_reason"] == {"decode:empty": 1, "policy:too_short": 1}
    after = read_rows(out)
    for key, row in before.items():  # kept rows: the same values, codes included
        assert {k: v for k, v in after[key].items() if k != "codes"} == {k: v for k, v in row.items() if k != "codes"}
        np.testing.assert_array_equal(after[key]["codes"], row["codes"])
    unit1 = next(n for n in shards if n.startswith("train-00001"))
    assert (out / "data" / unit1).stat().st_mtime_ns == shards[unit1].st_mtime_ns, "a policy-only unit was redone"
    assert not (out / ".state/retry").exists() or not list((out / ".state/retry").iterdir())

    # The oracle: the retried folder holds what a clean run over the fixed files gives.
    fresh = tmp_path / "fresh"
    assert run(compose(base_overrides(data, fresh, tiny_codec_dir, *FAST))) == 0
    clean = read_rows(fresh)
    assert after.keys() == clean.keys()
    for key, row in clean.items():
        np.testing.assert_array_equal(after[key]["codes"], row["codes"], err_msg=str(key))
    fresh_stats = json.loads((fresh / "stats.json").read_text())
    for key in ("items", "ok", "failed", "skipped", "rows", "frames", "failures_by_reason"):
        assert stats[key] == fresh_stats[key], key
    for key in ("audio_s", "encoded_s", "dropped_s"):
        assert stats[key] == pytest.approx(fresh_stats[key]), key


def test_retry_interrupted_after_shard_rename_finishes_on_rerun(tmp_path, tiny_codec_dir, monkeypatch):
    """A retry that dies between the merged shard and its marker is finished by the next run, from the stash,
    even without ``retry_failed`` (the shard it replaced is gone from data/ by then)."""
    import pipeline.writer

    data, out = _retry_corpus(tmp_path / "data"), tmp_path / "out"
    overrides = base_overrides(data, out, tiny_codec_dir, *FAST)
    assert run(compose(overrides)) == 0
    before = read_rows(out)
    d.write_audio(data / "b.wav", d.synth(1.5, 16000, seed=11), 16000)

    class Crash(BaseException):  # like a kill: no ``except Exception`` on the way up catches it
        pass

    def die(name: str) -> None:
        if name == "after_rename":
            raise Crash(name)

    monkeypatch.setattr(pipeline.writer, "fault_point", die)
    with pytest.raises(Crash):
        run(compose([*overrides, "output.retry_failed=true"]))
    monkeypatch.undo()
    assert list((out / ".state/retry").glob("unit-*/retry.json")), "the stash must survive the crash"

    assert run(compose(overrides)) == 0
    after = read_rows(out)
    assert outcomes(out)["b.wav"] is OK and set(before) < set(after)
    for key, row in before.items():
        np.testing.assert_array_equal(after[key]["codes"], row["codes"])
    assert not list((out / ".state/retry").glob("unit-*"))


def test_worker_messages_round_trip_and_fail_cleanly_when_cut():
    """The worker->parent framing: arrays (contiguous, strided, empty) come back equal and writable; a writer that
    dies mid-message reads as EOF (the pool then fails the item it was running), never as a wrong message."""
    import pickle
    import socket
    import struct
    import threading

    from pipeline.workers import recv_message, send_message

    a, b = socket.socketpair()
    audio = np.arange(2 * 48_000, dtype=np.float32).reshape(2, -1)
    msg = ("part", 7, {"c": audio, "strided": audio[:, ::3], "empty": np.zeros((1, 0), np.float32), "n": 3})
    try:
        writer = threading.Thread(target=send_message, args=(a.fileno(), msg))  # > a socket buffer: write blocks
        writer.start()
        kind, seq, payload = recv_message(b.fileno())
        writer.join()
        assert (kind, seq, payload["n"]) == ("part", 7, 3)
        for key in ("c", "strided", "empty"):
            assert np.array_equal(payload[key], msg[2][key]) and payload[key].dtype == np.float32
        payload["c"][0, 0] = -1.0  # the parent may use the arrays as its own
        # A message cut short: its frame, pickle and the first 100 bytes of its audio, then the writer is gone.
        buffers: list = []
        head = pickle.dumps(("part", 8, audio[:, :1000].copy()), protocol=5, buffer_callback=buffers.append)
        raw = buffers[0].raw()
        a.sendall(struct.pack("<II", len(head), 1) + struct.pack("<Q", raw.nbytes) + head + bytes(raw[:100]))
        a.close()
        with pytest.raises(EOFError):
            recv_message(b.fileno())
    finally:
        a.close()
        b.close()
