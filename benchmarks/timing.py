"""Timing workloads against each other: in turn, round by round, with paired ratios.

A shared GPU's clock, temperature and neighbours drift while a benchmark runs. Timing one
workload's runs after another's credits that drift to whichever ran in the better minute.
Taken in turn (A B C A B C ...), every round compares the workloads under the same conditions,
and the ratio of two of them is taken round by round (:func:`paired_ratio`): one disturbed
round moves the median of the per-round ratios less than it moves either workload's rates.
"""

from __future__ import annotations

import math
import statistics
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(run: Callable[[], int], device: torch.device) -> float:
    """Slices/s of one ``run`` (it returns the slices it processed). The device is synchronised
    only around the run, as in training, where the host queues the next step while the device
    computes this one; a sync after every step would add the host's own time to every figure."""
    sync(device)
    start = time.perf_counter()
    slices = run()
    sync(device)
    return slices / (time.perf_counter() - start)


class Candidate(NamedTuple):
    """One workload: ``run`` does one timed run and returns the slices it processed; ``warmup``
    runs once before timing; ``autotune`` is the cuDNN setting it runs under (None: leave it).

    ``alone``: timed in consecutive runs after the others instead of in turn with them, for a
    workload that works between its own runs (DataLoader workers fill their prefetch queue
    while the others are timed, and would start every run of theirs with batches ready).

    cuDNN keeps one plan per convolution shape for the whole process, whichever setting found
    it; so the first candidate to meet a shape decides its plan, and ``autotune`` only holds
    for shapes a candidate meets first. Put the autotuned candidates first.
    """

    run: Callable[[], int]
    warmup: Callable[[], object]
    autotune: bool | None = None
    alone: bool = False


def measure_in_turn(
    candidates: dict[str, Candidate], rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Slices/s of each candidate in each of ``rounds`` timed runs: in turn, in the given order
    (``alone`` candidates after, each in a block). A candidate that fails is printed; its
    rounds from then on are NaN, and the others go on."""
    failed: set[str] = set()

    def attempt(name: str, candidate: Candidate, fn: Callable[[], object]) -> object | None:
        if name in failed:
            return None
        if candidate.autotune is not None:
            torch.backends.cudnn.benchmark = candidate.autotune
        try:
            return fn()
        except Exception:  # a benchmark reports what it could measure
            traceback.print_exc()
            print(f"[{name}] FAILED", flush=True)
            failed.add(name)
            return None

    def timed(name: str, candidate: Candidate) -> float:
        rate = attempt(name, candidate, partial(timed_run, candidate.run, device))
        return math.nan if rate is None else float(rate)

    rates: dict[str, list[float]] = {name: [] for name in candidates}
    together = {name: c for name, c in candidates.items() if not c.alone}
    for name, candidate in together.items():
        attempt(name, candidate, candidate.warmup)
    for _ in range(rounds):
        for name, candidate in together.items():
            rates[name].append(timed(name, candidate))
    for name, candidate in candidates.items():
        if candidate.alone:
            attempt(name, candidate, candidate.warmup)
            rates[name] = [timed(name, candidate) for _ in range(rounds)]
    return rates


def median_rate(rates: list[float] | None) -> float:
    """The median of the rounds that were measured (NaN if none was)."""
    measured = [r for r in rates or [] if math.isfinite(r)]
    return statistics.median(measured) if measured else math.nan


def paired_ratio(rates: dict[str, list[float]], name: str, reference: str) -> dict[str, float]:
    """``name`` over ``reference``: the median of the per-round ratios, their range and the
    number of rounds in which both were measured."""
    pairs = [
        a / b
        for a, b in zip(rates.get(name, []), rates.get(reference, []), strict=False)
        if math.isfinite(a) and math.isfinite(b) and b > 0
    ]
    if not pairs:
        return {"ratio": math.nan, "ratio_min": math.nan, "ratio_max": math.nan, "rounds": 0}
    return {
        "ratio": statistics.median(pairs),
        "ratio_min": min(pairs),
        "ratio_max": max(pairs),
        "rounds": len(pairs),
    }
