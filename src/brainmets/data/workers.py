"""A crash-tolerant pool of decoding processes, generic over the job.

``prepare`` and ``predict`` decode one patient per job. A decoder's segfault or the OOM killer
takes down one worker: that job gets a failure row and the batch goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import TypeVar

from tqdm.auto import tqdm

from brainmets.lifetime import end_with_parent

log = logging.getLogger(__name__)
T = TypeVar("T")
J = TypeVar("J")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BELOW_BYTES, _FALLBACK_BELOW_BYTES = 1 << 30, 32 << 20


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of returning it to the system.

    glibc serves every allocation above 32 MB (one volume of 40 slices of 512² in float32 is
    42 MB) with fresh pages and returns them when freed, so each patient's arrays would be
    page-faulted and zeroed again. Raising the mmap and trim thresholds to 1 GiB keeps those
    pages for the next patient, at the cost of holding the peak memory. True when both
    thresholds took; False off Linux, without glibc's ``mallopt`` (musl), or where glibc caps
    the mmap threshold at 32 MiB (then that much is set).
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW_BYTES)
    if mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW_BYTES):
        return bool(trimmed)
    # Older glibc (2.26 and earlier at least) refuses an mmap threshold above 32 MiB:
    # take that, which still keeps every per-slice array and the smaller volumes.
    mallopt(_M_MMAP_THRESHOLD, _FALLBACK_BELOW_BYTES)
    log.debug("glibc refused a 1 GiB mmap threshold; arrays above 32 MiB still come and go")
    return False


def init_worker() -> bool:
    """Initializer of a decoding worker; returns whether freed memory is kept.

    A worker ends when the parent does (:func:`brainmets.lifetime.end_with_parent`). The
    parallelism is the processes', so each worker uses one thread (torch and OpenCV
    included). Workers decode patient after patient with arrays of the same few sizes, so
    they keep the memory they free (:func:`keep_freed_memory`).
    """
    # Ctrl-C reaches the whole process group: the parent stops the run and records it; a
    # worker that raised KeyboardInterrupt too would only print its traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A kill -9 of the parent reaches no one else: without this the workers outlive it.
    end_with_parent()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    return keep_freed_memory()


WORKER_DIED = (
    "the worker process died while reading this patient (a crash in a decoder library, or "
    "killed for lack of memory); the other patients went on"
)


def map_jobs(
    fn: Callable[..., T],
    jobs: Sequence[J],
    *args,
    workers: int = 1,
    progress: bool = True,
    desc: str = "prepare",
    on_crash: Callable[[J, str], T] | None = None,
) -> Iterator[T]:
    """``fn(job, *args)`` for every job, in worker processes when ``workers`` > 1.

    Results come in completion order; a progress bar counts patients. Each worker is a
    one-process pool that gets one job at a time, so a worker that dies (a decoder's
    segfault, the OOM killer) is known to have died on that job: ``on_crash(job, reason)``
    gives its result and a new worker takes the slot. One shared pool would fail every job
    in flight and stop the batch. Without ``on_crash`` the crash is raised.
    """
    bar = tqdm(total=len(jobs), desc=desc, unit="patient", disable=not progress)
    slots: list[ProcessPoolExecutor] = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job, *args)
                bar.update()
            return
        # spawn, not fork: the parent may hold torch threads and open file handles.
        context = get_context("spawn")

        def new_worker() -> ProcessPoolExecutor:
            return ProcessPoolExecutor(1, mp_context=context, initializer=init_worker)

        pending = list(reversed(jobs))  # pop() from the end takes them in manifest order
        running: dict[Future, tuple[int, J]] = {}

        def start(slot: int) -> None:
            job = pending.pop()
            running[slots[slot].submit(fn, job, *args)] = (slot, job)

        def start_new(slot: int) -> None:
            # A worker's process starts at its first job. Started with SIGINT ignored, it
            # ignores Ctrl-C from its first instruction: init_worker comes only after its
            # imports, and a Ctrl-C meanwhile would print each worker's traceback.
            with _sigint_ignored():
                start(slot)

        for slot in range(min(workers, len(jobs))):
            slots.append(new_worker())
            start_new(slot)
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                slot, job = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    if on_crash is None:
                        raise
                    slots[slot].shutdown(wait=False)
                    slots[slot] = new_worker()
                    result = on_crash(job, WORKER_DIED)
                    if pending:
                        start_new(slot)
                else:
                    if pending:  # before yielding: the worker goes on while the caller writes
                        start(slot)
                yield result
                bar.update()
    finally:
        for worker in slots:
            worker.shutdown(wait=True, cancel_futures=True)
        bar.close()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process meanwhile (processes started now inherit that); in the
    main thread only, the one thread Python lets change signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
