"""Forward-pass timing: wall clock on CPU, ``triton.testing.do_bench`` on CUDA.

A measurement is taken in ``rounds``: the suite sweeps every (layer, n) once per round and pools the
runs, so a passing disturbance on a shared machine touches a fraction of each row's runs instead of
all the runs of one row. :func:`benchmarks.stats.summarize` turns the pooled runs into the median
and spread that are reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingPlan:
    """How long to time one (layer, n) in one round.

    CPU: ``warmup`` untimed calls, then timed calls until ``max_repeats`` are done or ``budget_s``
    seconds have passed, but never fewer than ``min_repeats``. CUDA: ``do_bench`` with ``warmup_ms``
    and ``rep_ms``.
    """

    rounds: int = 3
    warmup: int = 3
    min_repeats: int = 10
    max_repeats: int = 100
    budget_s: float = 2.0
    warmup_ms: int = 25
    rep_ms: int = 100


METHODS = {
    "cpu": "time.perf_counter around each call, torch.inference_mode",
    "cuda": "triton.testing.do_bench (CUDA events, L2 cache flushed before each run), torch.inference_mode",
}


def sample_cpu(fn: Callable[[], object], plan: TimingPlan) -> list[float]:
    """Wall times of timed calls of ``fn()`` in seconds, after ``plan.warmup`` untimed ones."""
    with torch.inference_mode():
        for _ in range(plan.warmup):
            fn()
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < plan.max_repeats and (
            len(times) < plan.min_repeats or time.perf_counter() - started < plan.budget_s
        ):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def sample_cuda(fn: Callable[[], object], plan: TimingPlan) -> list[float]:
    """GPU times of ``fn()`` in seconds, every run ``triton.testing.do_bench`` made."""
    from triton.testing import do_bench

    with torch.inference_mode():
        times_ms = do_bench(fn, warmup=plan.warmup_ms, rep=plan.rep_ms, return_mode="all")
    return [t / 1e3 for t in times_ms]


def sample(fn: Callable[[], object], device: str, plan: TimingPlan) -> list[float]:
    """Run times of ``fn`` on ``device`` ("cpu" or "cuda") by the method that suits it (see METHODS)."""
    return sample_cuda(fn, plan) if device == "cuda" else sample_cpu(fn, plan)
