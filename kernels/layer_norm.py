"""Fused layer normalization, forward and backward, in Triton.

LayerNorm (Ba, Kiros & Hinton, 2016, "Layer Normalization", eq. 4) normalizes each row of the last
``len(normalized_shape)`` dims to zero mean and unit variance, then applies ``weight`` and ``bias``;
the Transformer applies it after every sub-layer (Vaswani et al., 2017, Sec. 3.1). The forward reads
each row once and writes y plus the row's mean and 1/std (fp32); the backward reads x, dy and those
statistics once to write dx, and accumulates dweight/dbias as fp32 partial sums per program that one
reduction finishes, the scheme of the Triton tutorial "Layer Normalization" (05-layer-norm.py) and of
Apex's fused LayerNorm. Statistics are always computed in fp32, whatever the input dtype.

Layers: ``_layer_norm_fwd_kernel`` / ``_layer_norm_bwd_kernel`` -> ``layer_norm_forward`` /
``layer_norm_backward`` -> ``_LayerNormFunction`` -> ``layer_norm`` -> ``LayerNorm``.
``layer_norm_reference`` is the plain PyTorch definition the tests compare against.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch
from ._triton_utils import check_same, check_tensor

# A row lives in one program's registers. Up to 8192 values the backward (which holds about eight
# row-sized fp32 arrays) compiles without spills on sm_80 and sm_90a (python -m kernels.static_check);
# longer rows take the documented fallback, PyTorch's layer norm, until a column-looped kernel lands.
MAX_FUSED_N = 8192


@triton.jit
def _layer_norm_fwd_kernel(
    X, Y, W, B, MEAN, RSTD,
    stride_xm, stride_xn, stride_ym,
    N, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_xm + cols * stride_xn, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, 0) / N  # two passes over registers: no E[x^2] - E[x]^2 cancellation
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_ym + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    X, DY, DX, W, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL,
    stride_xm, stride_xn, stride_dym, stride_dyn, stride_dxm,
    M, N, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx = rstd * (w*dy - mean(w*dy * xhat) * xhat - mean(w*dy)) for a run of rows; fp32 partial dw, db."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 so row * stride cannot overflow
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row64 in range(row_start, row_end):
        x = tl.load(X + row64 * stride_xm + cols * stride_xn, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dym + cols * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row64)
        rstd = tl.load(RSTD + row64)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = dy * w if HAS_WEIGHT else dy
        c1 = tl.sum(xhat * wdy, 0) / N
        c2 = tl.sum(wdy, 0) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row64 * stride_dxm + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=mask)


def _launch_shape(n: int) -> dict:
    """One row per program; warps grow with the row so each thread holds at most ~16 values."""
    block_n = triton.next_power_of_2(n)
    if dispatch.INTERPRETER:
        return dict(BLOCK_N=block_n, num_warps=1)
    return dict(BLOCK_N=block_n, num_warps=min(16, max(1, block_n // 512)))


def _num_bwd_programs(m: int, device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over, each reducing a run of rows into its partial sums."""
    if device.type == "cuda":
        return max(1, min(m, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(m, 8))


def layer_norm_forward(x2d, weight, bias, eps: float, y=None):
    """Launch the forward kernel on a ``(M, N)`` view; returns ``(y, mean, rstd)`` (stats fp32, shape (M,)).

    ``y`` may be given (row stride free, unit column stride); otherwise it is allocated contiguous.
    """
    m, n = x2d.shape
    y = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype) if y is None else y
    mean = torch.empty((m,), device=x2d.device, dtype=torch.float32)
    rstd = torch.empty((m,), device=x2d.device, dtype=torch.float32)
    if m == 0:
        return y, mean, rstd
    _layer_norm_fwd_kernel[(m,)](
        x2d, y, weight, bias, mean, rstd,
        x2d.stride(0), x2d.stride(1), y.stride(0), n, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **_launch_shape(n),
    )
    dispatch.record_launch("layer_norm_fwd")
    return y, mean, rstd


def layer_norm_backward(dy, x2d, weight, bias, mean, rstd, dx=None):
    """Launch the backward kernel; returns ``(dx, dweight, dbias)`` (the last two None without weight/bias).

    ``dx`` may be given (row stride free, unit column stride); otherwise it is allocated contiguous.
    """
    m, n = x2d.shape
    dx = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype) if dx is None else dx
    programs = _num_bwd_programs(m, x2d.device)
    dw_partial = torch.empty((programs, n), device=x2d.device, dtype=torch.float32) if weight is not None else None
    db_partial = torch.empty((programs, n), device=x2d.device, dtype=torch.float32) if bias is not None else None
    if m > 0:
        _layer_norm_bwd_kernel[(programs,)](
            x2d, dy, dx, weight, mean, rstd, dw_partial, db_partial,
            x2d.stride(0), x2d.stride(1), dy.stride(0), dy.stride(1), dx.stride(0),
            m, n, triton.cdiv(m, programs),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **_launch_shape(n),
        )
        dispatch.record_launch("layer_norm_bwd")
    dw = None if weight is None else (dw_partial.sum(0) if m else torch.zeros(n, device=x2d.device)).to(weight.dtype)
    db = None if bias is None else (db_partial.sum(0) if m else torch.zeros(n, device=x2d.device)).to(bias.dtype)
    return dx, dw, db


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, eps):
        y, mean, rstd = layer_norm_forward(x2d, weight, bias, eps)
        ctx.save_for_backward(x2d, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(dy, x2d, weight, bias, mean, rstd)
        return dx, dw, db, None


def _normalized_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    try:
        if isinstance(normalized_shape, (str, bytes)):
            raise TypeError
        return tuple(int(s) for s in normalized_shape)
    except (TypeError, ValueError):
        raise TypeError(f"layer_norm: normalized_shape must be an int or a sequence of ints, "
                        f"got {type(normalized_shape).__name__}") from None


def _check_layer_norm_inputs(input, shape, weight, bias, eps) -> None:
    op = "layer_norm"
    check_tensor("input", input, op=op)
    if len(shape) == 0 or input.dim() < len(shape) or tuple(input.shape[-len(shape):]) != shape:
        raise ValueError(f"{op}: normalized_shape {list(shape)} does not match the trailing dims of input "
                         f"of shape {tuple(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(name, t, op=op)
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {tuple(t.shape)}")
    check_same(op, {"input": input, "weight": weight, "bias": bias}, dtype=False)
    if not (isinstance(eps, numbers.Real) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps!r}")


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalization over the trailing ``normalized_shape`` dims; drop-in for ``F.layer_norm``.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, with the biased variance, per row
    (Ba et al., 2016). Mean and variance are computed in fp32 whatever the input dtype.

    Args:
        input: ``(*, *normalized_shape)``, float16, bfloat16 or float32, any strides.
        normalized_shape: int or sequence of ints, the trailing dims to normalize over.
        weight, bias: optional, shape ``normalized_shape``; may be a different float dtype than input
            (fp32 weights with bf16 activations); their gradients come back in their own dtype.
        eps: added to the variance; must be > 0.

    Returns:
        Tensor of input's shape and dtype. Differentiable in input, weight and bias.

    Raises:
        TypeError: non-tensor or unsupported dtype. ValueError: shape mismatch, mixed devices, eps <= 0.

    Runs the Triton kernels on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors, for rows
    of up to ``MAX_FUSED_N`` (8192) values; otherwise PyTorch's layer norm (see :func:`kernels.last_path`).
    """
    shape = _normalized_shape(normalized_shape)
    _check_layer_norm_inputs(input, shape, weight, bias, eps)
    n = math.prod(shape)
    if not dispatch.triton_available_for(input) or n > MAX_FUSED_N:
        dispatch.record_path("layer_norm", "torch")
        if all(t is None or t.dtype == input.dtype for t in (weight, bias)):
            return F.layer_norm(input, shape, weight, bias, eps)
        return layer_norm_reference(input, shape, weight, bias, eps)
    dispatch.record_path("layer_norm", "triton")
    flat = lambda t: None if t is None else t.reshape(n).contiguous()  # noqa: E731 (kernel reads them at unit stride)
    y = _LayerNormFunction.apply(input.reshape(-1, n), flat(weight), flat(bias), float(eps))
    return y.view(input.shape)


def layer_norm_reference(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Plain PyTorch layer norm with fp32 statistics (any weight dtype); the tests run it in float64."""
    shape = _normalized_shape(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(input.dtype)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` running :func:`layer_norm`: same constructor, parameters and ``state_dict``.

    Being a subclass, it loads an ``nn.LayerNorm`` state_dict as is and passes ``isinstance`` checks
    that models and optimizers' weight-decay rules make.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
