"""Maximum path length measured by Jacobian reachability (Table 1, "Maximum Path Length"; Sec. 4).

The paper's path length is the number of layers a signal crosses between two positions. Here it is
measured: stack layers of one kind (or apply a recurrence one step at a time) and find the fewest
layers after which output position ``n - 1`` depends on input position ``0``, i.e. the Jacobian block
d out[n-1] / d in[0] is nonzero. The block is computed with forward-mode AD (``torch.autograd.forward_ad``)
in float64, with a tangent that is nonzero only at position 0, so one pass through the stack checks
every depth. Structural zeros stay exactly zero in floating point, so "nonzero" is exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD

from .flops import math_sdpa

Steps = Callable[[torch.Tensor], Iterator[torch.Tensor]]


def layer_stack(make_layer: Callable[[int], torch.nn.Module]) -> Steps:
    """Steps that apply ``make_layer(0)``, then ``make_layer(1)``, ... yielding each output."""

    def steps(x: torch.Tensor) -> Iterator[torch.Tensor]:
        for i in itertools.count():
            x = make_layer(i)(x)
            yield x

    return steps


def path_length(steps: Steps, seqlen: int, d_model: int, max_steps: int, seed: int = 0) -> int | None:
    """Fewest steps after which position ``seqlen - 1`` depends on position 0; None if not within ``max_steps``.

    ``steps(x)`` yields the ``(1, seqlen, d_model)`` output after each layer (or recurrence step).
    SDPA runs as its MATH backend here, since the CPU flash kernel has no forward-mode derivative.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, seqlen, d_model, dtype=torch.float64, generator=gen)
    tangent = torch.zeros_like(x)
    tangent[:, 0] = torch.randn(d_model, dtype=torch.float64, generator=gen)
    with torch.no_grad(), fwAD.dual_level(), math_sdpa():
        for count, out in enumerate(itertools.islice(steps(fwAD.make_dual(x, tangent)), max_steps), start=1):
            t = fwAD.unpack_dual(out).tangent
            if t is not None and bool((t[:, seqlen - 1] != 0).any()):
                return count
    return None

