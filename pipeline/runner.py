"""The per-rank work loop: claim units -> decode in workers -> batch -> encode -> commit.

Nothing here is collective: a rank claims units until none is left, so ranks with unequal work never wait
for each other, and the output does not depend on how many ranks there were.
"""

from __future__ import annotations

import collections
import functools
import logging
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.batching import Batch, Batcher, BatchPolicy
from pipeline.claims import Claims
from pipeline.codecs.base import Codec
from pipeline.encode import LaunchedBatch, Launcher, collect_batch
from pipeline.layout import OutputLayout
from pipeline.plan import Plan
from pipeline.progress import Progress
from pipeline.retry import KeptUnit, commit_merged, load_kept
from pipeline.types import AudioItem, EncodedSegment, Failure
from pipeline.workers import DecodePool, DecodeResult, DecodeTask
from pipeline.writer import UnitCounts, UnitWriter

log = logging.getLogger(__name__)


@dataclass
class OpenUnit:
    """A claimed unit being worked on: which items went out, what came back, which rows are encoded."""

    unit: int
    items: list[AudioItem]
    submitted: int = 0
    results: dict[int, DecodeResult] = field(default_factory=dict)  # item index -> result (segments dropped)
    pending_segments: int = 0
    rows: list[EncodedSegment] = field(default_factory=list)
    encode_failures: dict[int, Failure] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    kept: KeptUnit | None = None  # output.retry_failed: the rows and records this unit keeps; items = retried only

    @property
    def complete(self) -> bool:
        return len(self.results) == len(self.items) and self.pending_segments == 0

    def counts_and_failures(self) -> tuple[UnitCounts, list[Failure], list[EncodedSegment]]:
        """Account for every item exactly once: ok (has rows), failed, or skipped by policy.

        A failed item adds nothing but its failure (no audio, no dropped seconds), so ``output.retry_failed`` can
        take it out of the counts exactly (``pipeline.retry``).
        """
        counts, failures = UnitCounts(items=len(self.items)), []
        for item in self.items:
            result = self.results[item.index]
            failure = self.encode_failures.get(item.index) or result.failure
            if failure is None:
                counts.ok += 1
                counts.audio_s += result.audio_s
                counts.dropped_s += result.dropped_s
                continue
            counts.add_failure(failure)
            failures.append(failure)
            if failure.stage == "policy":  # the policy dropped the whole item
                counts.dropped_s += result.dropped_s
        # An item that failed after some of its segments streamed out (a NaN block, a cut file) loses them all.
        failed = {i for i, r in self.results.items() if r.failure is not None} | set(self.encode_failures)
        rows = [r for r in self.rows if r.item.index not in failed]
        counts.rows = len(rows)
        counts.frames = sum(r.n_frames for r in rows)
        counts.encoded_s = sum(r.duration_s for r in rows)
        return counts, failures, rows


@dataclass
class RankStats:
    """What one rank did, and where its main loop spent its time (the first thing to read when a run is slow)."""

    units: int = 0
    items: int = 0
    audio_s: float = 0.0
    stopped_by_signal: int | None = None
    batches: int = 0
    # Seconds in the codec: launching batches (CPU: the whole encode) and waiting for launched ones to finish.
    encode_s: float = 0.0
    # Seconds blocked waiting for decoded audio with no batch to encode: the codec starved by decoding.
    starved_s: float = 0.0
    # Seconds the loop waited on commits: the background writer had fallen ``max_pending_commits`` behind.
    commit_s: float = 0.0
    # Seconds the background writer worked (building the table, Parquet + zstd, upload, marker): overlapped.
    writer_s: float = 0.0
    # Seconds with no batch on the codec (after the first launch): on CUDA, no batch handed to the launcher and
    # not yet collected, the host-side loss between batches (a lower bound on the GPU's idle time: it also idles
    # while the launch thread is behind in queuing a batch's kernels); on CPU, where encoding is synchronous,
    # everything outside encode.
    codec_idle_s: float = 0.0
    wall_s: float = 0.0
    # CPU seconds of the parent's threads (the main loop; the pipe reader; the launcher's fill and launch threads;
    # the writer) and of the decode workers: which side would limit a faster codec. Workers' busy share =
    # decode_cpu_s / (workers x wall).
    loop_cpu_s: float = 0.0
    receive_cpu_s: float = 0.0
    fill_cpu_s: float = 0.0
    launch_cpu_s: float = 0.0
    writer_cpu_s: float = 0.0
    decode_cpu_s: float = 0.0
    decode_workers: int = 0
    warmup_s: float = 0.0  # the codec's warm-up before the loop (CUDA: torch.compile, cuDNN), inside "stages"
    graphs: str = ""  # which batch shapes replay CUDA graphs (``CudaGraphs.describe``), "" without them
    rank: int = 0  # this rank, of world_size (the summary says so: a launch that started fewer ranks is visible)
    world_size: int = 1
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds of each phase of the run, in order

    def phases_line(self) -> str:
        """``ranks 0.1 s, codec 2.3 s, plan 0.4 s, stages 1.5 s (warm-up 1.1 s), loop 14.4 s, finalize 0.3 s``."""
        line = ", ".join(f"{name} {s:.1f} s" + (f" (warm-up {self.warmup_s:.1f} s)" if name == "stages" and
                                                 self.warmup_s else "") for name, s in self.phases.items())
        return f"{line}; {self.graphs}" if self.graphs else line

    def timing(self) -> str:
        """One line: where the loop's time went, e.g. ``encode 91% (412 batches), starved 3%, commit 2%, ...``."""
        wall = max(self.wall_s, 1e-9)
        return (f"encode {self.encode_s / wall:.0%} ({self.batches} batches), starved {self.starved_s / wall:.0%}, "
                f"commit {self.commit_s / wall:.0%} (writer busy {self.writer_s / wall:.0%}), "
                f"codec idle {self.codec_idle_s / wall:.0%} of {self.wall_s:.1f} s; CPU of the parent's threads: "
                f"loop {self.loop_cpu_s / wall:.0%}, receive {self.receive_cpu_s / wall:.0%}, fill "
                f"{self.fill_cpu_s / wall:.0%}, launch {self.launch_cpu_s / wall:.0%}, writer "
                f"{self.writer_cpu_s / wall:.0%}; decode workers "
                f"{self.decode_cpu_s / (wall * max(self.decode_workers, 1)):.0%} busy ({self.decode_workers})")


class Runner:
    """Drives one rank. ``run`` returns when no unit is left to claim (or a stop signal arrived).

    Complete units are committed by one background thread (Arrow + zstd and file writes release the GIL), in the
    order they completed; a unit's claim is released, and it counts as done, once its commit returned. A commit
    that raises fails the run as it would in the loop itself.

    Args:
        max_waiting_units: units whose items are all decoded but whose last segments sit in partial batches;
            past this many, partial batches are encoded with zero rows so units commit (and memory stays bounded).
        max_pending_commits: units handed to the writer thread and not committed yet; past this many the loop
            waits (bounds the memory of rows waiting to be written).
    """

    def __init__(self, plan: Plan, items: list[AudioItem], layout: OutputLayout, codec: Codec, pool: DecodePool,
                 claims: Claims, writer: UnitWriter, batch_policy: BatchPolicy, progress: Progress,
                 start_unit: int = 0, marker_extra: dict | None = None, max_waiting_units: int = 4,
                 max_pending_commits: int = 2):
        self.plan, self.items, self.layout, self.codec = plan, items, layout, codec
        self.pool, self.claims, self.writer, self.progress = pool, claims, writer, progress
        self.batcher = Batcher(batch_policy)
        self.start_unit, self.max_waiting_units = start_unit, max_waiting_units
        self.marker_extra = {**(marker_extra or {}), "host": socket.gethostname()}
        self.open: dict[int, OpenUnit] = {}
        self.ready: collections.deque[Batch] = collections.deque()
        # Batches launched and not collected yet, oldest first: on CUDA one runs while the next waits behind it.
        self.launcher = Launcher(codec)
        self.launched: collections.deque[LaunchedBatch] = collections.deque()
        self._idle_since: float | None = None  # when the codec last ran out of work
        self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self.committing: collections.deque[tuple[int, UnitCounts, Future]] = collections.deque()
        self.max_pending_commits = max_pending_commits
        self.no_more_units = False
        self._waited = False  # logged that other runs hold the last units
        self.stats = RankStats()
        self._stop_signal: int | None = None

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (SLURM preemption, time limit) and SIGINT: stop after the current batch."""
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    @property
    def stop_signal(self) -> int | None:
        """The stop signal received (they stay installed until the process ends), or None."""
        return self._stop_signal

    def _on_signal(self, signum, _frame) -> None:
        log.warning("signal %s: stopping after the current batch; uncommitted units are redone on rerun", signum)
        self._stop_signal = signum

    def run(self) -> RankStats:
        start, cpu0, receive0 = time.monotonic(), time.thread_time(), self.pool.receive_cpu_s
        try:
            self._loop()
        finally:
            # Whatever stopped the loop, what was handed to the writer is written (or fails) before returning.
            self.launcher.close()
            self._writer_thread.shutdown(wait=True)
        self._finish_commits(wait=True)
        self.stats.stopped_by_signal = self._stop_signal
        self.stats.wall_s = time.monotonic() - start
        self.stats.loop_cpu_s = time.thread_time() - cpu0
        self.stats.receive_cpu_s = self.pool.receive_cpu_s - receive0
        self.stats.fill_cpu_s = self.launcher.fill_cpu_s
        self.stats.launch_cpu_s = self.launcher.cpu_s
        self.stats.decode_workers = self.pool.n_workers
        log.info("rank loop: %s", self.stats.timing())
        return self.stats

    def _loop(self) -> None:
        while self._stop_signal is None:
            self._feed()
            # With batches waiting, take no more audio: the pool's buffer then fills, workers block, and memory
            # stays bounded by the batch cap rather than by how fast files decode.
            if len(self.ready) < 2:
                self._poll(timeout=0.005 if self.ready or self.launched else 0.1)
            if self.ready and len(self.launched) < 2:
                self._encode(self.ready.popleft())
            # Take the rows of finished batches so their units can commit; until a batch is done, keep polling
            # (the next batch may fill meanwhile) rather than block on the device.
            while self.launched and (self.launched[0].done() or len(self.launched) > 1 and self.ready):
                self._collect()
            self._maybe_flush()
            self._commit_complete()
            if self.no_more_units and not self.open and self.pool.outstanding == 0 and not self._wait_for_others():
                break
        while self.launched:  # stopped by a signal: these batches are on the device already, keep them
            self._collect()
        self._commit_complete()

    def _wait_for_others(self) -> bool:
        """Nothing left to claim and nothing open here: True (after a pause) while units are still claimed by other
        runs, so this one looks again and takes over the claims of any that died (stale after ``claim_lease_s``,
        at once for a dead process on this host); False once every unit is done.

        Ending here instead would leave a dead run's units to nobody: a job exited 0 with units missing (found
        with two launches into one folder and one killed), and on a multi-node launch the ranks of a node that ran
        out of work waited in torchrun's exit barrier (5 minutes) for the others, then failed the job.
        """
        # Units this run still holds are its own commits in flight, not others' work.
        waiting = len(set(range(self.plan.n_units)) - self.layout.done_units() - self.claims.held_units())
        if waiting == 0:
            return False
        if not self._waited:
            log.info("%d unit(s) still claimed by other runs: waiting for them (a claim without heartbeat for "
                     "%g s is taken over)", waiting, self.claims.lease_s)
        self._waited = True
        deadline = time.monotonic() + min(5.0, self.claims.lease_s / 4)
        while self._stop_signal is None and time.monotonic() < deadline:
            time.sleep(0.1)  # short naps: a stop signal is seen within 0.1 s
        self.no_more_units = False
        return True

    def _poll(self, timeout: float) -> None:
        """Take decoded results; time spent blocked with nothing to encode counts as starved."""
        t0 = time.monotonic()
        results = self.pool.poll(timeout=timeout)
        if not self.ready and not self.launched and not results:
            self.stats.starved_s += time.monotonic() - t0
        for result in results:
            self._on_result(result)

    def _feed(self) -> None:
        """Keep every worker busy: submit items of open units, claiming a new unit when they are all out."""
        target = max(2, 2 * self.pool.n_workers + 2)
        while self.pool.outstanding < target:
            unit = next((u for u in self.open.values() if u.submitted < len(u.items)), None)
            if unit is None and self.open and self.pool.outstanding >= max(1, self.pool.n_workers):
                # Claim the next unit only when fewer items than workers are left in flight: claiming ahead to
                # fill every queue let the first rank up take most units of a small job while the others idled
                # (measured), and waiting for fewer than that starved the workers of small units.
                return
            if unit is None:
                unit = self._claim()
                if unit is None:
                    return
            self.pool.submit(DecodeTask(unit.items[unit.submitted], unit.unit))
            unit.submitted += 1

    def _claim(self) -> OpenUnit | None:
        if self.no_more_units:
            return None
        unit = self.claims.claim_next(self.plan.n_units, self.start_unit)
        if unit is None:
            # Not a reason to flush yet: items still decoding may fill the partial batches (flushing here sent
            # one part-empty batch per job, measured); _maybe_flush flushes once the pool is drained.
            self.no_more_units = True
            return None
        items = [self.items[i] for i in self.plan.unit_range(unit)]
        kept = load_kept(self.layout, unit, items)
        if kept is not None:  # a unit reopened by output.retry_failed: decode only the items that failed
            items = [it for it in items if it.id in kept.retry_ids]
            log.info("unit %d: retrying %d failed item(s), keeping %d row(s)", unit, len(items), kept.table.num_rows)
        self.open[unit] = OpenUnit(unit, items, kept=kept)
        log.debug("claimed unit %d (%d items)", unit, len(items))
        return self.open[unit]

    def _on_result(self, result: DecodeResult) -> None:
        unit = self.open[result.unit]
        if result.final:
            unit.results[result.item.index] = result
            self.stats.decode_cpu_s += result.cpu_s
            return
        unit.pending_segments += len(result.segments)
        for seg in result.segments:
            batch = self.batcher.add(seg)
            if batch is not None:
                self.ready.append(batch)

    def _encode(self, batch: Batch) -> None:
        """Launch ``batch`` on the codec (CUDA: queued from the launcher thread; CPU: encoded now)."""
        t0 = time.monotonic()
        if not self.launched and self._idle_since is not None:
            self.stats.codec_idle_s += t0 - self._idle_since
        try:
            launched = self.launcher.launch(batch)
        except Exception as e:  # noqa: BLE001 - a batch that cannot be encoded fails its items, not the run
            self._fail_batch(batch, e)
            self._idle_since = time.monotonic()
            return
        finally:
            self.stats.encode_s += time.monotonic() - t0
        self.launched.append(launched)
        if launched.ready is None and launched.queued is None:  # CPU: encoded already, take its rows now
            self._collect()

    def _collect(self) -> None:
        """Take the oldest launched batch's rows (waiting for the device if it is not done)."""
        launched = self.launched.popleft()
        t0 = time.monotonic()
        try:
            encoded = collect_batch(self.codec, launched)
        except Exception as e:  # noqa: BLE001 - as in _encode: an asynchronous device error surfaces here
            self._fail_batch(launched.batch, e)
            return
        finally:
            self.stats.encode_s += time.monotonic() - t0
            if not self.launched:
                # Idle from here unless a batch is launched before this one finishes; idle time is only counted
                # at a launch that finds nothing on the codec.
                self._idle_since = time.monotonic()
        self.stats.batches += 1
        for row in encoded:
            unit = self.open[row.unit]
            unit.rows.append(row)
            unit.pending_segments -= 1
        self.progress.update(audio_s=sum(r.duration_s for r in encoded))

    def _fail_batch(self, batch: Batch, error: Exception) -> None:
        log.error("encode failed for a batch of %d segments: %s: %s", len(batch.segments), type(error).__name__,
                  error, exc_info=error)
        for seg in batch.segments:
            unit = self.open[seg.unit]
            unit.encode_failures.setdefault(
                seg.item.index,
                Failure(seg.item.id, seg.item.source, "encode", "error", type(error).__name__, str(error)))
            unit.pending_segments -= 1

    def _maybe_flush(self) -> None:
        """Encode partial batches when units would otherwise wait on them for too long."""
        if self.ready:
            return
        # Results that arrived during the last encode may fill the open batches: look before flushing (flushing
        # right after a long encode wasted up to a third of the codec's time on zero rows, measured).
        for result in self.pool.poll(timeout=0):
            self._on_result(result)
        if self.ready:
            return
        waiting = [u for u in self.open.values() if len(u.results) == len(u.items) and u.pending_segments]
        drained = self.no_more_units and self.pool.outstanding == 0
        if waiting and (drained or len(waiting) > self.max_waiting_units):
            self.ready.extend(self.batcher.flush())

    def _commit_complete(self) -> None:
        """Hand every complete unit to the writer thread; account for the commits that finished."""
        for unit in [u for u in self.open.values() if u.complete]:
            counts, failures, rows = unit.counts_and_failures()
            extra = {**self.marker_extra, "elapsed_s": round(time.monotonic() - unit.started, 3)}
            del self.open[unit.unit]
            self.committing.append((unit.unit, counts,
                                    self._writer_thread.submit(self._commit, unit, rows, failures, counts, extra)))
        self._finish_commits(wait=False)

    def _commit(self, unit: OpenUnit, rows: list[EncodedSegment], failures: list[Failure], counts: UnitCounts,
                extra: dict) -> bool:
        """The writer thread's job: one unit's shard, failure log and marker (``UnitWriter``'s commit protocol),
        unless this run lost the unit's claim meanwhile (False)."""
        t0, cpu0 = time.monotonic(), time.thread_time()
        still_mine = functools.partial(self.claims.confirm, unit.unit)
        if unit.kept is None:
            committed = self.writer.commit(unit.unit, rows, failures, counts, extra, still_mine)
        else:
            committed = commit_merged(self.writer, unit.unit, unit.kept, rows, failures, counts, extra, still_mine)
        self.stats.writer_s += time.monotonic() - t0
        self.stats.writer_cpu_s += time.thread_time() - cpu0
        return committed

    def _finish_commits(self, wait: bool) -> None:
        """Release the claims of committed units, in order; wait while too many are pending (or all, ``wait``).

        ``Future.result`` re-raises a commit's exception here, in the loop's thread.
        """
        t0 = time.monotonic()
        while self.committing and (wait or self.committing[0][2].done()
                                   or len(self.committing) > self.max_pending_commits):
            unit, counts, future = self.committing.popleft()
            committed = future.result()
            self.claims.release(unit)
            if not committed:  # another run owns it now and commits it (this run's summary leaves it out)
                continue
            self.stats.units += 1
            self.stats.items += counts.items
            self.stats.audio_s += counts.audio_s
            self.progress.update(items=counts.items, failed=counts.failed + counts.skipped)
        self.stats.commit_s += time.monotonic() - t0
