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
import logging
import multiprocessing as mp
import os
import pickle
import queue
import resource
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

import numpy as np

from pipeline.audio import AudioError, open_audio
from pipeline.lifeline import die_with_parent
from pipeline.metadata import MetadataError, row_metadata
from pipeline.segment import SegmentPolicy, StreamSegmenter
from pipeline.sources.base import FetchedAudio, Source
from pipeline.types import AudioItem, Failure, Segment

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class DecodeTask:
    item: AudioItem
    unit: int


@dataclass(slots=True)
class DecodeResult:
    """What a worker reports about one item.

    An item streams: zero or more partial results (``final=False``) carry its segments as they are cut, then one
    final result carries the accounting: ``failure`` (then any segments sent before are void), or the decoded
    duration. A final result never carries segments.
    """

    item: AudioItem
    unit: int
    segments: list[Segment] = field(default_factory=list)
    failure: Failure | None = None
    audio_s: float = 0.0
    dropped_s: float = 0.0
    final: bool = True
    cpu_s: float = 0.0  # final result from a worker process: the item's CPU seconds there (decode, resample, send)

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
    rename: dict[str, str] | None = None  # ``dataset.rename``: the metadata check maps fields as the writer does


Emit = Callable[[DecodeResult], None]


def process_item(task: DecodeTask, spec: DecodeSpec, emit: Emit) -> None:
    """fetch -> stream-decode -> segment one item, emitting segments as they are cut, then the final result.

    Every exception becomes a Failure naming the stage. Memory stays at one decode block plus one window,
    whatever the file length.
    """
    item = task.item
    try:
        fetched = spec.source.fetch(item)
    except Exception as e:  # noqa: BLE001 - any fetch error is this item's failure, not the run's
        reason = getattr(e, "reason", "unreadable")  # e.g. a sidecar too large: ``bad_sidecar``
        return emit(DecodeResult(item, task.unit, failure=_failure(item, "read", reason, e)))
    if fetched.metadata:
        item = dataclasses.replace(item, metadata={**item.metadata, **fetched.metadata})
    if (failure := _check_metadata(item, fetched, spec)) is not None:
        return emit(DecodeResult(item, task.unit, failure=failure))
    stage = "decode"
    try:
        stream = open_audio(fetched.data, target_sr=spec.sample_rate, channels=spec.channels,
                            quality=spec.quality, name=fetched.name)
        cutter = StreamSegmenter(item, task.unit, spec.policy, spec.sample_rate, stream.source_sample_rate,
                                 stream.source_channels)
        for block in stream.blocks:
            stage = "segment"
            _emit_segments(emit, task, cutter.push(block))
            stage = "decode"
        stage = "segment"
        tail, dropped_s = cutter.finish()
        _emit_segments(emit, task, tail)
    except AudioError as e:
        return emit(DecodeResult(item, task.unit, failure=_failure(item, "decode", e.reason, e)))
    except Exception as e:  # noqa: BLE001 - a bug in segmenting must cost the item, not kill the worker
        return emit(DecodeResult(item, task.unit, failure=_failure(item, stage, "error", e)))
    audio_s = cutter.total / spec.sample_rate
    failure = None
    if not cutter.n_segments:
        reason = f"shorter than segment.min_s ({audio_s:.3f} s)"
        failure = Failure(item.id, item.source, "policy", "too_short", "Skipped", reason)
    emit(DecodeResult(item, task.unit, failure=failure, audio_s=audio_s, dropped_s=dropped_s))


def _check_metadata(item: AudioItem, fetched: FetchedAudio, spec: DecodeSpec) -> Failure | None:
    """Fail the item here, naming it and where the value came from, if the writer could not store its metadata."""
    try:
        row_metadata(item.metadata, spec.rename)
    except MetadataError as e:
        where = f"sidecar {fetched.metadata_from}" if fetched.metadata_from and e.field in fetched.metadata else (
            "its listing (manifest line or dataset row)")
        e.args = (f"{e} (from {where})",)
        return _failure(item, "read", "bad_metadata", e)
    return None


def _emit_segments(emit: Emit, task: DecodeTask, segments: list[Segment]) -> None:
    if segments:  # the segments' item: the task's, with the metadata read at fetch time (``_ItemOnce``)
        emit(DecodeResult(segments[0].item, task.unit, segments, final=False))


def _samples(result: DecodeResult) -> int:
    return sum(seg.audio.size for seg in result.segments)


def _failure(item: AudioItem, stage: str, reason: str, error: BaseException) -> Failure:
    # backslashreplace: an error quoting a lone surrogate (a non-UTF-8 name) must not break the failure log.
    message = str(error)[:2000].encode("utf-8", "backslashreplace").decode("utf-8")
    return Failure(item.id, item.source, stage, reason, type(error).__name__, message)


# Test hook (DESIGN: crash-test hooks cost nothing when unset): ``PIPELINE_TEST_DECODE_FAULT=crash:<sub>,hang:<sub>``
# makes a decode worker segfault, or sleep for an hour, when an item's source contains ``<sub>``. The tests use it
# to prove that a decoder which kills or wedges its process costs that item only.
FAULT_ENV = "PIPELINE_TEST_DECODE_FAULT"


def _parse_faults(spec: str) -> list[tuple[str, str]]:
    """``"crash:a,hang:b"`` -> ``[("crash", "a"), ("hang", "b")]``; refuses unknown kinds (a typo would pass silently).

    >>> _parse_faults("crash:bad.wav,hang:slow")
    [('crash', 'bad.wav'), ('hang', 'slow')]
    """
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, needle = part.partition(":")
        if kind not in ("crash", "hang") or not needle:
            raise ValueError(f"{FAULT_ENV}: expected crash:<substring> or hang:<substring>, got {part!r}")
        faults.append((kind, needle))
    return faults


def _inject_fault(faults: list[tuple[str, str]], source: str) -> None:
    for kind, needle in faults:
        if needle not in source:
            continue
        if kind == "hang":
            time.sleep(3600)
        # A real segfault, as a C decoder gives; no core file (core_pattern may write one into the cwd).
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), signal.SIGSEGV)


# Stop signals go to the whole process group (slurmstepd, scancel, Ctrl-C, SLURM's --signal warning): a worker
# killed by one looked like a crashing decoder, so its item was logged as failed and its unit committed with that
# failure (found by signalling a run's group). Workers ignore them; the parent stops and closes the pool itself.
_PARENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _worker_main(conn: Connection, spec: DecodeSpec) -> None:
    """Worker loop: announce each task before running it, so the parent knows which item a crash belongs to."""
    # A worker's end of the pipe tells it its rank died only when it next reads or writes: one wedged in a decoder
    # (or busy with a long file) lived on after a kill -9 of its rank.
    parent = mp.parent_process()
    die_with_parent(signal.SIGKILL, parent.pid if parent is not None else None)
    for sig in _PARENT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    faults = _parse_faults(os.environ.get(FAULT_ENV, ""))
    fd = conn.fileno()
    while True:
        msg = conn.recv()
        if msg is None:
            return
        seq, task = msg
        send_message(fd, ("start", seq, None))
        _inject_fault(faults, task.item.source)
        t0 = time.process_time()
        once = _ItemOnce()
        process_item(task, spec, lambda r: send_message(fd, ("done" if r.final else "part", seq,
                                                             _with_cpu(once.slim(r), t0))))


class _ItemOnce:
    """Worker side of the wire rule "an item's metadata travels once": the first message of a task carries its item
    whole, later ones a copy without metadata, and the parent (``DecodePool._on_message``) gives every segment the
    first message's item back. Each part used to carry the item again, and the parent unpickled a new copy per
    part: an 18 MB sidecar on a 12-minute file made 6.8 GB of copies. Pipes keep order, so "first" is exact."""

    def __init__(self) -> None:
        self.sent: AudioItem | None = None
        self.stub: AudioItem | None = None

    def slim(self, result: DecodeResult) -> DecodeResult:
        if self.sent is None:
            self.sent = result.item
            return result
        if self.stub is None:
            self.stub = dataclasses.replace(self.sent, metadata={})
        result.item = self.stub
        result.segments = [dataclasses.replace(seg, item=self.stub) for seg in result.segments]
        return result


def _with_cpu(result: DecodeResult, t0: float) -> DecodeResult:
    """A final result carries the item's CPU time in this worker (how busy decoding keeps the workers)."""
    if result.final:
        result.cpu_s = time.process_time() - t0
    return result


# Worker -> parent messages: a protocol-5 pickle whose arrays travel out of band, each written straight from its
# memory and read straight into a fresh buffer (one kernel copy per side). Connection.send/recv instead pickle
# the audio into a bytes object, read it back in 64 KB chunks through a BytesIO, then copy it out again
# (pickling and sending were 17% of a decode worker's time, profiled). Tasks (small) still go by Connection.send.
_FRAME = struct.Struct("<II")  # pickle length, number of out-of-band buffers


def send_message(fd: int, msg: Any) -> None:
    """Write ``msg`` to ``fd`` (see ``_FRAME``); blocks while the reader is behind (the pool's backpressure)."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(msg, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    _write_all(fd, _FRAME.pack(len(head), len(raws)) + sizes + head)
    for raw in raws:
        _write_all(fd, raw)


def recv_message(fd: int) -> Any:
    """Read one ``send_message`` message. Raises EOFError when the writer is gone, even mid-message."""
    n_head, n_buffers = _FRAME.unpack(_read_exact(fd, _FRAME.size))
    sizes = struct.unpack(f"<{n_buffers}Q", _read_exact(fd, 8 * n_buffers)) if n_buffers else ()
    head = _read_exact(fd, n_head)
    buffers = [_read_exact(fd, size) for size in sizes]
    return pickle.loads(head, buffers=buffers)


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int) -> np.ndarray:
    """``n`` bytes from ``fd`` in a new uint8 array (np.empty: no zero-filling, unlike bytearray)."""
    out = np.empty(n, dtype=np.uint8)
    view = memoryview(out)
    while view:
        got = os.readv(fd, [view])
        if got == 0:
            raise EOFError("decode worker pipe closed")
        view = view[got:]
    return out


# Seconds a killed worker may take to die before it is abandoned (see ``DecodePool._kill_overdue``).
_KILL_GRACE_S = 10.0


def _describe_exit(code: int | None) -> str:
    """``died with exit code 1``, or ``was killed by SIGSEGV`` for a negative (signal) exit code."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"died with exit code {code}"


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    assigned: collections.deque = field(default_factory=collections.deque)  # (seq, task) sent, not finished
    started: tuple[int, float] | None = None  # (seq, start time) of the task it is running
    killed_at: float | None = None  # when it was killed for overrunning the timeout (its EOF is still to come)
    spoke: bool = False  # sent at least one message (a worker that dies before is broken, not its item)


class DecodePool:
    """A fixed number of decode processes with per-item crash and hang isolation.

    Threads: the caller's thread submits, dispatches (sends tasks) and polls results. One collector thread owns
    every pipe's read end and the workers' lifecycle: it drains messages, kills a worker that overruns the
    timeout, and replaces a worker once its pipe reports EOF. EOF comes only after every message the worker
    sent, so by then we know exactly which of its tasks finished, which one it was running (failed as ``crash``
    or ``timeout``) and which it never started (queued again, ahead of the rest). The pipe is closed by the
    thread that reads it, never under a reader's feet.

    Args:
        spec: what workers decode with.
        workers: process count; 0 decodes in the calling process (no isolation, for debugging).
        timeout_s: seconds one item may run before its worker is killed and the item failed.
        depth: tasks queued per worker, so a worker never waits for the parent between items.
        max_buffered_samples: decoded samples (segments not yet taken by ``poll``) past which the collector stops
            reading pipes, so workers block on send: the caller's pace bounds memory. None = unbounded.
    """

    # Workers dying before they say anything, in a row: a broken environment (spawn cannot import the pipeline,
    # a bad interpreter), not a bad file. Respawning would loop forever, so the run stops with the exit code.
    MAX_SILENT_DEATHS = 5

    def __init__(self, spec: DecodeSpec, workers: int, timeout_s: float, depth: int = 2,
                 max_buffered_samples: int | None = None):
        self.spec, self.n_workers, self.timeout_s, self.depth = spec, workers, timeout_s, depth
        self.max_buffered_samples = max_buffered_samples
        self._buffered_samples = 0  # audio samples in parts queued for poll
        self._finals_queued = 0  # final results queued for poll (items, unlike parts)
        self._ctx = mp.get_context("spawn")  # fork after torch/CUDA init is unsafe
        self._pending: collections.deque[tuple[int, DecodeTask]] = collections.deque()
        self._results: queue.Queue = queue.Queue()
        self._workers: list[_Worker] = []
        self._seq = 0
        self._items: dict[int, AudioItem] = {}  # task seq -> its item, from the task's first message
        self._lock = threading.Lock()
        self._closed = False
        self._silent_deaths = 0
        self._error: BaseException | None = None
        self.replaced = 0  # workers replaced after a crash or a timeout (for logs and tests)
        self.receive_cpu_s = 0.0  # the collector thread's CPU seconds (reading the pipes)
        _parse_faults(os.environ.get(FAULT_ENV, ""))  # a typo in the test hook fails here, not in every worker
        for _ in range(workers):
            self._workers.append(self._spawn())
        self._collector = threading.Thread(target=self._collect, daemon=True) if workers else None
        if self._collector:
            self._collector.start()

    def _spawn(self) -> _Worker:
        # A worker's parent-death signal (lifeline.py) comes when the *thread* that started it ends: here the main
        # thread or the collector, which both live until close() stops the workers anyway.
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.spec), daemon=True)
        proc.start()
        child.close()  # our copy; the worker's end is then the only one, so its death reads as EOF here
        return _Worker(proc, parent)

    def submit(self, task: DecodeTask) -> None:
        with self._lock:
            self._pending.append((self._seq, task))
            self._seq += 1

    @property
    def outstanding(self) -> int:
        """Tasks submitted whose result has not been returned by ``poll`` yet."""
        with self._lock:
            return len(self._pending) + sum(len(w.assigned) for w in self._workers) + self._finals_queued

    def poll(self, timeout: float) -> list[DecodeResult]:
        """Dispatch queued tasks and return finished results (waits up to ``timeout`` seconds for the first).

        Raises:
            RuntimeError: workers cannot start at all (see ``MAX_SILENT_DEATHS``).
        """
        if not self.n_workers:
            return self._run_inline()
        with self._lock:
            if self._error is not None:
                raise self._error
            self._dispatch()
        out: list[DecodeResult] = []
        try:
            out.append(self._results.get(timeout=timeout))
            while True:
                out.append(self._results.get_nowait())
        except queue.Empty:
            pass
        with self._lock:
            for r in out:
                self._finals_queued -= r.final
                self._buffered_samples -= _samples(r)
        return out

    def _put(self, result: DecodeResult) -> None:
        """Queue a result for ``poll`` (collector thread, under the lock)."""
        self._finals_queued += result.final
        self._buffered_samples += _samples(result)
        self._results.put(result)

    def _run_inline(self) -> list[DecodeResult]:
        if not self._pending:
            return []
        _, task = self._pending.popleft()
        out: list[DecodeResult] = []
        process_item(task, self.spec, out.append)
        return out

    def _dispatch(self) -> None:
        """Hand queued tasks out, each to the live worker with the fewest: every worker gets one before any gets a
        second. Filling workers in order, up to ``depth`` each, left the last ones idle whenever fewer than
        ``depth x workers`` items were in flight, which the loop's claiming rule allows (``Runner._feed``)."""
        live = [w for w in self._workers if w.killed_at is None]
        while self._pending and live:
            w = min(live, key=lambda w: len(w.assigned))
            if len(w.assigned) >= self.depth:
                return
            seq, task = self._pending.popleft()
            w.assigned.append((seq, task))
            try:
                w.conn.send((seq, task))
            except OSError:  # BrokenPipeError: it just died; the collector requeues what it was given
                live.remove(w)

    def _collect(self) -> None:
        """Collector thread: drain every worker pipe into the result queue; kill overdue workers, replace dead ones."""
        t0 = time.thread_time()
        try:
            while not self._closed:
                self._collect_once()
                self.receive_cpu_s = time.thread_time() - t0
        except BaseException as e:  # noqa: BLE001 - a bug here must stop the run loudly, not leave it waiting
            with self._lock:
                self._error = e

    def _collect_once(self) -> None:
        if self._backlogged():
            return
        with self._lock:
            conns = {w.conn: w for w in self._workers}
        for conn in wait(list(conns), timeout=0.05):
            w = conns[conn]
            try:
                kind, seq, payload = recv_message(conn.fileno())
            except (EOFError, OSError):  # every message is read and the worker is gone
                with self._lock:
                    self._replace(w)
                continue
            with self._lock:
                self._on_message(w, kind, seq, payload)
        with self._lock:
            self._kill_overdue()

    def _backlogged(self) -> bool:
        """Past the buffer budget: pause reading (workers block on send) and stop the hang clocks meanwhile."""
        with self._lock:
            if self.max_buffered_samples is None or self._buffered_samples <= self.max_buffered_samples:
                return False
        time.sleep(0.01)
        with self._lock:
            for w in self._workers:
                if w.started is not None:
                    w.started = (w.started[0], w.started[1] + 0.01)
        return True

    def _on_message(self, w: _Worker, kind: str, seq: int, payload: DecodeResult | None) -> None:
        w.spoke, self._silent_deaths = True, 0
        if payload is not None:
            self._attach_item(seq, payload, last=kind == "done")
        if kind in ("start", "part"):
            # The timeout counts time without progress: a long file streaming segments is not hung.
            w.started = (seq, time.monotonic())
            if kind == "part":
                self._put(payload)
            return
        w.started = None
        w.assigned = collections.deque((s, t) for s, t in w.assigned if s != seq)
        self._put(payload)
        # Its next task now, not at the loop's next poll: the loop does not poll while batches wait for the codec.
        self._dispatch()

    def _attach_item(self, seq: int, result: DecodeResult, last: bool) -> None:
        """Give the result and its segments the task's item as its first message carried it (``_ItemOnce``): one
        object per item, however many segments share it."""
        first = self._items.pop(seq, None) if last else self._items.setdefault(seq, result.item)
        item = result.item if first is None else first
        result.item = item
        for seg in result.segments:
            seg.item = item

    def _kill_overdue(self) -> None:
        """SIGKILL a worker whose current item overran the timeout; its EOF then arrives and ``_replace`` runs.

        A process blocked in the kernel (a dead NFS mount) dies only when the call returns; after
        ``_KILL_GRACE_S`` it is abandoned and replaced anyway, so one stuck file never stalls the run.
        """
        now = time.monotonic()
        for w in list(self._workers):
            if w.started is not None and w.killed_at is None and now - w.started[1] > self.timeout_s:
                w.killed_at = now
                w.proc.kill()
            elif w.killed_at is not None and now - w.killed_at > _KILL_GRACE_S:
                self._replace(w)

    def _replace(self, w: _Worker) -> None:
        """A worker's pipe is at EOF: fail the item it was running, requeue the rest in order, start a new one."""
        w.proc.join(timeout=1)  # at EOF it has closed its files, so it is exiting already
        w.conn.close()
        why = "killed after decode.timeout_s" if w.killed_at is not None else _describe_exit(w.proc.exitcode)
        log.warning("decode worker pid %s %s; starting a new one", w.proc.pid, why)
        self._fail_running(w)
        self._requeue_unstarted(w)
        self._count_silent_death(w)
        self._workers[self._workers.index(w)] = self._spawn()
        self.replaced += 1

    def _fail_running(self, w: _Worker) -> None:
        if w.started is None:
            return
        running = w.started[0]
        self._items.pop(running, None)
        task = next((t for s, t in w.assigned if s == running), None)
        if task is None:  # its result arrived after all
            return
        if w.killed_at is not None:
            err: Exception = TimeoutError(
                f"decoding took longer than decode.timeout_s={self.timeout_s:g}s; worker killed")
            failure = _failure(task.item, "timeout", "timeout", err)
        else:
            err = RuntimeError(f"decoder process {_describe_exit(w.proc.exitcode)}")
            failure = _failure(task.item, "crash", "crash", err)
        self._put(DecodeResult(task.item, task.unit, failure=failure))
        w.assigned = collections.deque((s, t) for s, t in w.assigned if s != running)

    def _requeue_unstarted(self, w: _Worker) -> None:
        # Tasks the worker received but never announced: they did nothing wrong, so they go first, in order.
        for seq, task in reversed(w.assigned):
            self._pending.appendleft((seq, task))
        w.assigned.clear()

    def _count_silent_death(self, w: _Worker) -> None:
        if w.spoke or self._closed:
            return
        self._silent_deaths += 1
        if self._silent_deaths >= self.MAX_SILENT_DEATHS and self._error is None:
            self._error = RuntimeError(
                f"{self._silent_deaths} decode workers in a row died before decoding anything (last exit code "
                f"{w.proc.exitcode}); the environment is broken, not a file. Try decode.workers=0 to see the error")

    def close(self) -> None:
        """Stop every worker now (a clean stop abandons queued tasks; their units are redone on resume)."""
        self._closed = True
        if self._collector:
            self._collector.join(timeout=2)
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.proc.join(timeout=0.5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=5)
            w.conn.close()
