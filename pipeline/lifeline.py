"""No orphans: a rank dies with its launcher, a decode worker with its rank.

torchrun (and ``accelerate launch``, which runs torchrun's agent in-process) starts each rank in a session of its
own, so a ``kill -9`` of the launcher reaches no rank: they lived on, holding their claims and memory, and waited
hours in the rendezvous (seen: 5 ranks alive 50 minutes later, 375 MB each). Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG)``) is sent by the kernel, so it works while the process is blocked in C++ (a gloo
rendezvous holds the GIL a Python watchdog thread would need).

- A rank under a launcher asks for SIGTERM: the signal torchrun's agent itself sends its ranks on a stop, so an
  orphan stops the same way (the runner's handler: after the current batch, claims released, exit 143; before the
  handler is installed, SIGTERM's default ends a process that holds no claim yet). A rank started by hand (plain
  ``python``, srun) keeps running when its shell goes: that parent is not part of the job.
- A decode worker asks for SIGKILL (it ignores the stop signals, see workers.py): it has nothing to release, and a
  worker wedged in a decoder would otherwise sleep on after its rank died.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Set by torchrun's agent (hence by accelerate launch) in every rank it starts; never by a shell or srun.
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "GROUP_RANK")

_launcher_pid: int | None = None


def launched_by_launcher() -> bool:
    return any(name in os.environ for name in LAUNCHER_ENV)


def die_with_parent(sig: int, parent_pid: int | None = None) -> int | None:
    """Have the kernel send ``sig`` to this process when its parent ends. Returns the parent's pid, or None where
    the platform has no parent-death signal.

    Args:
        sig: the signal to receive.
        parent_pid: the parent expected; default: the current one. A parent that died before the request (the
            process was reparented already) sends nothing, so that case raises ``sig`` at once.
    """
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getppid() if parent_pid is None else parent_pid
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this process may outlive its parent",
                    ctypes.get_errno())
        return None
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return parent


def watch_launcher() -> None:
    """A rank under torchrun / accelerate launch stops (SIGTERM) when its launcher dies; alone, nothing changes."""
    global _launcher_pid
    if launched_by_launcher() and _launcher_pid is None:
        _launcher_pid = die_with_parent(signal.SIGTERM)


def launcher_died() -> bool:
    """True when this rank's launcher is gone (the process was reparented): why a SIGTERM came."""
    return _launcher_pid is not None and os.getppid() != _launcher_pid
