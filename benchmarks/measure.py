"""Run one benchmark stage as a child process and measure it from outside: wall time, CPU time, peak memory.

Why a child per stage: a process's peak RSS never goes down, so stages measured in one process would each
report the largest peak so far. Each stage gets a fresh process, and three memory numbers, because none alone is
honest for a process tree (the pipeline has decode workers, ``torchrun`` has ranks):

- ``peak_rss_mb``: ``ru_maxrss`` from ``wait4``: exact (the kernel tracks it), but for the single largest process
  of the tree (Linux reports the max over the child and its reaped descendants, not their sum).
- ``peak_tree_rss_mb``: the sum of RSS over the whole tree, sampled every ``interval_s``. Counts shared pages
  (libtorch's code, mapped once per process) in every process, so it overstates; sampling can miss a short peak.
- ``peak_tree_pss_mb``: the same sum in PSS (shared pages split between their users), sampled less often since
  reading ``smaps_rollup`` costs more. The fairest "memory this job needs" of the three.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Measured:
    """What ``run_measured`` saw of one child process tree."""

    returncode: int
    wall_s: float
    cpu_s: float  # user + system of the child and every descendant it reaped (decode workers, ranks)
    peak_rss_mb: float
    peak_tree_rss_mb: float
    peak_tree_pss_mb: float | None
    max_processes: int
    log: str  # the child's stdout + stderr, last 4000 characters


def run_measured(cmd: list[str], log_path: Path, env: dict[str, str] | None = None, timeout_s: float | None = None,
                 interval_s: float = 0.2, pss_every: int = 5) -> Measured:
    """Run ``cmd``, sample its process tree's memory until it exits, and reap it with ``wait4``.

    Args:
        cmd: the command; it runs in its own session so a timeout can kill the whole tree.
        log_path: where the child's stdout and stderr go.
        env: the child's environment (None: this one's).
        timeout_s: kill the tree after this long (returncode is then negative).
        interval_s: RSS sampling period in seconds.
        pss_every: sample PSS every this many RSS samples.
    """
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = _TreeSampler(proc.pid, interval_s, pss_every)
        sampler.start()
        timer = threading.Timer(timeout_s, _kill_tree, (proc.pid,)) if timeout_s else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        if timer:
            timer.cancel()
        sampler.stop()
    return Measured(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
        peak_tree_rss_mb=sampler.peak_rss / 2**20,
        peak_tree_pss_mb=sampler.peak_pss / 2**20 if sampler.peak_pss else None,
        max_processes=sampler.max_processes,
        log=log_path.read_text(errors="replace")[-4000:],
    )


def _kill_tree(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _TreeSampler(threading.Thread):
    """Polls the RSS (and now and then the PSS) of a process and all its descendants; keeps the peaks."""

    def __init__(self, pid: int, interval_s: float, pss_every: int):
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.pss_every = pid, interval_s, pss_every
        self.peak_rss = self.peak_pss = self.max_processes = 0
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def run(self) -> None:
        n = 0
        while not self._stop_event.is_set():
            pids = self._tree()
            self.max_processes = max(self.max_processes, len(pids))
            self.peak_rss = max(self.peak_rss, sum(_rss(p) for p in pids))
            if n % self.pss_every == 0:
                self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in pids))
            n += 1
            self._stop_event.wait(self.interval_s)

    def _tree(self) -> list[int]:
        try:
            root = psutil.Process(self.pid)
            return [self.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.Error:
            return []


def _rss(pid: int) -> int:
    """Resident bytes from ``/proc/<pid>/statm`` (cheap); 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    """Proportional set size in bytes from ``/proc/<pid>/smaps_rollup``; 0 when unavailable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0
