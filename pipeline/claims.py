"""Unit claims: how ranks (and independent launches) share units with no collective.

A claim is a small object ``.state/claims/unit-NNNNN`` holding its owner, created only if absent (the store's
atomic create: ``O_EXCL`` on a filesystem, ``If-None-Match: *`` on S3). The owner keeps it fresh while it works
(a heartbeat: the file's mtime; on S3, a rewrite of the object whose ``LastModified`` the server sets). A claim
is stale, and may be taken over, when its owner is a dead process on this host, or when its heartbeat is older
than the lease (owner on another host, e.g. a preempted node). The takeover is race-free between two takers
(a rename that only one wins; on S3 an ``If-Match`` on the stale object's ETag that only one matches). So claims
of dead runs never block a new run for long, and a rerun on the same host takes them over at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import PurePath

import psutil

from pipeline.layout import OutputLayout
from pipeline.stores import Lease, OutputStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: host, pid and the process start time (so a reused pid is not mistaken for its owner)."""

    host: str
    pid: int
    started: float
    token: str

    @staticmethod
    def me() -> "Owner":
        return Owner(socket.gethostname(), os.getpid(), psutil.Process().create_time(), uuid.uuid4().hex)

    @staticmethod
    def parse(data: bytes) -> "Owner":
        """Raises ValueError, TypeError or KeyError on a record that is not (yet) whole."""
        record = json.loads(data)
        return Owner(record["host"], record["pid"], record["started"], record["token"])

    def is_dead_here(self) -> bool:
        """True when the owner ran on this host and that process is gone."""
        if self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) > 1e-3
        except psutil.NoSuchProcess:
            return True


def judge(lease: Lease | None, lease_s: float) -> str:
    """``none``, ``live`` or ``stale`` for a claim as read back."""
    if lease is None:
        return "none"
    try:
        owner = Owner.parse(lease.data)
    except (ValueError, TypeError, KeyError):
        # Caught half-written by its creator: live unless it stays like this past the lease.
        return "stale" if lease.age_s > lease_s else "live"
    return "stale" if owner.is_dead_here() or lease.age_s > lease_s else "live"


@contextlib.contextmanager
def heartbeat(store: OutputStore, path: PurePath, record: bytes, lease_s: float) -> Iterator[None]:
    """Keep one held lease (not a unit's: the finalize claim) fresh from a thread while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(0.5, lease_s / 4)):
            try:
                store.refresh_lease(path, record)
            except OSError as e:  # a network hiccup: the lease has room for a few missed beats
                log.warning("heartbeat of %s failed: %s", path, e)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def claim_state(layout: OutputLayout, unit: int, lease_s: float) -> str:
    """``none``, ``live`` or ``stale`` for one unit's claim."""
    return judge(layout.store.read_lease(layout.claim(unit)), lease_s)


class Claims:
    """Claim, heartbeat and release units for one process.

    Args:
        layout: the output folder.
        lease_s: seconds without heartbeat after which a claim is stale.
    """

    def __init__(self, layout: OutputLayout, lease_s: float):
        self.layout, self.store, self.lease_s = layout, layout.store, lease_s
        self.owner = Owner.me()
        self.held: set[int] = set()
        # A release must not interleave with a heartbeat of the same claim (on S3 the heartbeat changes the
        # ETag the conditional delete needs).
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def claim_next(self, n_units: int, start: int = 0) -> int | None:
        """Claim the first free unit at or after ``start`` (wrapping); then take over a stale one; else None."""
        order = [(start + i) % n_units for i in range(n_units)]
        done = self.layout.done_units()
        todo = [u for u in order if u not in done and u not in self.held]
        for unit in todo:
            if self._create(unit):
                return unit
        for unit in todo:
            lease = self.store.read_lease(self.layout.claim(unit))
            if judge(lease, self.lease_s) == "stale" and self._take_over(unit, lease):
                return unit
        return None

    def _record(self) -> bytes:
        """The claim's content: its owner, and when it was written (for people; staleness uses the store's
        clock)."""
        return json.dumps({**asdict(self.owner), "heartbeat": time.time()}).encode()

    def _create(self, unit: int) -> bool:
        if not self.store.create_exclusive(self.layout.claim(unit), self._record()):
            return False
        return self._keep(unit)

    def _take_over(self, unit: int, stale: Lease) -> bool:
        if not self.store.take_over(self.layout.claim(unit), self._record(), stale):
            return False
        log.info("took over the stale claim of unit %d", unit)
        return self._keep(unit)

    def _keep(self, unit: int) -> bool:
        """Hold a unit just claimed, unless someone finished it between our listing and our claim."""
        if self.store.exists(self.layout.marker(unit)):
            self.store.release_lease(self.layout.claim(unit))
            return False
        self.held.add(unit)
        return True

    def held_units(self) -> set[int]:
        """A copy of the units this process holds (the writer thread releases them as it commits)."""
        with self._lock:
            return set(self.held)

    def release(self, unit: int) -> None:
        with self._lock:
            self.held.discard(unit)
            self.store.release_lease(self.layout.claim(unit))

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.5, self.lease_s / 4)):
            for unit in list(self.held):
                try:
                    self._beat(unit)
                except OSError as e:  # a network hiccup: try again next beat, the lease has room for a few
                    log.warning("heartbeat of unit %d's claim failed: %s", unit, e)

    def _beat(self, unit: int) -> None:
        with self._lock:
            self._refresh(unit)

    def _refresh(self, unit: int) -> None:
        """Heartbeat one held claim; a claim that is gone or was taken over is no longer held (under the lock)."""
        if unit in self.held and not self.store.refresh_lease(self.layout.claim(unit), self._record()):
            log.warning("lost the claim of unit %d (gone or taken over): this run will not commit it", unit)
            self.held.discard(unit)

    def confirm(self, unit: int) -> bool:
        """Just before publishing a unit: True while this process still holds its claim (checked now, not at the
        last heartbeat) and no run has committed it. A run paused past its lease (a suspended laptop, a stopped
        process, a stalled filesystem) finds its claim taken over here and must not publish over the new owner's
        work: a second attempt's failures (timeouts, crashes) need not be the first's. (A unit committed by another
        run had its claim taken over, or released: the refresh fails either way.) A store error counts as lost:
        the unit stays open and is encoded again, by this run or another."""
        with self._lock:
            try:
                self._refresh(unit)
            except OSError as e:
                log.warning("cannot confirm the claim of unit %d (%s): not committing it", unit, e)
                self.held.discard(unit)
            return unit in self.held

    def close(self, release: bool = True) -> None:
        """Stop the heartbeat; by default release every claim so a rerun can take the units at once."""
        self._stop.set()
        if release:
            for unit in list(self.held):
                self.release(unit)
