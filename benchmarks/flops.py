"""FLOP counts with ``torch.utils.flop_counter.FlopCounterMode`` (Table 1, "Complexity per Layer").

``FlopCounterMode`` counts matrix products and convolutions at 2 FLOPs per multiply-add; elementwise
work (softmax, tanh, sigmoid, bias adds) is not counted. It only sees the aten ops that run, so a
fused kernel it has no formula for counts as 0: on CPU that is the case for ``nn.LSTM`` and for
torch's flash-attention CPU kernel behind ``F.scaled_dot_product_attention``. The suite therefore
counts each layer twice, as it runs ("direct") and through a countable equivalent that computes the
same function ("counted"; see :mod:`benchmarks.table1`), and reports both.

The counter needs only shapes, so a layer built on the ``meta`` device counts the same FLOPs as on
CPU without computing or allocating anything: that is how the crossover search counts attention at
lengths where its n×n scores would not fit in memory. A recurrence is counted once over its longest
length, reading the running total after every time step (:func:`cumulative_flops`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> dict:
    """Run ``fn()`` once under ``FlopCounterMode``; return the total and the count per aten op."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


def math_sdpa() -> contextlib.AbstractContextManager:
    """Run ``F.scaled_dot_product_attention`` as its plain-matmul MATH backend, which the counter sees."""
    return sdpa_kernel(SDPBackend.MATH)


def cumulative_flops(steps: Iterable[object]) -> list[int]:
    """Running FLOP count after each item of ``steps``, consumed under one ``FlopCounterMode``.

    ``steps`` is an iterator that does its work lazily (e.g. :meth:`UnrolledRecurrence.stepwise`):
    entry ``t`` is the count of everything run up to and including item ``t``.
    """
    totals = []
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for _ in steps:
            totals.append(int(counter.get_total_flops()))
    return totals
