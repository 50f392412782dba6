"""Shared measuring tools of the kernel suites: timing with spread, peak memory, the device's own limits.

Timing on CUDA uses ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, every run kept so
the spread can be reported); on CPU, ``time.perf_counter`` around each call. Device limits are measured
by the run itself (METHOD.md): a large device-to-device copy for bandwidth (bytes read + written) and a
large matrix product for FLOP/s, so every "% of peak" in a report divides by a number the same run made.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

from .stats import summarize


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, *, warmup_ms: int = 25, rep_ms: int = 100,
            cpu_repeats: int = 5) -> dict:
    """Median/quartiles/min/max (seconds) of ``fn()`` run repeatedly, and how many runs were timed."""
    if device == "cuda":
        from triton.testing import do_bench

        return summarize([t / 1e3 for t in do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")])
    fn()  # warm-up (and compilation, for torch.compile'd peers)
    times = []
    for _ in range(cpu_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summarize(times)


def peak_memory(fn: Callable[[], object], device: str) -> int | None:
    """Bytes allocated at the peak of ``fn()`` beyond what was allocated before it (CUDA only; None on CPU)."""
    if device != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def device_limits(device: str, dtype: torch.dtype) -> dict:
    """Measured copy bandwidth (GB/s, bytes read + written) and matmul rate (TFLOP/s at ``dtype``)."""
    n_copy = 2**28 if device == "cuda" else 2**24  # elements: far beyond any L2 cache
    src = torch.randn(n_copy, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device)
    size = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    mm = time_fn(lambda: a @ b, device)
    del src, dst, a, b
    return {
        "copy_bytes": 2 * n_copy * torch.finfo(dtype).bits // 8,
        "copy_time": copy,
        "copy_gb_per_s": 2 * n_copy * torch.finfo(dtype).bits / 8 / copy["median_s"] / 1e9,
        "matmul_shape": [size, size, size],
        "matmul_time": mm,
        "matmul_tflop_per_s": 2 * size**3 / mm["median_s"] / 1e12,
        "dtype": str(dtype).removeprefix("torch."),
        "method": "median of the suite's own timings of dst.copy_(src) and a @ b on random data",
    }
