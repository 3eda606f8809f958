"""Worker processes end when their parent does.

A worker of ``prepare`` or ``predict`` blocks on its pipe to the parent; after a ``kill -9``
of the parent nothing would tell it to go, and while it lives on it holds the command's stdout,
so a pipeline or scheduler waiting on that output would hang. Linux sends a signal of our
choice when the parent dies (``PR_SET_PDEATHSIG``); elsewhere, and as a second line, a thread
watches the parent's PID.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 1.0


def end_with_parent(interval_s: float = WATCH_INTERVAL_S) -> bool:
    """In a process started by ``multiprocessing``: be killed when the parent dies.

    Returns whether the kernel will send the signal (Linux); the PID watch runs in any case.
    The kernel's signal follows the parent *thread* that started this process: the pools of
    this package start their workers from the thread that then waits for them.
    """
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return False
    by_kernel = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            by_kernel = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            pass
    # The parent may have died before the signal was asked for: then it never comes.
    if os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(
        target=_watch, args=(parent.pid, interval_s), name="parent-watch", daemon=True
    ).start()
    return by_kernel


def _watch(parent_pid: int, interval_s: float) -> None:
    # A dead parent's children are re-parented (to init or a subreaper): the PID changes.
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGKILL)
