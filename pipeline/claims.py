"""Unit claims: how ranks (and independent launches) share units with no collective.

A claim is a file ``.state/claims/unit-NNNNN`` created with ``O_CREAT | O_EXCL`` (atomic on POSIX and NFSv3+),
holding its owner. The owner refreshes its mtime while it works (a heartbeat). A claim is stale, and may be
taken over, when its owner is a dead process on this host, or when its heartbeat is older than the lease
(owner on another host, e.g. a preempted node). So claims of dead runs never block a new run for long, and a
rerun on the same host takes them over at once.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import psutil

from pipeline.layout import OutputLayout


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

    def is_dead_here(self) -> bool:
        """True when the owner ran on this host and that process is gone."""
        if self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) > 1e-3
        except psutil.NoSuchProcess:
            return True


def claim_state(layout: OutputLayout, unit: int, lease_s: float) -> str:
    """``none``, ``live`` or ``stale`` for one unit's claim."""
    path = layout.claim(unit)
    try:
        age = time.time() - path.stat().st_mtime
        owner = Owner(**json.loads(path.read_text()))
    except FileNotFoundError:
        return "none"
    except (json.JSONDecodeError, TypeError):
        # Caught half-written by its creator: live unless it stays like this past the lease.
        return "stale" if age > lease_s else "live"
    return "stale" if owner.is_dead_here() or age > lease_s else "live"


class Claims:
    """Claim, heartbeat and release units for one process.

    Args:
        layout: the output folder.
        lease_s: seconds without heartbeat after which a claim is stale.
    """

    def __init__(self, layout: OutputLayout, lease_s: float):
        self.layout, self.lease_s = layout, lease_s
        self.owner = Owner.me()
        self.held: set[int] = set()
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
            if self._is_stale(unit) and self._take_over(unit):
                return unit
        return None

    def _create(self, unit: int) -> bool:
        try:
            fd = os.open(self.layout.claim(unit), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.owner), f)
        if self.layout.marker(unit).exists():  # finished by someone between our listing and our claim
            os.unlink(self.layout.claim(unit))
            return False
        self.held.add(unit)
        return True

    def _is_stale(self, unit: int) -> bool:
        return claim_state(self.layout, unit, self.lease_s) == "stale"

    def _take_over(self, unit: int) -> bool:
        """Rename the stale claim away (only one contender's rename succeeds), then claim normally."""
        grave = self.layout.claims / f".stale-{unit:05d}-{uuid.uuid4().hex}"
        try:
            os.rename(self.layout.claim(unit), grave)
        except FileNotFoundError:
            return False
        grave.unlink(missing_ok=True)
        return self._create(unit)

    def release(self, unit: int) -> None:
        self.held.discard(unit)
        self.layout.claim(unit).unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.5, self.lease_s / 4)):
            for unit in list(self.held):
                try:
                    os.utime(self.layout.claim(unit))
                except FileNotFoundError:
                    self.held.discard(unit)

    def close(self, release: bool = True) -> None:
        """Stop the heartbeat; by default release every claim so a rerun can take the units at once."""
        self._stop.set()
        if release:
            for unit in list(self.held):
                self.release(unit)
