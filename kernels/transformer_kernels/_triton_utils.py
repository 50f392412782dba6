"""Helpers shared by the op files: input checks, dtype mapping and a ``tl.dot`` that survives the interpreter."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import dispatch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class InputValueError(ValueError, RuntimeError):
    """Bad input (shapes, devices, options). A ``ValueError``, and a ``RuntimeError`` as torch raises for
    the same input, so callers written against either keep catching it."""


class InputTypeError(TypeError, RuntimeError):
    """An unsupported or mismatched dtype or argument type. A ``TypeError``, and a ``RuntimeError`` as
    torch raises for the same input."""


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` with an fp32 accumulator.

    ``UPCAST`` is set only under Triton's interpreter for bfloat16 operands, which it multiplies as raw
    bit patterns (Triton 3.9; see DESIGN.md): there the operands are widened to fp32 first. ``PRECISION``
    matters only for fp32 operands: ``"ieee"`` (true fp32) or ``"tf32"`` (tensor cores). ``"exact"`` is
    the interpreter's stand-in for ``"ieee"``: products summed in float64 and rounded once. A GPU's FMA
    dot sums over k in one fixed order whatever the tile's shape or orientation, so the attention
    backward recomputes the forward's scores bit for bit; the interpreter's numpy matmul picks its order
    by layout, and one ulp of a score at |score| ~ 50 moved probabilities by ~5e-6 (dV 6x torch's error
    at scale 2.5). Rounding the exact sum once is order-free too.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if PRECISION == "exact":
        return acc + tl.dot(a.to(tl.float64), b.to(tl.float64), input_precision="ieee").to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# Triton 3.9's interpreter rounds fp32 -> float8e4nv wrongly where rounding carries into the exponent
# (1.97 gives 1.0, not 2.0; about 2% of random values): under it :func:`to_fp8` rounds in fp32 first.
_ROUND_FP8_FIRST = tl.constexpr(dispatch.INTERPRETER)


@triton.jit
def to_fp8(x):
    """fp32 ``x`` (finite, |x| <= 448) to e4m3 (``tl.float8e4nv``, torch's ``float8_e4m3fn``), rounded to
    nearest even as the GPU's conversion does. Under the interpreter the value is first rounded to e4m3's
    precision in fp32: 3 mantissa bits for normal numbers (the bit trick carries into the exponent),
    steps of 2^-9 below 2^-6 (adding 1.5 x 2^14, whose ulp is 2^-9), so the cast itself is exact."""
    if _ROUND_FP8_FIRST:
        a = tl.abs(x)
        bits = a.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        small = (a + 24576.0) - 24576.0
        r = tl.where(a < 0.015625, small, normal)
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def to_fp8_rows(x, mult):
    """A tile as e4m3, row m scaled by ``mult[m]`` (448 / the row's amax: :func:`fp8_row_scales`). |x| <=
    amax, so only fp32 rounding can pass 448, by an ulp: the GPU's conversion saturates
    (``cvt.rn.satfinite``, the only form PTX has for e4m3x2), the interpreter's is clamped first (two
    FMNMX per element less in a compiled loop: benchmarks/NOTES.md)."""
    y = x.to(tl.float32) * mult[:, None]
    if _ROUND_FP8_FIRST:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    return to_fp8(y)


@triton.jit
def fp8_row_scales(amax):
    """``(descale, multiplier)`` of rows quantized to e4m3 by their amax: ``amax / 448`` and ``448 / amax``,
    both correctly rounded (``div_rn``; :func:`transformer_kernels.ffn_fp8.quantize_rows` divides the same
    way), the amax floored so that the descale is at least fp32's smallest normal and the multiplier
    finite (an all-zero row quantizes to zeros)."""
    amax = tl.maximum(amax, 448.0 * 1.1754943508222875e-38)
    fp8_max = tl.full(amax.shape, 448.0, tl.float32)
    return tl.math.div_rn(amax, fp8_max), tl.math.div_rn(fp8_max, amax)


@triton.jit
def to_out(x, dtype: tl.constexpr):
    """fp32 ``x`` cast to ``dtype`` for a store. Triton 3.9's interpreter truncates fp32 -> bfloat16 (about
    half of random values land one bf16 ulp toward zero; a GPU rounds to nearest even): under it the
    value is first rounded to bf16's 8 mantissa bits in fp32, so the cast is exact."""
    if _ROUND_FP8_FIRST and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tanh(x):
    """tanh in fp32 to about an ulp, as ``torch.tanh``: below |x| = 0.5 the odd Taylor series to x^17
    (truncation under 1e-9 relative), above it ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)``, where the
    difference does not cancel; saturates to +-1 without overflow and keeps NaN. (``1 - 2 / (exp(2x) + 1)``
    loses ~15x that accuracy near 0, which soft-capped attention multiplies by the cap: issue 13.)"""
    a = tl.abs(x)
    x2 = x * x
    p = 6404582.0 / 10854718875.0
    p = p * x2 - 929569.0 / 638512875.0
    p = p * x2 + 21844.0 / 6081075.0
    p = p * x2 - 1382.0 / 155925.0
    p = p * x2 + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    small = x + x * (x2 * p)
    e = tl.exp(-2.0 * a)
    # division without IEEE rounding's slow path (a subroutine call that spills the heavy attention tiles)
    large = tl.fdiv(1.0 - e, 1.0 + e, ieee_rounding=False)
    return tl.where(a < 0.5, small, tl.where(x < 0, -large, large))


def pow2_bucket(n: int) -> int:
    """The autotuner's bucket of a size: the next power of two, capped at 65536 (transformer_kernels.autotune)."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 16)


def persistent_programs(device, per_sm: int = 1) -> int:
    """A persistent kernel's grid: ``per_sm`` programs per SM (H100's 132 SMs for the static check's meta
    tensors; 3 programs in the interpreter, so the tests walk several tiles per program)."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 3 if dispatch.INTERPRETER else per_sm * 132


def dot_flags(dtype: torch.dtype) -> dict:
    """The ``UPCAST``/``PRECISION`` constexprs of :func:`dot` for operands of ``dtype``.

    fp32 follows PyTorch's own switch: tensor-core tf32 only when
    ``torch.backends.cuda.matmul.allow_tf32`` is True (off by default), as for ``torch.matmul``.
    """
    upcast = dispatch.INTERPRETER and dtype == torch.bfloat16
    precision = "tf32" if (dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    if dispatch.INTERPRETER and precision == "ieee" and dtype == torch.float32:
        precision = "exact"
    return {"UPCAST": upcast, "PRECISION": precision}


def check_tensor(name: str, t, *, op: str, float64: bool = False) -> None:
    """Raise :class:`InputTypeError` unless ``t`` is a floating tensor of a supported dtype (``float64``:
    also float64, which the torch-compatible functions run on the PyTorch path)."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES and not (float64 and t.dtype == torch.float64):
        raise InputTypeError(
            f"{op}: {name} has dtype {t.dtype}; supported dtypes are float16, bfloat16 and float32"
            + (" (float64 runs on the PyTorch path)" if float64 else "")
        )


def check_same(op: str, named: dict[str, torch.Tensor], *, dtype: bool = True) -> None:
    """Raise :class:`InputValueError` if the tensors sit on different devices, :class:`InputTypeError` if
    their dtypes differ."""
    items = [(n, t) for n, t in named.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise InputValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on the same device"
            )
        if dtype and t.dtype != first.dtype:
            raise InputTypeError(
                f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match"
            )


def block_size(n: int, lo: int = 16) -> int:
    """The power of two that covers ``n`` (at least ``lo``: ``tl.dot`` needs 16 along each side)."""
    return max(lo, triton.next_power_of_2(n))


def autocast_to(*tensors):
    """Under ``torch.autocast``, the floating tensors cast to its dtype (as ``F.linear`` / SDPA would
    see them there), so fp32 parameters mix with half-precision activations; otherwise unchanged."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def tma_device(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device may read through TMA tensor descriptors: Hopper or data-centre
    Blackwell (compute capability 9.x, 10.x), Triton's interpreter, or the static check's meta tensors."""
    if t.is_cuda:
        return torch.cuda.get_device_capability(t.device)[0] in (9, 10)
    return t.device.type == "meta" or dispatch.INTERPRETER


@contextlib.contextmanager
def scratch_allocator(device):
    """Within the block, Triton allocates the global scratch of a launch (where a kernel writes the TMA
    descriptors it builds with ``tl.make_tensor_descriptor``) as a torch tensor on ``device``: the
    caching allocator serves it, CUDA-graph capture included. Triton's own allocator setting (a
    context variable, ``triton.set_allocator``) is restored after."""
    from triton.runtime import _allocation

    def allocate(size: int, alignment: int, stream):
        return torch.empty(size, device=device, dtype=torch.int8)

    token = _allocation._allocator.set(allocate)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)
