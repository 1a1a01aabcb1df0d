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
