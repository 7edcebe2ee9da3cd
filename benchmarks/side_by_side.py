"""Timing several calls side by side: the ratios between them are what a benchmark on a
shared machine can report honestly.

Each round calls every function once, in turn, so a burst of load from elsewhere hits all
of them alike; the best of the rounds is each one's cost with the least interference.
On the CPU the same rounds are taken twice:

* ``wall``: wall-clock time with the default number of threads (what a user waits for);
* ``cpu1``: one thread (``torch.set_num_threads(1)``, which the native module shares
  through libgomp), timed by the CPU time of the calling thread. That clock stops while
  the thread is descheduled, so on a machine shared with other work it is the steadier
  of the two; a memory-bound call is then bound by what one core can pull.

Every result carries the load average before and after (``os.getloadavg``).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _rounds(fns: dict, rounds: int, clock, sync) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if isinstance(fn, tuple):     # (untimed set-up, timed call)
                fn[0]()
                fn = fn[1]
            sync()
            t0 = clock()
            fn()
            sync()
            times[name].append(clock() - t0)
    return times


def interleaved(fns: dict, rounds: int, device: torch.device, warmup: int = 2) -> dict:
    """``{"wall": {name: {"best_s", "median_s"}}, "cpu1": {...} (CPU only), "load": ...}``.
    A value of ``fns`` is a call, or a pair (set-up, call) whose set-up is not timed."""
    sync = (torch.cuda.synchronize if device.type == "cuda" else (lambda: None))
    before = load()
    _rounds(fns, warmup, time.perf_counter, sync)
    out: dict = {}
    modes = [("wall", time.perf_counter, None)]
    if device.type == "cpu":
        modes.append(("cpu1", time.thread_time, 1))
    for mode, clock, threads in modes:
        saved = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            times = _rounds(fns, rounds, clock, sync)
        finally:
            torch.set_num_threads(saved)
        out[mode] = {k: {"best_s": min(v), "median_s": statistics.median(v)}
                     for k, v in times.items()}
    out["rounds"] = rounds
    out["load"] = {"before": before, "after": load()}
    return out


def ratio(result: dict, num: str, den: str) -> dict[str, float]:
    """best(num) / best(den) per clock."""
    return {mode: result[mode][num]["best_s"] / result[mode][den]["best_s"]
            for mode in ("wall", "cpu1") if mode in result}


def copy_call(nbytes: int, device: torch.device) -> Callable:
    """A device copy of ``nbytes / 2`` bytes: ``nbytes`` moved (read + write)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)
