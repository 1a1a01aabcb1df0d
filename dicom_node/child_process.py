"""What every child process of ``serve`` (receivers, workers) does first: die with its parent.

After ``kill -9`` of the service (or the kernel's OOM killer), an orphaned worker would go on
running a job the restarted service runs again, and an orphaned receiver would go on
accepting images on the old listening socket with the old configuration, beside the new
service. Linux's PR_SET_PDEATHSIG has the kernel kill the child when the thread that started
it ends; the service starts its children from threads that live as long as it does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from dataclasses import dataclass
from typing import ClassVar

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Be killed (SIGKILL) when the parent goes; at once if it is gone already.

    ``parent_pid``: the parent as it was when the child was started; a child whose parent
    died before this call is already re-parented, and PR_SET_PDEATHSIG would never fire.
    """
    with contextlib.suppress(Exception):  # not Linux: children outlive a killed parent
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


@dataclass
class Restarts:
    """When to start again a child process that exited: at once the first time (a crash, an
    out-of-memory kill), then after 2, 4, ... up to ``MAX_DELAY_S`` while it keeps exiting
    within ``QUICK_S`` of starting (its log file, GPU or index unusable). Starting it every
    second would flood the log and spend the cores that receive images on imports."""

    QUICK_S: ClassVar[float] = 60.0
    MAX_DELAY_S: ClassVar[float] = 60.0

    started: float = 0.0  # monotonic clock
    quick_exits: int = 0  # in a row, not counting stops on purpose
    due: float | None = None  # once an exit is handled: when to start it again

    def exited(self, now: float, *, on_purpose: bool = False) -> float:
        """Record an exit (``on_purpose``: stopped by its supervisor); the delay in seconds."""
        quick = not on_purpose and now - self.started < self.QUICK_S
        self.quick_exits = self.quick_exits + 1 if quick else 0
        delay = (
            0.0 if self.quick_exits <= 1 else min(self.MAX_DELAY_S, 2.0 ** (self.quick_exits - 1))
        )
        self.due = now + delay
        return delay

    def in_a_row(self) -> str:
        """For the log line of a process that keeps exiting as it starts."""
        return (
            f"{self.quick_exits} times in a row within {self.QUICK_S:.0f} s of starting "
            "(its own log lines before each exit say why)"
        )

    def restarted(self, now: float) -> None:
        self.started, self.due = now, None
