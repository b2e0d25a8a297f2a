"""Real multi-process runs (torchrun, gloo on CPU) and crash/resume: the output never depends on how it was made."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import read_rows
from pipeline.workers import FAULT_ENV
from pipeline.testing.dummies import synth, write_audio

N_ITEMS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mp_corpus")
    rng = np.random.default_rng(0)
    for i in range(N_ITEMS):
        seconds = float(rng.uniform(1.5, 6.0))
        write_audio(root / f"clip_{i:02d}.wav", synth(seconds, 16000, 1 + i % 2, "music", seed=i), 16000)
    write_audio(root / "zz_short.wav", synth(0.2, 16000, 1, "music", seed=99), 16000)  # skipped by policy
    return root


def cli_args(corpus: Path, out: Path, codec: Path, *extra: str) -> list[str]:
    return [f"dataset.path={corpus}", "dataset=folder", f"output.dir={out}", f"codec.pretrained={codec}",
            "segment.length_s=4", "segment.min_s=0.5", "batch.max_audio_s=16", "output.unit_size=2",
            "decode.workers=1", "progress=false", "claim_lease_s=5", *extra]


def launch(nproc: int, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start a run as users do: one process, or torchrun with ``nproc`` ranks."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "pipeline.tokenize", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(random.randint(20000, 40000)), "-m", "pipeline.tokenize", *args]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every descendant at once (torchrun starts its ranks in sessions of their own, so
    a process-group kill would miss them)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.communicate(timeout=60)


def assert_same_output(out: Path, ref: Path, same_units: bool = True) -> None:
    """Same rows, same codes; nothing lost, nothing duplicated, every shard whole, no temp file visible."""
    rows, expected = read_rows(out), read_rows(ref)  # read_rows asserts no duplicate (id, segment)
    assert rows.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(rows[key]["codes"], expected[key]["codes"], err_msg=str(key))
    names = sorted(p.name for p in (out / "data").iterdir())
    if same_units:
        assert names == sorted(p.name for p in (ref / "data").iterdir())
    assert len(names) == len(list((out / ".state/done").glob("*.json"))), "a shard without marker, or the reverse"
    stats, ref_stats = json.loads((out / "stats.json").read_text()), json.loads((ref / "stats.json").read_text())
    for key in ("items", "ok", "failed", "skipped", "rows", "frames"):
        assert stats[key] == ref_stats[key], key
    assert stats["ok"] + stats["failed"] + stats["skipped"] == N_ITEMS + 1
    assert not list((out / ".state" / "tmp").iterdir()), "temp files left behind"
    assert not list((out / ".state" / "claims").glob("unit-*")), "claims left behind"


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory, tiny_codec_dir) -> Path:
    """One process, uninterrupted."""
    out = tmp_path_factory.mktemp("ref")
    finish(launch(1, cli_args(corpus, out, tiny_codec_dir)))
    return out


def test_two_processes_equal_one(corpus, reference, tmp_path, tiny_codec_dir):
    out = tmp_path / "out"
    log = finish(launch(2, cli_args(corpus, out, tiny_codec_dir)))
    assert_same_output(out, reference)
    markers = [json.loads(p.read_text()) for p in (out / ".state/done").glob("*.json")]
    assert {m["rank"] for m in markers} == {0, 1}, "both ranks should have claimed units"
    assert log.count("output      ") == 1, "finalize summary should be printed once"
    assert "rank 0 of 2 on cpu" in log and "rank 1 of 2 on cpu" in log  # how many ranks the launch started
    assert re.search(r"this rank   [01] of 2: \d+ units", log), log[-2000:]


def test_kill9_five_times_then_resume(corpus, reference, tmp_path, tiny_codec_dir):
    """SIGKILL a 2-process run 5 times in a row (mid-run at random, right before a shard's rename, right after
    it and before its marker), then resume: the output equals the uninterrupted run."""
    out = tmp_path / "out"
    args = cli_args(corpus, out, tiny_codec_dir, "output.unit_size=1")
    rng = random.Random(1234)
    faults = [None, "before_rename:2", None, "after_rename:1", None]
    n_units = N_ITEMS + 1
    for fault in faults:
        proc = launch(2, args, {"PIPELINE_FAULT": fault} if fault else None)
        if fault:
            _wait_for_death_of_a_rank(proc, timeout=120)
        else:
            _wait_for_markers(out, proc, target=len(_done(out)) + rng.randint(1, 2), timeout=120)
            time.sleep(rng.uniform(0.0, 0.05))
        kill_group(proc)
        assert len(_done(out)) < n_units, "the run finished before the kill; the test would prove nothing"
        _assert_visible_shards_whole(out)
    finish(launch(2, args))
    assert_same_output(out, reference, same_units=False)  # other unit size, same rows


def test_resume_with_other_world_size_and_refuse_changed_config(corpus, reference, tmp_path, tiny_codec_dir):
    out = tmp_path / "out"
    args = cli_args(corpus, out, tiny_codec_dir)
    proc = launch(2, args)
    _wait_for_markers(out, proc, target=2, timeout=120)
    kill_group(proc)
    finish(launch(1, args))
    assert_same_output(out, reference)
    changed = launch(1, cli_args(corpus, out, tiny_codec_dir, "segment.length_s=5"))
    log, _ = changed.communicate(timeout=120)
    assert changed.returncode == 2
    assert "holds a different job" in log and "segment.length_s: 4.0 -> 5.0" in log and "output.mode=overwrite" in log


def test_a_run_that_dies_for_good(corpus, reference, tmp_path, tiny_codec_dir):
    """Two independent launches share one folder (as SLURM array tasks do); one is SIGKILLed for good. The other
    takes over its claimed units (dead owner on this host) and finishes; a rerun does no work."""
    out = tmp_path / "out"
    args = cli_args(corpus, out, tiny_codec_dir)
    doomed = launch(1, args, {"PIPELINE_FAULT": "after_rename:1"})
    survivor = launch(1, args)
    _wait_for_death_of_a_rank(doomed, timeout=120)
    kill_group(doomed)
    finish(survivor)
    if not (out / "stats.json").exists():  # the survivor may have ended before the death made claims stale
        finish(launch(1, args))
    assert_same_output(out, reference)
    before = {p: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    log = finish(launch(1, args))
    assert "nothing to encode" in log
    assert {p: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == before


def _done(out: Path) -> list[Path]:
    return list((out / ".state/done").glob("*.json")) if (out / ".state/done").exists() else []


def _wait_for_markers(out: Path, proc: subprocess.Popen, target: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(_done(out)) < target:
        assert proc.poll() is None, f"run ended early: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)


def _wait_for_death_of_a_rank(proc: subprocess.Popen, timeout: float) -> None:
    """The fault hook SIGKILLs one process; torchrun then tears the others down, a lone process just ends."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("the injected fault never fired")


def _assert_visible_shards_whole(out: Path) -> None:
    import pyarrow.parquet as pq

    for shard in (out / "data").glob("*.parquet"):
        pq.read_table(shard)  # raises on a partial file


def test_a_run_out_of_work_waits_for_other_runs_and_takes_over_a_dead_ones_units(corpus, reference, tmp_path,
                                                                                  tiny_codec_dir):
    """Two launches into one folder: B finishes what it can claim, then waits while A still holds a unit (A's
    decode hangs) instead of exiting 0 with the job unfinished; once A is killed, B takes its unit over and
    completes the job (same output as one run)."""
    out = tmp_path / "out"
    args = cli_args(corpus, out, tiny_codec_dir, "output.unit_size=1")
    a = launch(1, [*args, "decode.timeout_s=600"], env={FAULT_ENV: "hang:clip_05"})
    _wait_for_markers(out, a, target=1, timeout=120)
    b = launch(1, args)
    n_units = N_ITEMS + 1
    deadline = time.monotonic() + 180

    def held_by_a() -> int:
        held = 0
        for claim in (out / ".state/claims").glob("unit-*"):
            try:  # a claim may be released between the listing and the read
                held += json.loads(claim.read_text()).get("pid") == a.pid
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        return held

    while len(_done(out)) + held_by_a() < n_units:  # everything done but the units A holds (one hangs)
        assert b.poll() is None, f"B ended with the job unfinished: {b.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.1)
    time.sleep(3)
    assert b.poll() is None, f"B ended while A still held a unit: {b.communicate()[0][-3000:]}"
    kill_group(a)
    log = finish(b, timeout=120)
    assert "still claimed by other runs" in log and "took over the stale claim" in log
    assert_same_output(out, reference, same_units=False)


def test_stop_signal_to_the_whole_process_group_fails_no_item(corpus, reference, tmp_path, tiny_codec_dir):
    """slurmstepd, scancel and Ctrl-C signal every process of the step: decode workers ignore it, so the item a
    worker was decoding is not logged as a crash (and its unit not committed with that failure); the parent stops
    and a rerun finishes with the reference's output."""
    out = tmp_path / "out"
    args = cli_args(corpus, out, tiny_codec_dir, "output.unit_size=1")
    proc = launch(1, args, env={FAULT_ENV: "hang:clip_05"})  # a slow decode is running when the signal comes
    _wait_for_markers(out, proc, target=3, timeout=120)
    os.killpg(proc.pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    logs = list((out / "failures").glob("*.jsonl"))
    assert not [line for f in logs for line in f.read_text().splitlines() if '"crash"' in line], "a crash logged"
    finish(launch(1, args))
    assert_same_output(out, reference, same_units=False)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_stops_cleanly(corpus, reference, tmp_path, tiny_codec_dir, sig):
    """SLURM's warning signals: the run stops within seconds, releases its claims, leaves no temp file; rerun
    finishes the job."""
    out = tmp_path / "out"
    args = cli_args(corpus, out, tiny_codec_dir, "output.unit_size=1")
    proc = launch(1, args)
    _wait_for_markers(out, proc, target=2, timeout=120)
    sent = time.monotonic()
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10, "did not stop within seconds"
    assert proc.returncode == 128 + sig, log[-3000:]
    assert "run the same command again" in log
    assert not list((out / ".state/claims").glob("unit-*")), "claims not released"
    assert not list((out / ".state/tmp").iterdir())
    assert len(_done(out)) < N_ITEMS + 1
    finish(launch(1, args))
    assert_same_output(out, reference, same_units=False)


def _descendants(proc: subprocess.Popen) -> list:
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_gone(procs: list, timeout: float) -> list:
    """The processes of ``procs`` still running after ``timeout`` seconds (zombies count as gone)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _kill_all(procs: list) -> None:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _held_claims(out: Path) -> list[Path]:
    return list((out / ".state/claims").glob("unit-*")) if (out / ".state/claims").exists() else []


def test_killing_the_launcher_ends_every_rank_and_its_workers(corpus, reference, tmp_path, tiny_codec_dir):
    """torchrun starts its ranks in sessions of their own, so a kill -9 of the launcher reached none: they lived on
    (hours, in the rendezvous or a hung decode) holding their claims. Now each rank stops on its launcher's death,
    releases its claims and exits non-zero with a line; its decode workers go with it; a rerun finishes the job."""
    out = tmp_path / "out"
    args = cli_args(corpus, out, tiny_codec_dir, "output.unit_size=1", "decode.timeout_s=600")
    proc = launch(2, args, env={FAULT_ENV: "hang:clip_05"})  # one rank's worker wedged, as a bad decoder does
    deadline = time.monotonic() + 120
    while len(_held_claims(out)) < 2 or len(_done(out)) < 2:  # both ranks in their loop, holding units
        assert proc.poll() is None, f"run ended early: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    tree = _descendants(proc)  # 2 ranks and their decode workers
    assert len(tree) >= 4, tree
    proc.kill()
    try:
        alive = _wait_gone(tree, timeout=30)
        assert not alive, f"still running 30 s after the launcher died: {[p.cmdline()[-3:] for p in alive]}"
    finally:
        _kill_all(tree)
    log, _ = proc.communicate(timeout=30)
    assert log.count("its launcher died; claims released") == 2, log[-3000:]
    assert not _held_claims(out), "claims not released"
    assert len(_done(out)) < N_ITEMS + 1
    finish(launch(2, args))
    assert_same_output(out, reference, same_units=False)


def test_a_decode_worker_dies_with_its_rank(corpus, tmp_path, tiny_codec_dir):
    """A worker learnt of its rank's death only at its next pipe read or write: one wedged in a decoder lived on."""
    out = tmp_path / "out"
    proc = launch(1, cli_args(corpus, out, tiny_codec_dir, "output.unit_size=1", "decode.timeout_s=600"),
                  env={FAULT_ENV: "hang:clip_00"})  # the one worker's first item
    deadline = time.monotonic() + 120
    while not _held_claims(out):  # unit 0 claimed: its first item goes to the worker, which then hangs
        assert proc.poll() is None, f"run ended early: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "no claim"
        time.sleep(0.05)
    time.sleep(5)  # let the worker take the item (else, between two items, it would end on its pipe's EOF anyway)
    workers = _descendants(proc)  # the decode worker (and multiprocessing's resource tracker)
    assert workers, "no decode worker"
    proc.kill()
    proc.wait(timeout=30)
    try:
        assert not _wait_gone(workers, timeout=30), "a decode worker outlived its rank"
    finally:
        _kill_all(workers)
        proc.communicate(timeout=30)  # the workers held the output pipe open too


def test_a_rank_whose_peer_never_comes_gives_up_within_the_rendezvous_timeout(corpus, tmp_path, tiny_codec_dir):
    """Rank 0 of 2 alone (its peer failed to start): it waited 6 hours; now rendezvous_timeout_s, then one line."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(random.randint(20000, 40000))}
    proc = launch(1, cli_args(corpus, tmp_path / "out", tiny_codec_dir, "rendezvous_timeout_s=3"), env=env)
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail("still waiting for its peer after 120 s")
    assert proc.returncode == 1, log[-3000:]
    assert "did not all meet within rendezvous_timeout_s=3 s" in log, log[-3000:]


def test_a_slow_plan_is_waited_for_beyond_the_rendezvous_timeout(corpus, tmp_path, tiny_codec_dir):
    """The short rendezvous timeout is not the planning barrier's: rank 0 planning for longer than it (a listing of
    millions of files) is waited for."""
    from pipeline.tokenize import PLAN_DELAY_ENV

    out = tmp_path / "out"
    args = cli_args(corpus, out, tiny_codec_dir, "rendezvous_timeout_s=10", "dataset.limit=4")
    log = finish(launch(2, args, env={PLAN_DELAY_ENV: "15"}))
    assert "rank 1 of 2 on cpu" in log and len(_done(out)) == 2
