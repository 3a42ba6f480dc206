"""How tokctl measures speed: one way for every command and benchmark.

- What is compared (a method and its baseline, several tree sizes, several codecs) runs in the
  same process on the same inputs, interleaved item by item with the order rotating, after
  untimed warm-up calls: slow drift of a shared machine then hits every contender alike.
- A call is timed on the wall clock between device synchronisations, so queued GPU work counts.
- Speed is a ratio. ``speedup`` is the method's throughput over the baseline's, totals over all
  items; the per-item ratios give its spread, ``speedup_median``, ``speedup_q25`` and
  ``speedup_q75``, always with one quantile definition: numpy's default (linear interpolation
  between order statistics, the "inclusive" method of Python's ``statistics``).
"""

from __future__ import annotations

import time
from typing import Callable, Hashable, Mapping, Sequence, TypeVar

import numpy as np
import torch

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

SPEEDUP_KEYS = ("speedup", "speedup_median", "speedup_q25", "speedup_q75")


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[float, T]:
    """Seconds one call takes, the device's queue drained before and after; and its result."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def rotated(items: Sequence[T], index: int) -> list[T]:
    """The order in which contenders run on the ``index``-th item: rotated by one per item, so
    that each goes first equally often (with two: A, B, then B, A)."""
    items = list(items)
    if not items:
        return items
    shift = index % len(items)
    return items[shift:] + items[:shift]


def interleaved(calls: Mapping[K, Callable[[], T]], index: int,
                device: torch.device | str | None = None) -> dict[K, tuple[float, T]]:
    """Each call once, in the rotated order for item ``index``: {key: (seconds, result)}."""
    return {key: timed(calls[key], device) for key in rotated(list(calls), index)}


def round_robin(calls: Mapping[K, Callable[[], object]], rounds: int, warmup: int = 1,
                device: torch.device | str | None = None,
                after: Callable[[K], None] | None = None) -> dict[K, list[float]]:
    """Seconds per call of every contender over ``rounds`` interleaved rounds, after ``warmup``
    untimed rounds; ``after(key)`` runs untimed after each call (e.g. to roll back state)."""
    times: dict[K, list[float]] = {key: [] for key in calls}
    for r in range(max(0, warmup) + max(1, rounds)):
        for key in rotated(list(calls), r):
            seconds, _ = timed(calls[key], device)
            if after is not None:
                after(key)
            if r >= warmup:
                times[key].append(seconds)
    return times


def quantiles(values: Sequence[float]) -> tuple[float, float, float] | tuple[None, None, None]:
    """(25th percentile, median, 75th percentile): tokctl's one quantile definition."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, None
    q25, med, q75 = np.quantile(np.asarray(xs, dtype=float), [0.25, 0.5, 0.75])
    return float(q25), float(med), float(q75)


def median(values: Sequence[float]) -> float | None:
    return quantiles(values)[1]


def ratio(baseline_s: float, method_s: float, baseline_work: float = 1.0,
          method_work: float = 1.0) -> float | None:
    """The method's throughput (work per second) over the baseline's."""
    if method_s <= 0 or baseline_s <= 0 or baseline_work <= 0:
        return None
    return (method_work / method_s) / (baseline_work / baseline_s)


def speedup_figures(overall: float | None, per_item: Sequence[float | None]) -> dict[str, float | None]:
    """The four speed keys every command writes to metrics.json."""
    q25, med, q75 = quantiles([r for r in per_item if r is not None])
    return {"speedup": overall, "speedup_median": med, "speedup_q25": q25, "speedup_q75": q75}


def compare(baseline_s: Sequence[float], method_s: Sequence[float],
            baseline_work: Sequence[float] | None = None,
            method_work: Sequence[float] | None = None) -> dict[str, float | None]:
    """Speed figures from paired per-item times (and the work each did, e.g. new tokens; equal
    work when omitted): ``speedup`` from the totals, the spread from the per-item ratios."""
    n = len(baseline_s)
    if len(method_s) != n:
        raise ValueError("baseline and method times must be paired item by item")
    bw = list(baseline_work) if baseline_work is not None else [1.0] * n
    mw = list(method_work) if method_work is not None else [1.0] * n
    overall = ratio(sum(baseline_s), sum(method_s), sum(bw), sum(mw)) if n else None
    return speedup_figures(overall, [ratio(b, m, x, y) for b, m, x, y in
                                     zip(baseline_s, method_s, bw, mw)])
