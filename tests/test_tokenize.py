"""End to end on real files: rows, schema, frame counts, accounting, metadata, load_dataset, token identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import EncodecModel

from helpers import base_overrides, compose, frames_for, make_corpus, read_rows
from pipeline.audio import decode_audio
from pipeline.batching import BatchPolicy
from pipeline.config import resolve_auto
from pipeline.segment import SegmentPolicy
from pipeline.tokenize import run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root)
    return root


@pytest.fixture(scope="module")
def tokenized(corpus, tmp_path_factory, tiny_codec_dir):
    out = tmp_path_factory.mktemp("out")
    cfg = compose(base_overrides(corpus, out, tiny_codec_dir))
    assert run(cfg) == 0
    return cfg, out


def test_every_item_accounted_for(tokenized, corpus):
    cfg, out = tokenized
    stats = json.loads((out / "stats.json").read_text())
    n_inputs = len([p for p in corpus.rglob("*") if p.suffix in (".wav", ".flac", ".ogg", ".mp3")])
    assert stats["items"] == n_inputs == 8
    assert stats["ok"] + stats["failed"] + stats["skipped"] == n_inputs
    assert (stats["ok"], stats["failed"], stats["skipped"]) == (7, 0, 1)
    assert stats["failures_by_reason"] == {"policy:too_short": 1}
    ledger = [json.loads(line) for f in (out / "failures").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert [(r["item_id"], r["reason"]) for r in ledger] == [("d/tiny.wav", "too_short")]
    rows = read_rows(out)
    assert stats["rows"] == len(rows)
    assert {item for item, _ in rows} == {"a/long_song.flac", "a/short.wav", "b/float.wav", "b/eight_bit.wav",
                                          "c/vorbis.ogg", "c/lame.mp3", "d/six_channels.wav"}


def test_rows_frames_and_dropped_tails(tokenized, corpus):
    cfg, out = tokenized
    rows = read_rows(out)
    # 23.5 s at 10 s windows: 10 + 10 + 3.5 s; 12.3 s: 10 + 2.3 s; 4.2 s: one short window.
    assert sorted(s for i, s in rows if i == "a/long_song.flac") == [0, 1, 2]
    assert sorted(s for i, s in rows if i == "c/vorbis.ogg") == [0, 1]
    for (item, seg), row in rows.items():
        assert row["n_frames"] == frames_for(row["n_samples"]) == row["codes"].shape[1]
        assert row["codes"].shape[0] == 4
        assert row["start_s"] == pytest.approx(10.0 * seg)
        assert row["duration_s"] == pytest.approx(row["n_samples"] / 32000)
        assert row["sample_rate"] == 32000
    long = rows[("a/long_song.flac", 2)]
    assert long["n_samples"] == round(23.5 * 32000) - 2 * 320000
    assert (long["source_sample_rate"], long["source_channels"]) == (44100, 2)
    assert rows[("d/six_channels.wav", 0)]["source_channels"] == 6
    # Only the skipped 0.3 s item is dropped at min_s = 1.
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped_s"] == pytest.approx(0.3, abs=1e-3)


def test_short_tails_dropped_and_counted(corpus, tmp_path, tiny_codec_dir):
    out = tmp_path / "out"
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir, "segment.min_s=3", "dataset.limit=6"))) == 0
    rows = read_rows(out)
    stats = json.loads((out / "stats.json").read_text())
    # long_song keeps its 3.5 s tail; vorbis loses its 2.3 s tail; b/eight_bit (3.0 s) stays whole.
    assert sorted(s for i, s in rows if i == "a/long_song.flac") == [0, 1, 2]
    assert sorted(s for i, s in rows if i == "c/vorbis.ogg") == [0]
    assert stats["dropped_s"] == pytest.approx(2.3, abs=1e-3)
    assert stats["ok"] + stats["failed"] + stats["skipped"] == stats["items"] == 6


def test_codes_are_spread(tokenized):
    _, out = tokenized
    codes = np.concatenate([r["codes"] for r in read_rows(out).values()], axis=1)
    for k in range(4):
        assert len(np.unique(codes[k])) > 100, f"codebook {k} uses only {len(np.unique(codes[k]))} codes"
    assert codes.min() >= 0 and codes.max() < 2048


def test_sidecar_metadata_round_trip(tokenized):
    _, out = tokenized
    row = read_rows(out)[("a/long_song.flac", 0)]
    assert (row["title"], row["artist"], row["genre"], row["bpm"]) == ("Long song", "Tester", "rock", 128.0)
    assert row["moods"] == ["happy", "loud"] and row["keywords"] == ["guitar", "drums"]
    assert json.loads(row["metadata"]) == {"label": "none", "year": 2024}
    assert read_rows(out)[("a/short.wav", 0)]["title"] is None


def test_load_dataset_reads_output(tokenized):
    from datasets import load_dataset

    _, out = tokenized
    ds = load_dataset(str(out), split="train")
    rows = read_rows(out)
    assert len(ds) == len(rows)
    first = ds[0]
    np.testing.assert_array_equal(np.asarray(first["codes"]), rows[(first["id"], first["segment_index"])]["codes"])
    card = (out / "README.md").read_text()
    assert "configs:" in card and "data/*.parquet" in card
    # How rows were cut, and a size that says something for a small output (not "0.02 h").
    assert "Rows are 10 s windows every 10 s, zero-padded to 10 s before encoding" in card
    assert "segments under 1 s are dropped. Audio in no row: 0.3 s." in card
    assert " s of audio" in card and " h of audio" not in card  # under a minute of audio here


def test_fingerprint_in_every_shard(tokenized):
    import pyarrow.parquet as pq

    _, out = tokenized
    plan = json.loads((out / ".state/plan.json").read_text())
    for shard in (out / "data").glob("*.parquet"):
        meta = pq.read_schema(shard).metadata
        assert meta[b"pipeline.fingerprint"].decode() == plan["fingerprint"]
        detail = json.loads(meta[b"pipeline.fingerprint_detail"])
        assert detail["batch"]["max_audio_s"] == 40 and detail["codec"]["dtype"] == "float32"


def _reference_codes(model, audio, policy, batch_rows, position, seed):
    """EncodecModel.encode of one segment zero-padded to its padded length, in a batch of the pipeline's shape,
    at ``position`` among random other rows."""
    padded = policy.padded_len(audio.shape[-1])
    rng = np.random.default_rng(seed)
    batch = rng.uniform(-0.5, 0.5, (batch_rows, 1, padded)).astype(np.float32)
    batch[position] = 0.0
    batch[position, 0, : audio.shape[-1]] = audio[0]
    with torch.inference_mode():
        codes = model.encode(torch.from_numpy(batch)).audio_codes[0, position]
    return codes[:, : frames_for(audio.shape[-1])].numpy()


def test_token_identity_with_encodec_encode(tokenized, corpus, tiny_codec_dir):
    """Every row equals EncodecModel.encode of its segment padded as README "Tokens" defines, in a batch of the
    pipeline's shape, whichever rows share its batch and wherever it sits in it."""
    cfg, out = tokenized
    model = EncodecModel.from_pretrained(tiny_codec_dir).eval()
    policy = SegmentPolicy.from_config(cfg.segment, 32000)
    batch_policy = BatchPolicy.from_config(cfg.batch, 32000, 1)
    torch.set_num_threads(resolve_auto(cfg, "cpu").codec.threads)
    for i, ((item, seg), row) in enumerate(sorted(read_rows(out).items())):
        audio = decode_audio(str(corpus / item), target_sr=32000)
        start = round(row["start_s"] * 32000)
        segment = audio.samples[:, start : start + row["n_samples"]]
        rows = batch_policy.rows_for(policy.padded_len(segment.shape[-1]))
        expected = _reference_codes(model, segment, policy, rows, position=i % rows, seed=i)
        np.testing.assert_array_equal(row["codes"], expected, err_msg=f"{item} segment {seg}")


def test_same_codes_whatever_the_order_and_batch_mates(tokenized, corpus, tmp_path, tiny_codec_dir):
    """A different item set (so other batch-mates and other units) and other unit sizes: same rows."""
    cfg, out = tokenized
    subset = tmp_path / "subset"
    for name in ("a/long_song.flac", "c/vorbis.ogg", "d/six_channels.wav"):
        (subset / name).parent.mkdir(parents=True, exist_ok=True)
        (subset / name).write_bytes((corpus / name).read_bytes())
    out2 = tmp_path / "out2"
    assert run(compose(base_overrides(subset, out2, tiny_codec_dir, "output.unit_size=1", "decode.workers=1"))) == 0
    full, part = read_rows(out), read_rows(out2)
    assert set(part) <= set(full) and len(part) == 6
    for key, row in part.items():
        np.testing.assert_array_equal(row["codes"], full[key]["codes"], err_msg=str(key))


def test_batches_in_flight_from_the_launcher_thread(corpus, tmp_path, tiny_codec_dir, monkeypatch):
    """The CUDA path of the loop (batches queued from the launcher thread, up to two in flight, collected when
    done), forced on CPU: the same rows as the synchronous loop (one-row batches: ten of them), every item
    accounted for."""
    import functools

    import pipeline.runner
    from pipeline.encode import Launcher

    in_flight = []
    encode = pipeline.runner.Runner._encode

    def counting_encode(self, batch):
        encode(self, batch)
        in_flight.append(len(self.launched))

    monkeypatch.setattr(pipeline.runner.Runner, "_encode", counting_encode)
    outs = {}
    for threaded in (False, True):
        monkeypatch.setattr(pipeline.runner, "Launcher", functools.partial(Launcher, threaded=threaded))
        outs[threaded] = tmp_path / str(threaded)
        assert run(compose(base_overrides(corpus, outs[threaded], tiny_codec_dir, "batch.max_audio_s=10"))) == 0
        if not threaded:
            assert max(in_flight) == 0  # synchronous: collected at once
            in_flight.clear()
    assert max(in_flight) == 2  # threaded: a second batch queued behind a running one
    plain, threaded = read_rows(outs[False]), read_rows(outs[True])
    assert set(threaded) == set(plain) and len(plain) >= 10
    for key, row in threaded.items():
        np.testing.assert_array_equal(row["codes"], plain[key]["codes"], err_msg=str(key))
    assert len(np.unique(np.concatenate([r["codes"].ravel() for r in threaded.values()]))) > 500
    stats = json.loads((outs[True] / "stats.json").read_text())
    assert stats["items"] == stats["ok"] + stats["failed"] + stats["skipped"] and stats["rows"] == len(plain)


def test_rerun_of_finished_job_does_no_work(tokenized, capsys):
    cfg, out = tokenized
    before = {p: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}
    assert run(cfg) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")} == before


def _reopen_last_unit(out):
    """Delete the last unit's shard and done marker (as a crash before its commit would leave it); its old rows."""
    import pyarrow.parquet as pq

    shard = sorted((out / "data").glob("*.parquet"))[-1]
    data = pq.read_table(shard)
    shard.unlink()
    sorted((out / ".state" / "done").glob("unit-*.json"))[-1].unlink()
    return data


def test_the_weights_not_their_path_identify_the_job(corpus, tmp_path, tiny_codec_dir):
    """The fingerprint holds the codec weights' hash, not where they were loaded from: resuming with the same
    weights copied elsewhere finishes the job (the same rows), while other weights at the same path are refused."""
    import shutil

    import pyarrow.parquet as pq

    from safetensors.torch import load_file, save_file

    weights = tmp_path / "codec"
    shutil.copytree(tiny_codec_dir, weights)
    corpus = shutil.copytree(corpus, tmp_path / "in")
    (corpus / "e_broken.wav").write_bytes(b"RIFF" + b"\0" * 60)  # a failed item, for retry_failed below
    out = tmp_path / "out"
    assert run(compose(base_overrides(corpus, out, weights))) == 0
    plan = json.loads((out / ".state" / "plan.json").read_text())
    assert plan["fingerprint_detail"]["codec"]["weights_sha256"]

    original = _reopen_last_unit(out)
    moved = tmp_path / "moved"
    shutil.copytree(weights, moved)
    assert run(compose(base_overrides(corpus, out, moved))) == 0
    assert pq.read_table(sorted((out / "data").glob("*.parquet"))[-1]).equals(original)  # the shard's
    # metadata names the weights' new path (pipeline.codec_model), its rows are the same

    _reopen_last_unit(out)
    tensors = load_file(weights / "model.safetensors")
    name = next(k for k in tensors if k.startswith("encoder.") and k.endswith("original1"))  # a conv weight
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights / "model.safetensors", metadata={"format": "pt"})
    from pipeline.plan import PlanMismatch

    with pytest.raises(PlanMismatch, match="codec.weights_sha256"):
        run(compose(base_overrides(corpus, out, weights)))
    n_units = -(-plan["n_items"] // plan["unit_size"])
    assert len(list((out / "data").glob("*.parquet"))) == n_units - 1  # nothing written
    # A finished folder checks the weights too (tests/test_refusals.py: without loading them when it can), and
    # so does a retry_failed that reopens units.
    assert run(compose(base_overrides(corpus, out, moved))) == 0
    with pytest.raises(PlanMismatch, match="codec.weights_sha256"):
        run(compose(base_overrides(corpus, out, weights)))
    with pytest.raises(PlanMismatch, match="codec.weights_sha256"):
        run(compose(base_overrides(corpus, out, weights, "output.retry_failed=true")))


def test_metadata_that_is_not_a_number_is_kept_as_given():
    """A ``bpm`` that is not a number ("fast") leaves the typed column empty and stays, as given, in ``metadata``:
    nothing an input carries is lost without a trace."""
    from pipeline.types import AudioItem, EncodedSegment
    from pipeline.writer import _row

    def row(meta):
        item = AudioItem(index=0, id="x.wav", source="x.wav", metadata=meta)
        return _row(EncodedSegment(item=item, unit=0, segment_index=0, start_s=0.0, n_samples=640, sample_rate=32000,
                                   source_sample_rate=32000, source_channels=1, codes=np.zeros((4, 1), np.int16),
                                   scales=None))

    fast = row({"bpm": "fast", "genre": "rock"})
    assert fast["bpm"] is None and fast["genre"] == "rock" and json.loads(fast["metadata"]) == {"bpm": "fast"}
    typed = row({"bpm": "120", "genre": "rock"})
    assert typed["bpm"] == 120.0 and typed["metadata"] is None


def test_overwrite_removes_the_old_job_and_its_verify_report(corpus, tmp_path, tiny_codec_dir):
    """``output.mode=overwrite`` deletes the old job's files, its verify report included (it would describe the old
    job), and keeps what is not the pipeline's at the top of the folder."""
    out = tmp_path / "out"
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir))) == 0
    (out / "verify").mkdir()
    (out / "verify" / "report.md").write_text("PASS (old job)")
    (out / "NOTES.txt").write_text("mine")
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir, "output.mode=overwrite",
                                      "segment.length_s=5"))) == 0
    assert not (out / "verify").exists() and (out / "NOTES.txt").read_text() == "mine"
    assert json.loads((out / ".state" / "plan.json").read_text())["fingerprint_detail"]["segment"]["length_s"] == 5


def test_a_refused_launch_leaves_the_planned_item_list(corpus, tmp_path, tiny_codec_dir):
    """Two launches on one empty folder at once, with other inputs: the loser is refused after writing its list, and
    must not replace the winner's, which the other ranks encode from. A list that does not match the plan's hash
    (changed by hand) stops those ranks instead of encoding other audio."""
    import shutil

    from pipeline.layout import OutputLayout
    from pipeline.plan import PlanMismatch, build_plan, load_items, load_plan, save_plan
    from pipeline.prepare import output_layout
    from pipeline.sources import build_source

    other = shutil.copytree(corpus, tmp_path / "other")
    next(other.rglob("*.wav")).unlink()
    out = tmp_path / "out"
    cfg = compose(base_overrides(corpus, out, tiny_codec_dir))
    assert run(cfg) == 0
    layout: OutputLayout = output_layout(cfg)
    planned = load_plan(layout)
    loser_cfg = compose(base_overrides(other, out, tiny_codec_dir))
    loser_items = build_source(loser_cfg.dataset).list_items()
    loser = build_plan(loser_items, loser_cfg, planned.fingerprint_detail, {"kind": "other"})
    assert save_plan(layout, loser, loser_items) is False  # refused: the folder has a plan

    assert [it.id for it in load_items(layout, planned)] == [it.id for it in build_source(cfg.dataset).list_items()]
    listed = layout.items_of(planned.items_hash)
    listed_path = out / listed.relative_to(layout.root)
    listed_path.write_text("".join(listed_path.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(PlanMismatch, match="lists"):
        load_items(layout, planned)


def test_a_lost_shard_is_encoded_again(corpus, tmp_path, tiny_codec_dir):
    """A unit marked done whose shard is gone (deleted by hand, a bucket's lifecycle rule, an older overwrite cut
    between its deletes) made every rerun fail in finalize; the rerun now encodes it again, the same rows."""
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir))) == 0
    shard = sorted((out / "data").glob("*.parquet"))[0]
    before = pq.read_table(shard)
    shard.unlink()
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir))) == 0
    assert pq.read_table(shard).equals(before)
    assert json.loads((out / "stats.json").read_text())["rows"] == len(read_rows(out))


def test_row_settings_are_part_of_the_job(corpus, tmp_path, tiny_codec_dir):
    """``dataset.rename``, ``dataset.sidecar_json`` and ``dataset.metadata_columns`` shape the rows: a resume with
    other values would mix two column layouts in one dataset, so it is refused like any other job. At their defaults
    they leave the fingerprint as it was before they were in it."""
    from pipeline.plan import PlanMismatch, fingerprint_detail

    assert "rows" not in fingerprint_detail(compose(base_overrides(corpus, tmp_path / "x", tiny_codec_dir)), "cpu")
    out = tmp_path / "out"
    renamed = base_overrides(corpus, out, tiny_codec_dir, "dataset.rename={title: description}")
    assert run(compose(renamed)) == 0
    _reopen_last_unit(out)
    with pytest.raises(PlanMismatch, match="rows.rename"):
        run(compose(base_overrides(corpus, out, tiny_codec_dir)))
    with pytest.raises(PlanMismatch, match="rows.sidecar_json"):
        run(compose([*renamed, "dataset.sidecar_json=false"]))
    assert run(compose(renamed)) == 0


def test_finalize_waits_for_a_live_finalizer_and_takes_over_a_dead_ones(corpus, tmp_path, tiny_codec_dir):
    """Every run that exits 0 leaves a finalized folder: a run that finds the finalize claim taken returns once the
    claim says done, and finalizes itself when the claim's owner is dead (a finalizer killed mid-way used to leave
    the other runs exiting 0 with no stats.json or card); an empty claim of an older version goes stale too."""
    import os
    import socket

    from pipeline.plan import load_items, load_plan
    from pipeline.prepare import Job, output_layout
    from pipeline.sources import build_source

    out = tmp_path / "out"
    cfg = compose(base_overrides(corpus, out, tiny_codec_dir, "claim_lease_s=5"))
    assert run(cfg) == 0
    layout = output_layout(cfg)
    plan = load_plan(layout)
    job = Job(cfg, layout, plan, load_items(layout, plan), build_source(cfg.dataset))
    claim = out / ".state" / "finalize.claim"
    assert json.loads(claim.read_text()) == {"done": True}
    assert job.finalize_if_done() is None  # done by the run above: nothing to do

    for leftover in ("dead", "empty"):
        (out / "stats.json").unlink()
        (out / "README.md").unlink()
        if leftover == "dead":  # this host, this pid, another start time: a finalizer that is gone
            claim.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0.0,
                                         "token": "t"}))
        else:
            claim.write_bytes(b"")
            os.utime(claim, (0, 0))  # older than the lease
        stats = job.finalize_if_done()
        assert stats is not None and (out / "stats.json").exists() and (out / "README.md").exists(), leftover
        assert json.loads(claim.read_text()) == {"done": True}

    # A live finalizer (this very process): a run waiting for it stops on a signal, without finalizing.
    from pipeline.claims import Owner

    (out / "stats.json").unlink()
    claim.write_text(json.dumps(Owner.me().__dict__))
    assert job.finalize_if_done(stopping=lambda: True) is None and not (out / "stats.json").exists()


def test_lost_shards_with_retry_failed_and_shards_without_a_plan(corpus, tmp_path, tiny_codec_dir):
    """A missing shard is redone under ``retry_failed`` too (it crashed stashing the shard); shards with no plan
    (the state, card and stats deleted by hand) are refused rather than mixed with a new job's."""
    import shutil

    out = tmp_path / "out"
    args = base_overrides(corpus, out, tiny_codec_dir)
    assert run(compose(args)) == 0
    sorted((out / "data").glob("*.parquet"))[0].unlink()
    assert run(compose([*args, "output.retry_failed=true"])) == 0
    assert json.loads((out / "stats.json").read_text())["rows"] == len(read_rows(out))

    for path in (out / ".state", out / "README.md", out / "stats.json"):  # shards and failure logs are left
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(ValueError, match="no plan"):
        run(compose([*args, "output.unit_size=2"]))
    assert run(compose([*args, "output.unit_size=2", "output.mode=overwrite"])) == 0


def test_a_finalizer_keeps_its_claim_fresh(tmp_path):
    """The finalize claim is kept fresh while its owner works (a slow finalize of 10k units on S3 outlasts the
    lease: the other runs took it over and finalized too)."""
    import time

    from pipeline.claims import heartbeat
    from pipeline.stores.local import LocalStore

    store, claim = LocalStore(), tmp_path / "finalize.claim"
    assert store.create_exclusive(claim, b"me")
    with heartbeat(store, claim, b"me", lease_s=1.0):
        time.sleep(2.5)
        assert store.read_lease(claim).age_s < 1.0
