"""``output.dir=s3://...``: the output folder on object storage, against moto's S3 server on loopback (offline).

Proved here with real processes and a real (if local) S3 endpoint: the server refuses a second creator and a
stale compare-and-swap; a claim of a live owner stays, a stale one is taken by exactly one taker; the output
equals the same job written locally; two ranks split the units and no marker, shard or stats file is written
twice (the bucket is versioned, so every write is counted); a run killed around a shard's upload resumes to the
same output; resume, overwrite and retry_failed work there; ``pipeline.verify`` and ``TokenDataset`` read it back.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import REPO, compose, free_port, moto_environment, read_rows
from pipeline.claims import Claims, Owner
from pipeline.layout import OutputLayout
from pipeline.testing.dummies import synth, write_audio
from pipeline.tokenize import run

s3fs = pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")

N_CLIPS = 9


@dataclass
class S3:
    endpoint: str
    client: Any  # boto3, to look at object versions
    fs: Any  # s3fs, to read what the pipeline wrote
    server: Any  # SerialMotoServer

    @property
    def options(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint}}


def _serial_server_class():
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class SerialMotoServer(ThreadedMotoServer):
        """moto's server answering one request at a time. S3 applies a conditional write atomically; moto checks
        the condition and then writes, so two racing requests could both pass. Serialising gives S3's guarantee.
        ``ignore_conditions`` plays a server that ignores If-None-Match / If-Match (some S3-compatible ones do)."""

        ignore_conditions = False

        def _server_entry(self) -> None:
            app, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()

            def serial(environ, start_response):
                if self.ignore_conditions:
                    environ.pop("HTTP_IF_NONE_MATCH", None)
                    environ.pop("HTTP_IF_MATCH", None)
                with lock:
                    return list(app(environ, start_response))

            self._server = make_server(self._ip_address, self._port, serial, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    return SerialMotoServer


@pytest.fixture(scope="module")
def s3():
    """Buckets ``tok`` and ``ver`` (versioned: every write of a key stays countable) on a loopback server."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    with moto_environment():  # the runs this module starts inherit it
        port = free_port()
        server = _serial_server_class()(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="tok")
        client.create_bucket(Bucket="ver")
        client.put_bucket_versioning(Bucket="ver", VersioningConfiguration={"Status": "Enabled"})
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, use_listings_cache=False,
                               skip_instance_cache=True)
        yield S3(endpoint, client, fs, server)
        server.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Nine short clips and a file that fails to decode (``broken.wav``, sorted first: unit 0)."""
    root = tmp_path_factory.mktemp("remote_corpus")
    rng = np.random.default_rng(0)
    for i in range(N_CLIPS):
        write_audio(root / f"clip_{i:02d}.wav", synth(float(rng.uniform(1.5, 4.0)), 16000, 1, "music", seed=i), 16000)
    (root / "broken.wav").write_bytes(b"RIFF but not a wave file")
    return root


def args(corpus: Path, out: str | Path, codec: Path, s3: S3, scratch: Path, *extra: str) -> list[str]:
    return ["dataset=folder", f"dataset.path={corpus}", f"output.dir={out}", f"codec.pretrained={codec}",
            "segment.length_s=4", "segment.min_s=0.5", "batch.max_audio_s=16", "output.unit_size=2",
            "decode.workers=1", "progress=false", "claim_lease_s=5",
            f"output.storage_options={{client_kwargs: {{endpoint_url: '{s3.endpoint}'}}}}",
            f"output.scratch_dir={scratch}", *extra]


@pytest.fixture(scope="module")
def reference(corpus, s3, tmp_path_factory, tiny_codec_dir) -> Path:
    """The same job into a local folder."""
    out = tmp_path_factory.mktemp("remote_ref") / "out"
    assert run(compose(args(corpus, out, tiny_codec_dir, s3, out.parent / "scratch"))) == 0
    return out


@pytest.fixture(scope="module")
def s3_output(corpus, s3, tmp_path_factory, tiny_codec_dir) -> tuple[str, Path]:
    """The job into ``s3://tok/base``, in this process; returns the root and the scratch folder."""
    scratch = tmp_path_factory.mktemp("remote_scratch")
    assert run(compose(args(corpus, "s3://tok/base", tiny_codec_dir, s3, scratch))) == 0
    return "tok/base", scratch


# ------------------------------------------------------------------------------------------------ primitives


def test_server_enforces_conditional_writes_and_takeover_is_race_free(s3, tmp_path):
    """What claims rest on, on the server itself: one creator, one taker of a stale claim, and an owner that lost
    its claim can neither heartbeat nor release the new owner's."""
    from pipeline.stores.s3 import S3Store

    a, b, c = (S3Store.connect("s3://tok", s3.options) for _ in range(3))  # three processes' views
    path = PurePosixPath("tok/leases/unit-00000")
    assert a.create_exclusive(path, b"a")
    assert not b.create_exclusive(path, b"b"), "a second creator must be refused (If-None-Match)"
    seen = b.read_lease(path)
    assert seen.data == b"a" and seen.version and seen.age_s < 5
    assert a.refresh_lease(path, b"a, later")
    assert not b.take_over(path, b"b", seen), "a takeover of a claim heartbeated since it was read must fail"
    seen = b.read_lease(path)
    assert b.take_over(path, b"b", seen)
    assert not c.take_over(path, b"c", seen), "of two takers of one stale claim only one may win (If-Match)"
    assert not a.refresh_lease(path, b"a again"), "the old owner's heartbeat must not overwrite the new claim"
    a.release_lease(path)
    assert b.read_lease(path).data == b"b", "the old owner's release must not delete the new claim"
    b.release_lease(path)
    assert b.read_lease(path) is None
    a.check_writable(PurePosixPath("tok/probe"))
    s3.server.ignore_conditions = True
    try:
        with pytest.raises(ValueError, match="does not enforce conditional writes"):
            a.check_writable(PurePosixPath("tok/probe"))
    finally:
        s3.server.ignore_conditions = False


def test_local_takeover_of_one_stale_claim_has_one_winner(tmp_path):
    """The local store's takeover, as the server's: of two contenders that judged the same claim stale, only the
    first wins; the second neither moves the winner's claim away nor claims the unit too; and an owner that lost
    its claim can neither heartbeat nor release the new owner's."""
    from pipeline.stores.local import LocalStore

    store, path = LocalStore(), tmp_path / "unit-00000"
    assert store.create_exclusive(path, b"dead owner")
    seen_by_b, seen_by_c = store.read_lease(path), store.read_lease(path)
    assert store.take_over(path, b"b", seen_by_b)
    assert not store.take_over(path, b"c", seen_by_c), "a second taker of one stale claim must lose"
    assert path.read_bytes() == b"b" and [p.name for p in tmp_path.iterdir()] == ["unit-00000"]
    # The old owner (another process: its own store) lost the claim: its heartbeat fails, its release keeps b's.
    old = LocalStore()
    old_path = tmp_path / "unit-00001"
    assert old.create_exclusive(old_path, b"old owner")
    assert LocalStore().take_over(old_path, b"new owner", old.read_lease(old_path))
    assert not old.refresh_lease(old_path, b"old owner, later")
    old.release_lease(old_path)
    assert old_path.read_bytes() == b"new owner"


def test_a_local_claim_is_created_whole_or_not_at_all(tmp_path):
    """The claim's record is written before its name exists (linked from a temp file): a kill between an exclusive
    create and its write used to leave an empty claim, read as a live owner for the whole lease."""
    from pipeline.stores.local import LocalStore

    store, path = LocalStore(), tmp_path / "unit-00000"
    assert store.create_exclusive(path, b"owner record")
    assert not LocalStore().create_exclusive(path, b"second")
    assert path.read_bytes() == b"owner record" and [p.name for p in tmp_path.iterdir()] == ["unit-00000"]


def test_a_run_that_lost_its_claim_does_not_commit(tmp_path):
    """A run paused past its lease (laptop suspended, SIGSTOP, a stalled filesystem) wakes up after another run took
    its unit over and committed it: it must not publish its own attempt over the other's (whose failures, e.g. a
    decode timeout, may differ), and a commit asked while the claim is held goes through."""
    import pyarrow as pa

    from pipeline.types import Failure
    from pipeline.writer import UnitCounts, UnitWriter, row_schema

    layout = OutputLayout.open(str(tmp_path / "out"), None, str(tmp_path / "tmp"))
    layout.make_dirs()
    writer = UnitWriter(layout, n_units=2, num_codebooks=4, file_metadata={})
    empty = pa.Table.from_pylist([], schema=row_schema(4))
    other_layout = OutputLayout.open(str(tmp_path / "out"), None, str(tmp_path / "tmp"))  # another run's store
    paused, other = Claims(layout, lease_s=60), Claims(other_layout, lease_s=60)
    try:
        assert paused.claim_next(2) == 0
        # The other run took the claim over (as after the lease ran out) and committed the unit, no failures.
        claim = layout.claim(0)
        assert other_layout.store.take_over(claim, other._record(), other_layout.store.read_lease(claim))
        other.held.add(0)
        assert writer.commit_table(0, empty, [], UnitCounts(items=1, ok=1), {"by": "other"},
                                   lambda: other.confirm(0))
        shard = (tmp_path / "out" / layout.shard(0, 2).relative_to(layout.root)).read_bytes()

        crash = Failure(item_id="a.wav", source="a.wav", stage="decode", reason="crash", error_type="X", message="m")
        assert not writer.commit_table(0, empty, [crash], UnitCounts(items=1, failed=1), {"by": "paused"},
                                       lambda: paused.confirm(0))
        assert json.loads(layout.store.read_bytes(layout.marker(0)))["by"] == "other"
        assert not layout.store.exists(layout.failure_log(0)), "the paused run's failure log was published"
        assert (tmp_path / "out" / layout.shard(0, 2).relative_to(layout.root)).read_bytes() == shard
        assert 0 not in paused.held_units()

        assert paused.claim_next(2, start=1) == 1  # held: its commit goes through
        assert writer.commit_table(1, empty, [crash], UnitCounts(items=1, failed=1), {"by": "paused"},
                                   lambda: paused.confirm(1))
        assert layout.store.exists(layout.failure_log(1))
    finally:
        paused.close()
        other.close()


def test_claims_live_owner_kept_stale_and_dead_taken_over(s3, tmp_path):
    layout = OutputLayout.open("s3://tok/claims", s3.options, str(tmp_path))

    def claim_of(host: str, pid: int) -> bytes:
        return json.dumps({"host": host, "pid": pid, "started": 0.0, "token": "theirs"}).encode()

    assert layout.store.create_exclusive(layout.claim(0), claim_of("another-host", 1))
    # This process's pid with another start time: a process of this host that is gone (its pid reused).
    assert layout.store.create_exclusive(layout.claim(1), claim_of(socket.gethostname(), os.getpid()))
    claims = Claims(layout, lease_s=1.5)
    try:
        assert claims.claim_next(2, start=1) == 1, "a dead owner's claim on this host is taken at once"
        assert claims.claim_next(2) is None, "a live owner's fresh claim must not be taken"
        time.sleep(2.6)  # the server's clock ticks in whole seconds: > 1.5 s measured
        assert claims.claim_next(2) == 0, "a claim whose heartbeat is older than the lease is taken over"
        assert Owner.parse(layout.store.read_lease(layout.claim(0)).data) == claims.owner
        time.sleep(1.0)  # heartbeats (every 0.5 s) keep both of ours fresh
        assert all(layout.store.read_lease(layout.claim(u)).age_s < 1.5 for u in (0, 1))
    finally:
        claims.close()
    assert layout.store.list_names(layout.claims) == [], "close() releases the claims"


def test_other_object_stores_are_refused_clearly():
    for url in ("gs://bucket/tok", "memory://tok", "az://container/tok"):
        with pytest.raises(ValueError, match=r"not supported.*s3://bucket/prefix"):
            OutputLayout.open(url)
    with pytest.raises(ValueError, match="output.storage_options must be a dict"):
        OutputLayout.open("s3://tok/x", 3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ end to end


def s3_rows(s3: S3, root: str) -> dict[tuple[str, int], dict]:
    """``helpers.read_rows`` through fsspec: every row of ``root/data/*.parquet``."""
    rows = {}
    for path in sorted(s3.fs.glob(f"{root}/data/*.parquet")):
        with s3.fs.open(path, "rb") as f:
            for row in pq.read_table(f).to_pylist():
                row["codes"] = np.asarray(row["codes"], dtype=np.int16)
                assert (row["id"], row["segment_index"]) not in rows, "duplicate row"
                rows[(row["id"], row["segment_index"])] = row
    return rows


def names(s3: S3, folder: str) -> set[str]:
    return {p.rsplit("/", 1)[1] for p in s3.fs.glob(f"{folder}/*")}


def units(s3: S3, root: str) -> tuple[set[int], set[int]]:
    """Units with a shard, units with a done marker."""
    return ({int(n[6:11]) for n in names(s3, f"{root}/data")},
            {int(n[5:10]) for n in names(s3, f"{root}/.state/done")})


def assert_same_output(s3: S3, root: str, ref: Path, scratch: Path, same_sources: bool = True) -> None:
    """Same rows and codes as the local run, same shard names, every shard with its marker and the reverse,
    same stats, no claim and no temp file left behind."""
    rows, expected = s3_rows(s3, root), read_rows(ref)
    assert rows.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(rows[key]["codes"], expected[key]["codes"], err_msg=str(key))
        assert not same_sources or rows[key]["source"] == expected[key]["source"]
    assert names(s3, f"{root}/data") == {p.name for p in (ref / "data").iterdir()}
    shards, markers = units(s3, root)
    assert shards == markers, "a shard without its marker, or the reverse"
    stats = json.loads(s3.fs.cat_file(f"{root}/stats.json"))
    ref_stats = json.loads((ref / "stats.json").read_text())
    for key in ("items", "ok", "failed", "skipped", "rows", "frames", "failures_by_reason"):
        assert stats[key] == ref_stats[key], key
    assert "configs:" in s3.fs.cat_file(f"{root}/README.md").decode()
    assert not names(s3, f"{root}/.state/claims"), "claims left behind"
    assert not list(scratch.rglob("unit-*")), "temp files left in the scratch folder"


def test_s3_output_equals_local_and_a_rerun_does_nothing(s3, s3_output, reference, corpus, tiny_codec_dir, caplog):
    root, scratch = s3_output
    assert_same_output(s3, root, reference, scratch)
    markers = {p: s3.fs.info(p)["ETag"] for p in s3.fs.glob(f"{root}/.state/done/*")}
    with caplog.at_level(logging.INFO, logger="pipeline.tokenize"):
        assert run(compose(args(corpus, f"s3://{root}", tiny_codec_dir, s3, scratch))) == 0
    assert "nothing to encode" in caplog.text
    assert {p: s3.fs.info(p)["ETag"] for p in s3.fs.glob(f"{root}/.state/done/*")} == markers


def test_verify_and_token_dataset_read_s3_output(s3, s3_output, reference, tmp_path):
    from pipeline.data import TokenDataset
    from pipeline.verify import VerifyOptions, verify

    root, _ = s3_output
    result = verify(f"s3://{root}", VerifyOptions(sample=2, decode=0, report_dir=tmp_path / "report",
                                                  storage_options=s3.options))
    assert result.ok, result.problems
    assert result.report["structure"]["rows"] == len(read_rows(reference))
    assert result.report["reencode"]["rows"] == 2  # sampled rows read from the bucket, re-encoded from source
    ds = TokenDataset(f"s3://{root}", storage_options=s3.options, shuffle=False)
    expected = read_rows(reference)
    examples = list(ds)
    assert len(examples) == len(expected)
    for ex in examples:
        np.testing.assert_array_equal(ex["codes"].numpy(), expected[(ex["id"], ex["segment_index"])]["codes"])


def test_overwrite_and_retry_failed_on_s3(s3, corpus, reference, tmp_path, tiny_codec_dir):
    """``output.mode=overwrite`` empties the prefix and redoes the job; ``output.retry_failed=true`` (after the
    broken file was repaired) redoes only its unit, copying the unit's kept rows from the stash."""
    data, scratch, root = tmp_path / "corpus", tmp_path / "scratch", "tok/modes"
    shutil.copytree(corpus, data)
    job = args(data, f"s3://{root}", tiny_codec_dir, s3, scratch)
    assert run(compose(job)) == 0
    s3.fs.pipe_file(f"{root}/data/stray.parquet", b"not ours")
    assert run(compose(job + ["output.mode=overwrite"])) == 0
    assert not s3.fs.exists(f"{root}/data/stray.parquet")
    assert_same_output(s3, root, reference, scratch, same_sources=False)
    markers = {p: s3.fs.info(p)["ETag"] for p in s3.fs.glob(f"{root}/.state/done/*")}

    write_audio(data / "broken.wav", synth(2.0, 16000, 1, "music", seed=50), 16000)
    assert run(compose(job + ["output.retry_failed=true"])) == 0
    rows, expected = s3_rows(s3, root), read_rows(reference)
    assert set(rows) == set(expected) | {("broken.wav", 0)}
    for key in expected:
        np.testing.assert_array_equal(rows[key]["codes"], expected[key]["codes"], err_msg=str(key))
    stats = json.loads(s3.fs.cat_file(f"{root}/stats.json"))
    assert (stats["ok"], stats["failed"]) == (json.loads((reference / "stats.json").read_text())["ok"] + 1, 0)
    assert not s3.fs.exists(f"{root}/failures/unit-00000.jsonl") and not s3.fs.glob(f"{root}/.state/retry/*")
    after = {p: s3.fs.info(p)["ETag"] for p in s3.fs.glob(f"{root}/.state/done/*")}
    assert [p for p in markers if after[p] != markers[p]] == [f"{root}/.state/done/unit-00000.json"]


# ---------------------------------------------------------------------------------------------- processes


def launch(nproc: int, job: list[str], env: dict | None = None) -> subprocess.Popen:
    """One process, or ``torchrun`` with ``nproc`` ranks, as users start them."""
    cmd = [sys.executable, "-m", "pipeline.tokenize", *job]
    if nproc > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                    str(random.randint(20000, 40000)), "-m", "pipeline.tokenize"]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, expect: int = 0) -> str:
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == expect, out[-4000:]
    return out


def versions(s3: S3, root: str) -> Counter:
    """How many times each key under ``root`` was written (bucket ``ver`` keeps every version)."""
    pages = s3.client.get_paginator("list_object_versions").paginate(Bucket="ver", Prefix=root.split("/", 1)[1])
    return Counter(v["Key"] for page in pages for v in page.get("Versions", []))


def test_two_ranks_split_the_units_and_write_everything_once(s3, corpus, reference, tmp_path, tiny_codec_dir):
    root, scratch = "ver/two", tmp_path / "scratch"
    finish(launch(2, args(corpus, f"s3://{root}", tiny_codec_dir, s3, scratch)))
    assert_same_output(s3, root, reference, scratch)
    ranks = {json.loads(s3.fs.cat_file(p))["rank"] for p in s3.fs.glob(f"{root}/.state/done/*")}
    assert ranks == {0, 1}, "both ranks should have claimed units"
    written = versions(s3, root)
    once = [k for k in written if "/data/" in k or "/.state/done/" in k or k.endswith(("stats.json", "README.md"))]
    assert len(once) == 2 * len(names(s3, f"{root}/data")) + 2
    assert all(written[k] == 1 for k in once), {k: written[k] for k in once if written[k] != 1}
    assert s3.fs.glob(f"{root}/.logs/*/.hydra/config.yaml"), "the run's resolved config belongs beside its output"


def test_killed_around_an_upload_then_resumed(s3, corpus, reference, tmp_path, tiny_codec_dir):
    """SIGKILL right after a shard's upload (before its marker), then right before an upload; a rerun finishes.
    Nothing uncommitted survives the rerun, no unit is committed twice, and the output equals the local run."""
    root, scratch = "ver/crash", tmp_path / "scratch"
    job = args(corpus, f"s3://{root}", tiny_codec_dir, s3, scratch)
    finish(launch(1, job, {"PIPELINE_FAULT": "after_rename:2"}), expect=-9)
    shards, markers = units(s3, root)
    assert len(shards - markers) == 1 and markers, "the kill should leave one uploaded shard without its marker"
    assert names(s3, f"{root}/.state/claims"), "the killed run's claims stay (its owner is dead)"

    finish(launch(1, job, {"PIPELINE_FAULT": "before_rename:1"}), expect=-9)
    shards, markers = units(s3, root)
    assert shards == markers, "the uncommitted shard is removed at start, and nothing is uploaded before a commit"
    assert list(scratch.rglob("unit-*.parquet")), "the kill should leave its temp file in the scratch folder"

    finish(launch(1, job))
    assert_same_output(s3, root, reference, scratch)
    written = versions(s3, root)
    assert all(n == 1 for k, n in written.items() if "/.state/done/" in k), "a unit was committed twice"
