"""Where each call runs, and a record of where the last one ran.

The rule (README, "Where each call runs"):

* CUDA tensors run the compiled Triton kernels.
* CPU tensors run the same Triton kernels through Triton's interpreter when ``TRITON_INTERPRET=1``
  was set before ``triton`` was first imported (this is how the test suite checks the kernels on a
  machine with no GPU).
* CPU tensors otherwise run the plain PyTorch reference path, so a model built on this library still
  runs on a laptop; so do float64 tensors anywhere (the torch-compatible functions accept them).

``last_path(op)`` answers which of the two paths (``"triton"`` or ``"torch"``) the most recent call of
``op`` took, and ``launch_count(kernel)`` counts Triton launches per kernel name, so a test can prove
the Triton kernel ran rather than the fallback.
"""

from __future__ import annotations

import collections
import contextlib
import os

import torch
import triton

try:  # Triton >= 3.4 reads its settings through knobs; the value is what @triton.jit saw.
    from triton import knobs as _knobs

    INTERPRETER: bool = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # pragma: no cover - older Triton
    INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

OPS = ("attention", "layer_norm", "ffn", "rotary")


def _release(version: str) -> tuple[int, int]:
    """``"3.6.0"`` -> ``(3, 6)``; a development build (``"3.7.0+git1234"``) counts as its release."""
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


TRITON_RELEASE: tuple[int, int] = _release(triton.__version__)
# The Hopper candidates that read through tensor descriptors (attention) or specialize warps (the FFN
# matmul) are offered from this Triton release on. Measured on an H200 with Triton 3.6.0
# (benchmarks/results/NVIDIA_H200-2026-12-04): ptxas (CUDA 12.8, and 12.9 too) dies on the PTX that
# Triton 3.6 writes for some TMA attention programs (22 of the static check's 403 sm_90a launches, all
# TMA attention candidates; none from 3.7.1 or 3.8.0 or 3.9.0), and the warp-specialized matmul loop
# returned wrong values (relative error 0.37 to 0.88; caught by the autotune guard). Earlier releases
# get the pointer candidates, which compiled and agreed there.
HOPPER_CANDIDATES_FROM: tuple[int, int] = (3, 7)


def hopper_candidates() -> bool:
    """Whether this Triton builds the TMA attention and warp-specialized matmul candidates correctly
    (:data:`HOPPER_CANDIDATES_FROM`); Blackwell's TMA candidates, which no GPU has run yet, follow it too."""
    return TRITON_RELEASE >= HOPPER_CANDIDATES_FROM

_last_path: dict[str, str] = {}
_assumed_arch: str | None = None
_launches: collections.Counter[str] = collections.Counter()


def triton_available_for(t: torch.Tensor) -> bool:
    """True when a call on tensor ``t`` runs the Triton kernels (see the module docstring); float64, which
    the kernels do not take, runs the PyTorch path of the functions that accept it."""
    return t.dtype != torch.float64 and (t.is_cuda or (t.device.type == "cpu" and INTERPRETER))


def target_arch(device: torch.device) -> str:
    """The config family of the GPU a call runs on: ``"sm_90a"`` for Hopper (compute capability 9.x,
    warpgroup MMA, 228 KB of shared memory per SM), ``"sm_100a"`` for data-centre Blackwell (10.x: B200,
    GB200; tcgen05 MMA into tensor memory), ``"sm_80"`` for everything else (Ampere, Ada, consumer
    Blackwell 12.x get the conservative tiles). Blackwell's defaults are sm_80's, which compile there
    spill-free; Hopper's tiles are its run-time candidates (attention/configs.py). Launchers pick tiles per
    family; the static check compiles each family's tiles for its own arch (sm_100a on request)."""
    if _assumed_arch is not None:
        return _assumed_arch
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        if major == 9:
            return "sm_90a"
        if major == 10:
            return "sm_100a"
    return "sm_80"


@contextlib.contextmanager
def assume_arch(arch: str):
    """Make :func:`target_arch` answer ``arch`` (the static check records each family's launches on
    meta tensors)."""
    global _assumed_arch
    saved, _assumed_arch = _assumed_arch, arch
    try:
        yield
    finally:
        _assumed_arch = saved


def record_path(op: str, path: str) -> None:
    _last_path[op] = path


def record_launch(kernel: str) -> None:
    _launches[kernel] += 1


def last_path(op: str) -> str | None:
    """Which path the most recent call of ``op`` took: ``"triton"``, ``"torch"``, or None if never called.

    ``op`` is one of ``"attention"``, ``"layer_norm"``, ``"ffn"``. Raises ``ValueError`` for other names.
    """
    if op not in OPS:
        raise ValueError(f"last_path: unknown op {op!r}; expected one of {OPS}")
    return _last_path.get(op)


def launch_count(kernel: str) -> int:
    """How many times the Triton kernel named ``kernel`` (e.g. ``"attention_fwd"``) has been launched."""
    return _launches[kernel]


def launch_counts() -> dict[str, int]:
    """A copy of all launch counters, keyed by kernel name."""
    return dict(_launches)
