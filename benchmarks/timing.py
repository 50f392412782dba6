"""Timing of forward and forward+backward passes: wall clock on CPU, ``triton.testing.do_bench`` on CUDA.

A measurement is taken in ``rounds``: the suite sweeps every cell of a grid once per round and keeps
each round's runs apart, so a passing disturbance on a shared machine touches a fraction of each
cell's runs instead of all the runs of one cell. :func:`benchmarks.stats.summarize` turns the runs
into the median and spread that are reported.

Forward passes run under ``torch.inference_mode``; forward+backward passes with grad enabled, the
backward being ``torch.autograd.grad`` of the output (with a fixed random cotangent) with respect to
the input and every parameter, so nothing accumulates between runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TimingPlan:
    """How long to time one cell in one round.

    CPU: ``warmup`` untimed calls, then timed calls until ``max_repeats`` are done or ``budget_s``
    seconds have passed, but never fewer than ``min_repeats``. CUDA: ``do_bench`` with ``warmup_ms``
    and ``rep_ms``.
    """

    rounds: int = 2
    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 30
    budget_s: float = 0.1
    warmup_ms: int = 25
    rep_ms: int = 100


METHODS = {
    "cpu": "time.perf_counter around each call",
    "cuda": "triton.testing.do_bench (CUDA events, L2 cache flushed before each run)",
}
MODES = ("forward", "forward+backward")


def _mode(grad: bool) -> contextlib.AbstractContextManager:
    return torch.enable_grad() if grad else torch.inference_mode()


def sample_cpu(fn: Callable[[], object], plan: TimingPlan, grad: bool = False) -> list[float]:
    """Wall times of timed calls of ``fn()`` in seconds, after ``plan.warmup`` untimed ones."""
    with _mode(grad):
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


def sample_cuda(fn: Callable[[], object], plan: TimingPlan, grad: bool = False) -> list[float]:
    """GPU times of ``fn()`` in seconds, every run ``triton.testing.do_bench`` made."""
    from triton.testing import do_bench

    with _mode(grad):
        times_ms = do_bench(fn, warmup=plan.warmup_ms, rep=plan.rep_ms, return_mode="all")
    return [t / 1e3 for t in times_ms]


def sample(fn: Callable[[], object], device: str, plan: TimingPlan, grad: bool = False) -> list[float]:
    """Run times of ``fn`` on ``device`` ("cpu" or "cuda") by the method that suits it (see METHODS).

    ``grad``: run with autograd enabled (a forward+backward step); otherwise under inference mode.
    """
    return sample_cuda(fn, plan, grad) if device == "cuda" else sample_cpu(fn, plan, grad)


def forward_backward(call: Callable[[torch.Tensor], torch.Tensor], layer: nn.Module, x: torch.Tensor,
                     seed: int = 0) -> Callable[[], object]:
    """A forward+backward step of ``call(x)``: gradients of the output w.r.t. ``x`` and ``layer``'s parameters.

    ``call`` must return a tensor of ``x``'s shape (every layer of the suite does). The cotangent is
    drawn once and kept; ``torch.autograd.grad`` returns the gradients instead of accumulating them
    into ``.grad``, so every run does the same work.
    """
    x = x.detach().requires_grad_(True)
    wrt = [x, *(p for p in layer.parameters() if p.requires_grad)]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    cotangent = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)

    def step():
        return torch.autograd.grad(call(x), wrt, cotangent)

    return step
