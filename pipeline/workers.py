"""Decode workers: fetch + decode + resample + segment items in separate processes, isolated from each other.

A decoder that segfaults or hangs costs its item only: the item is recorded as failed (``crash`` / ``timeout``),
the worker is replaced and the run goes on. Workers talk to the main process over one pipe each (not a shared
queue: a process killed while writing to a shared queue can leave its lock held and stall every other worker),
and a collector thread drains the pipes so workers keep decoding while the main thread encodes.

This module must not import torch: workers start by importing it, and they should start in milliseconds.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from pipeline.audio import AudioError, decode_audio
from pipeline.segment import SegmentPolicy, segment_item
from pipeline.sources.base import Source
from pipeline.types import AudioItem, Failure, Segment


@dataclass(slots=True, frozen=True)
class DecodeTask:
    item: AudioItem
    unit: int


@dataclass(slots=True)
class DecodeResult:
    """What became of one item in the worker: segments, or a failure/skip record (never both)."""

    item: AudioItem
    unit: int
    segments: list[Segment] = field(default_factory=list)
    failure: Failure | None = None
    audio_s: float = 0.0
    dropped_s: float = 0.0

    @property
    def skipped(self) -> bool:
        return self.failure is not None and self.failure.stage == "policy"


@dataclass(slots=True, frozen=True)
class DecodeSpec:
    """Everything a worker needs, picklable: the source and the decode/segment settings."""

    source: Source
    sample_rate: int
    channels: str
    quality: str
    policy: SegmentPolicy


def process_item(task: DecodeTask, spec: DecodeSpec) -> DecodeResult:
    """fetch -> decode -> segment for one item; every exception becomes a Failure naming the stage."""
    item = task.item
    try:
        fetched = spec.source.fetch(item)
    except Exception as e:  # noqa: BLE001 - any fetch error is this item's failure, not the run's
        return DecodeResult(item, task.unit, failure=_failure(item, "read", "unreadable", e))
    if fetched.metadata:
        item = dataclasses.replace(item, metadata={**item.metadata, **fetched.metadata})
    try:
        audio = decode_audio(fetched.data, target_sr=spec.sample_rate, channels=spec.channels,
                             quality=spec.quality, name=fetched.name)
    except AudioError as e:
        return DecodeResult(item, task.unit, failure=_failure(item, "decode", e.reason, e))
    except Exception as e:  # noqa: BLE001
        return DecodeResult(item, task.unit, failure=_failure(item, "decode", "error", e))
    cut = segment_item(item, task.unit, audio, spec.policy)
    audio_s = audio.samples.shape[-1] / audio.sample_rate
    if not cut.segments:
        reason = f"shorter than segment.min_s ({audio_s:.3f} s)"
        failure = Failure(item.id, item.source, "policy", "too_short", "Skipped", reason)
        return DecodeResult(item, task.unit, failure=failure, audio_s=audio_s, dropped_s=cut.dropped_s)
    return DecodeResult(item, task.unit, cut.segments, None, audio_s, cut.dropped_s)


def _failure(item: AudioItem, stage: str, reason: str, error: BaseException) -> Failure:
    return Failure(item.id, item.source, stage, reason, type(error).__name__, str(error)[:2000])


def _worker_main(conn: Connection, spec: DecodeSpec) -> None:
    """Worker loop: announce each task before running it, so the parent knows which item a crash belongs to."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        seq, task = msg
        conn.send(("start", seq, None))
        conn.send(("done", seq, process_item(task, spec)))


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    assigned: collections.deque = field(default_factory=collections.deque)  # (seq, task) sent, not finished
    started: tuple[int, float] | None = None  # (seq, start time) of the task it is running


class DecodePool:
    """A fixed number of decode processes with per-item crash and hang isolation.

    Args:
        spec: what workers decode with.
        workers: process count; 0 decodes in the calling process (no isolation, for debugging).
        timeout_s: seconds one item may run before its worker is killed and the item failed.
        depth: tasks queued per worker, so a worker never waits for the parent between items.
    """

    def __init__(self, spec: DecodeSpec, workers: int, timeout_s: float, depth: int = 2):
        self.spec, self.n_workers, self.timeout_s, self.depth = spec, workers, timeout_s, depth
        self._ctx = mp.get_context("spawn")  # fork after torch/CUDA init is unsafe
        self._pending: collections.deque[tuple[int, DecodeTask]] = collections.deque()
        self._results: queue.Queue = queue.Queue()
        self._workers: list[_Worker] = []
        self._seq = 0
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(workers):
            self._workers.append(self._spawn())
        self._collector = threading.Thread(target=self._collect, daemon=True) if workers else None
        if self._collector:
            self._collector.start()

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.spec), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def submit(self, task: DecodeTask) -> None:
        with self._lock:
            self._pending.append((self._seq, task))
            self._seq += 1

    @property
    def outstanding(self) -> int:
        """Tasks submitted whose result has not been returned by ``poll`` yet."""
        with self._lock:
            return len(self._pending) + sum(len(w.assigned) for w in self._workers) + self._results.qsize()

    def poll(self, timeout: float) -> list[DecodeResult]:
        """Dispatch queued tasks, reap crashed/hung workers, and return finished results (waits up to ``timeout``)."""
        if not self.n_workers:
            return self._run_inline()
        with self._lock:
            self._reap()
            self._dispatch()
        out: list[DecodeResult] = []
        try:
            out.append(self._results.get(timeout=timeout))
            while True:
                out.append(self._results.get_nowait())
        except queue.Empty:
            pass
        return out

    def _run_inline(self) -> list[DecodeResult]:
        if not self._pending:
            return []
        _, task = self._pending.popleft()
        return [process_item(task, self.spec)]

    def _dispatch(self) -> None:
        for w in self._workers:
            while self._pending and len(w.assigned) < self.depth:
                seq, task = self._pending.popleft()
                w.assigned.append((seq, task))
                w.conn.send((seq, task))

    def _reap(self) -> None:
        """Replace workers that died or overran the timeout; fail their running item, requeue the rest."""
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            hung = w.started is not None and now - w.started[1] > self.timeout_s
            if w.proc.is_alive() and not hung:
                continue
            if hung:
                w.proc.kill()
            w.proc.join(timeout=5)
            self._fail_running(w, hung)
            w.conn.close()
            self._workers[i] = self._spawn()

    def _fail_running(self, w: _Worker, hung: bool) -> None:
        running = w.started[0] if w.started else None
        for seq, task in reversed(w.assigned):
            if seq != running:
                self._pending.appendleft((seq, task))
                continue
            if hung:
                err = TimeoutError(f"decoding took longer than decode.timeout_s={self.timeout_s:g}s; worker killed")
                failure = _failure(task.item, "timeout", "timeout", err)
            else:
                err = RuntimeError(f"decoder process died with exit code {w.proc.exitcode}")
                failure = _failure(task.item, "crash", "crash", err)
            self._results.put(DecodeResult(task.item, task.unit, failure=failure))

    def _collect(self) -> None:
        """Collector thread: drain every worker pipe into the result queue."""
        while not self._closed:
            with self._lock:
                conns = {w.conn: w for w in self._workers}
            for conn in wait(list(conns), timeout=0.05):
                try:
                    kind, seq, payload = conn.recv()
                except (EOFError, OSError):
                    continue  # the worker died; _reap handles it
                with self._lock:
                    self._on_message(conns[conn], kind, seq, payload)

    def _on_message(self, w: _Worker, kind: str, seq: int, payload: DecodeResult | None) -> None:
        if kind == "start":
            w.started = (seq, time.monotonic())
            return
        w.started = None
        w.assigned = collections.deque((s, t) for s, t in w.assigned if s != seq)
        self._results.put(payload)

    def close(self) -> None:
        """Stop every worker now (a clean stop abandons queued tasks; their units are redone on resume)."""
        self._closed = True
        if self._collector:
            self._collector.join(timeout=2)
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            w.proc.join(timeout=0.5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=5)
