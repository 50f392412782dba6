"""Fused layer normalization and RMS normalization, with the residual add and dropout fused in, in Triton.

LayerNorm (Ba, Kiros & Hinton, 2016, eq. 4) normalizes each row of the last ``len(normalized_shape)``
dims to zero mean and unit variance, then applies ``weight`` and ``bias``; RMSNorm (Zhang & Sennrich,
2019) divides by the root mean square only. The Transformer wraps every sub-layer as
``LayerNorm(x + Dropout(Sublayer(x)))`` (Vaswani et al., 2017, Sec. 3.1 and 5.4): the fused "Add & Norm"
here reads the sub-layer output and the residual once, draws the dropout mask in-kernel (Philox, so
the backward regenerates it), and writes the normalized output and, for pre-norm models, the updated
residual stream. Statistics are always fp32, whatever the input dtype.

Program layout (after the Triton tutorial "Layer Normalization", 05-layer-norm.py, and Apex's fused
LayerNorm): a row of up to 8192 values lives in one program's registers, and narrow rows are batched
several per program so small-hidden-size shapes still fill the GPU; wider rows (no cap) loop over
column chunks. The backward writes dx per row and reduces dweight/dbias as fp32 partial sums per
program over a (row group x column chunk) grid; wide rows first get their two row statistics from a
separate pass. Nothing is written into the caller's tensors.

Layers: ``_norm_fwd_kernel`` / ``_norm_bwd_*_kernel`` -> ``norm_forward`` / ``norm_backward``
(launchers on (M, N) views) -> the ``transformer_kernels::norm_forward`` / ``transformer_kernels::norm_backward`` custom ops
with autograd and fake implementations -> ``layer_norm``, ``rms_norm``, ``add_layer_norm``,
``add_rms_norm`` -> ``LayerNorm``, ``RMSNorm``. ``norm_reference`` is the plain PyTorch definition.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn as nn
import triton
import triton.language as tl

from . import dispatch
from ._triton_utils import (InputTypeError, InputValueError, check_same, check_tensor, fp8_row_scales, to_fp8_rows,
                            to_out)


# Rows up to this many values stay in registers (one pass); wider rows loop over chunks of
# _CHUNK_N. Both are spill-free on sm_80 and sm_90a (python -m transformer_kernels.static_check). The interpreter
# uses small values so the tests' small rows exercise both paths.
MAX_SINGLE_PASS_N = 64 if dispatch.INTERPRETER else 8192
_CHUNK_N = 32 if dispatch.INTERPRETER else 4096
# The dropout backward also holds the Philox state per value: beyond 2048 values it spills in one
# pass, so it takes the two-kernel path (row statistics first) there.
_MAX_SINGLE_PASS_DROPOUT_BWD = 64 if dispatch.INTERPRETER else 2048


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _load_z(X, RES, rows, cols, mask, stride_xm, stride_xn, stride_rm, stride_rn, N, dropout_p, dropout_scale, seed,
            HAS_RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr):
    """z = dropout(x) + residual, rounded to x's dtype (as an unfused add would store it), in fp32."""
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    z = x.to(tl.float32)
    if DROPOUT:
        keep = tl.rand(seed, rows[:, None].to(tl.int64) * N + cols[None, :]) >= dropout_p
        z = tl.where(keep, z * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        z += tl.load(RES + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
    return z.to(x.dtype).to(tl.float32)


@triton.jit
def _affine(z, mean, rstd, W, B, cols, col_ok, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = (z - mean[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _norm_fwd_kernel(
    X, RES, W, B, Y, Z, MEAN, RSTD, YS,
    stride_xm, stride_xn, stride_rm, stride_rn, stride_ym, stride_zm,
    M, N, eps, dropout_p, dropout_scale, seed,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    DROPOUT: tl.constexpr, STORE_Z: tl.constexpr, SINGLE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8_OUT: tl.constexpr = False,
):
    """y = norm(z) * w + b for BLOCK_M rows, z = dropout(x) + residual; writes z when asked, and mean/rstd.

    ``FP8_OUT``: Y is e4m3, each row quantized with the dynamic scale amax / 448 of its values as x's
    dtype would store them (so an FP8 FFN fed from here computes what it computes from the stored
    norm), the scale written to YS (float32, per row). Wide rows take one more pass for the amax."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    offs = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:  # the whole row is in registers: read once, two-pass statistics in registers
        mask = row_ok[:, None] & (offs[None, :] < N)
        z = _load_z(X, RES, rows, offs, mask, stride_xm, stride_xn, stride_rm, stride_rn, N,
                    dropout_p, dropout_scale, seed, HAS_RESIDUAL, DROPOUT)
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], tl.float32)
            zc = z
        else:
            mean = tl.sum(z, 1) / N
            zc = tl.where(mask, z - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, 1) / N + eps)
    else:  # wide rows: a pass for the mean, one for the variance; z is recomputed, never read back
        acc = tl.zeros([BLOCK_M], tl.float32)
        mean = tl.zeros([BLOCK_M], tl.float32)
        if not IS_RMS:
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + offs
                mask = row_ok[:, None] & (cols[None, :] < N)
                acc += tl.sum(_load_z(X, RES, rows, cols, mask, stride_xm, stride_xn, stride_rm, stride_rn, N,
                                      dropout_p, dropout_scale, seed, HAS_RESIDUAL, DROPOUT), 1)
            mean = acc / N
            acc = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + offs
            mask = row_ok[:, None] & (cols[None, :] < N)
            zc = tl.where(mask, _load_z(X, RES, rows, cols, mask, stride_xm, stride_xn, stride_rm, stride_rn, N,
                                        dropout_p, dropout_scale, seed, HAS_RESIDUAL, DROPOUT) - mean[:, None], 0.0)
            acc += tl.sum(zc * zc, 1)
        rstd = 1.0 / tl.sqrt(acc / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    if not IS_RMS:
        tl.store(MEAN + rows, mean, mask=row_ok)
    if FP8_OUT:  # the row's amax of y (as x's dtype stores it): from registers, or one more sweep
        amax = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + offs
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            if not SINGLE_PASS:
                z = _load_z(X, RES, rows, cols, mask, stride_xm, stride_xn, stride_rm, stride_rn, N,
                            dropout_p, dropout_scale, seed, HAS_RESIDUAL, DROPOUT)
            y = to_out(_affine(z, mean, rstd, W, B, cols, col_ok, HAS_WEIGHT, HAS_BIAS), X.dtype.element_ty)
            amax = tl.maximum(amax, tl.max(tl.where(mask, tl.abs(y.to(tl.float32)), 0.0), 1))
        y_scale, y_mult = fp8_row_scales(amax)
        tl.store(YS + rows, y_scale, mask=row_ok)

    for c0 in range(0, N, BLOCK_N):  # one iteration in single-pass mode
        cols = c0 + offs
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        if not SINGLE_PASS:
            z = _load_z(X, RES, rows, cols, mask, stride_xm, stride_xn, stride_rm, stride_rn, N,
                        dropout_p, dropout_scale, seed, HAS_RESIDUAL, DROPOUT)
        if STORE_Z:
            tl.store(Z + rows[:, None] * stride_zm + cols[None, :], z.to(Z.dtype.element_ty), mask=mask)
        y = _affine(z, mean, rstd, W, B, cols, col_ok, HAS_WEIGHT, HAS_BIAS)
        if FP8_OUT:
            tl.store(Y + rows[:, None] * stride_ym + cols[None, :], to_fp8_rows(to_out(y, X.dtype.element_ty), y_mult),
                     mask=mask)
        else:
            tl.store(Y + rows[:, None] * stride_ym + cols[None, :], to_out(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_row_terms(z, dy, w, mean, rstd, mask, IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """(zhat, w*dy): the normalized input and the weighted output gradient of a tile, fp32."""
    zhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
    wdy = dy * w[None, :] if HAS_WEIGHT else dy
    return zhat, wdy


@triton.jit
def _norm_bwd_stats_kernel(
    Z, W, DY, MEAN, RSTD, C1, C2,
    stride_zm, stride_zn, stride_dym, stride_dyn,
    M, N,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For wide rows: c1 = mean(zhat * w dy) and c2 = mean(w dy) per row, looping over column chunks."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    offs = tl.arange(0, BLOCK_N)
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0) if not IS_RMS else tl.zeros([BLOCK_M], tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    c1 = tl.zeros([BLOCK_M], tl.float32)
    c2 = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + offs
        mask = row_ok[:, None] & (cols[None, :] < N)
        z = tl.load(Z + rows[:, None] * stride_zm + cols[None, :] * stride_zn, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32) if HAS_WEIGHT else tl.zeros([BLOCK_N], tl.float32)
        zhat, wdy = _norm_row_terms(z, dy, w, mean, rstd, mask, IS_RMS, HAS_WEIGHT)
        c1 += tl.sum(zhat * wdy, 1)
        c2 += tl.sum(wdy, 1)
    tl.store(C1 + rows, c1 / N, mask=row_ok)
    tl.store(C2 + rows, c2 / N, mask=row_ok)


@triton.jit
def _norm_bwd_kernel(
    Z, W, DY, DZ_OUT, MEAN, RSTD, C1, C2, DZ, DX, DW_PART, DB_PART,
    stride_zm, stride_zn, stride_dym, stride_dyn, stride_dom, stride_don, stride_dzm, stride_dxm,
    M, N, rows_per_program, dropout_p, dropout_scale, seed,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DZ_OUT: tl.constexpr,
    DROPOUT: tl.constexpr, SINGLE_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dz = rstd (w dy - zhat c1 - c2) (RMSNorm: no c2) [+ the prenorm residual's gradient], dx = dropout'(dz),
    for a run of rows and one column chunk; fp32 partial sums of dw = sum dy zhat and db = sum dy."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) if HAS_WEIGHT else tl.zeros([BLOCK_N], tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid_m.to(tl.int64) * rows_per_program  # int64 so row * stride cannot overflow
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(Z + rows[:, None] * stride_zm + cols[None, :] * stride_zn, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0) if not IS_RMS else tl.zeros([BLOCK_M], tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        zhat, wdy = _norm_row_terms(z, dy, w, mean, rstd, mask, IS_RMS, HAS_WEIGHT)
        if SINGLE_PASS:
            c1 = tl.sum(zhat * wdy, 1) / N
            c2 = tl.sum(wdy, 1) / N
        else:
            c1 = tl.load(C1 + rows, mask=row_ok, other=0.0)
            c2 = tl.load(C2 + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            dz = (wdy - zhat * c1[:, None]) * rstd[:, None]
        else:
            dz = (wdy - zhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DZ_OUT:  # pre-norm: the returned residual stream's own gradient joins here
            dz += tl.load(DZ_OUT + rows[:, None] * stride_dom + cols[None, :] * stride_don, mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(DZ + rows[:, None] * stride_dzm + cols[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
        if DROPOUT:
            keep = tl.rand(seed, rows[:, None].to(tl.int64) * N + cols[None, :]) >= dropout_p
            tl.store(DX + rows[:, None] * stride_dxm + cols[None, :], tl.where(keep, dz * dropout_scale, 0.0)
                     .to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * zhat, 0)
        db += tl.sum(dy, 0)
    if HAS_WEIGHT:
        tl.store(DW_PART + pid_m * N + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid_m * N + cols, db, mask=col_ok)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _tiles(n: int, max_single: int = MAX_SINGLE_PASS_N) -> dict:
    """BLOCK_N covers the row (single pass) or a chunk of it; narrow rows share a program (BLOCK_M rows)
    so each program holds ~4096 values; warps grow with the tile (~16 values per thread)."""
    single = n <= max_single
    block_n = triton.next_power_of_2(n) if single else _CHUNK_N
    block_m = max(1, min(32, 4096 // block_n)) if single else 1
    if dispatch.INTERPRETER:
        return dict(SINGLE_PASS=single, BLOCK_M=min(block_m, 4), BLOCK_N=block_n, num_warps=1)
    return dict(SINGLE_PASS=single, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=min(16, max(1, block_m * block_n // 512)))


def _row_programs(m: int, block_m: int, col_chunks: int, device: torch.device) -> int:
    """Backward programs along rows: enough for a few waves of the GPU, each reducing a run of rows."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    return max(1, min(triton.cdiv(m, block_m), triton.cdiv(target, col_chunks)))


def _dropout_args(dropout_p: float, seed: int) -> dict:
    return dict(dropout_p=dropout_p, dropout_scale=1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else float("inf"),
                seed=seed)


def norm_forward(x, residual, weight, bias, eps: float, *, is_rms: bool, dropout_p: float = 0.0, seed: int = 0,
                 y=None, z=None, y_scale=None):
    """Launch the forward on ``(M, N)`` views (any strides). Returns ``(y, z, mean, rstd)``: ``y`` and ``z``
    (= dropout(x) + residual, written only when there is a residual or dropout, else None) in x's dtype;
    ``mean`` (None for RMSNorm) and ``rstd`` fp32 ``(M,)``. ``y_scale`` (float32 (M,)): ``y`` is e4m3,
    quantized per row, its scales written there."""
    m, n = x.shape
    y_dtype = torch.float8_e4m3fn if y_scale is not None else x.dtype
    y = torch.empty((m, n), device=x.device, dtype=y_dtype) if y is None else y
    store_z = residual is not None or dropout_p > 0
    if store_z and z is None:
        z = torch.empty((m, n), device=x.device, dtype=x.dtype)
    mean = None if is_rms else torch.empty((m,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0 or n == 0:
        return y, z, mean, rstd
    tiles = _tiles(n)
    res = residual if residual is not None else x
    _norm_fwd_kernel[(triton.cdiv(m, tiles["BLOCK_M"]),)](
        x, res, weight, bias, y, z if store_z else y, mean if mean is not None else rstd, rstd,
        y_scale if y_scale is not None else rstd, x.stride(0), x.stride(1), res.stride(0), res.stride(1), y.stride(0), (z if store_z else y).stride(0),
        m, n, eps, **_dropout_args(dropout_p, seed),
        IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        DROPOUT=dropout_p > 0, STORE_Z=store_z, FP8_OUT=y_scale is not None, **tiles,
    )
    dispatch.record_launch("layer_norm_fwd")
    return y, z, mean, rstd


def norm_backward(dy, z, weight, bias, mean, rstd, *, is_rms: bool, dz_out=None, dropout_p: float = 0.0,
                  seed: int = 0, dz=None):
    """Launch the backward. ``z`` is the normalized input (x itself when there was no residual/dropout),
    ``dz_out`` the gradient of the returned residual stream (pre-norm), if any. Returns
    ``(dz, dx, dweight, dbias)``: dz is the gradient w.r.t. z (the residual's gradient); dx the input's
    (dz through the dropout mask; dz itself without dropout); dweight/dbias in their parameters' dtype."""
    m, n = z.shape
    dz = torch.empty((m, n), device=z.device, dtype=z.dtype) if dz is None else dz
    dx = torch.empty_like(dz) if dropout_p > 0 else dz
    tiles = _tiles(n, MAX_SINGLE_PASS_N if dropout_p == 0 else _MAX_SINGLE_PASS_DROPOUT_BWD)
    chunks = triton.cdiv(n, tiles["BLOCK_N"])
    programs = _row_programs(m, tiles["BLOCK_M"], chunks, z.device)
    dw_part = torch.empty((programs, n), device=z.device, dtype=torch.float32) if weight is not None else None
    db_part = torch.empty((programs, n), device=z.device, dtype=torch.float32) if bias is not None else None
    if m > 0 and n > 0:
        c1 = c2 = rstd
        if not tiles["SINGLE_PASS"]:
            c1, c2 = torch.empty_like(rstd), torch.empty_like(rstd)
            _norm_bwd_stats_kernel[(triton.cdiv(m, tiles["BLOCK_M"]),)](
                z, weight, dy, mean if mean is not None else rstd, rstd, c1, c2,
                z.stride(0), z.stride(1), dy.stride(0), dy.stride(1), m, n,
                IS_RMS=is_rms, HAS_WEIGHT=weight is not None, BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"],
                num_warps=tiles["num_warps"])
        rows_per_program = triton.cdiv(triton.cdiv(m, programs), tiles["BLOCK_M"]) * tiles["BLOCK_M"]
        do = dz_out if dz_out is not None else dy
        _norm_bwd_kernel[(programs, chunks)](
            z, weight, dy, do, mean if mean is not None else rstd, rstd, c1, c2, dz, dx,
            dw_part if dw_part is not None else rstd, db_part if db_part is not None else rstd,
            z.stride(0), z.stride(1), dy.stride(0), dy.stride(1), do.stride(0), do.stride(1), dz.stride(0),
            dx.stride(0), m, n, rows_per_program, **_dropout_args(dropout_p, seed),
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_DZ_OUT=dz_out is not None,
            DROPOUT=dropout_p > 0, **tiles,
        )
        dispatch.record_launch("layer_norm_bwd")
    elif m == 0:
        dz.zero_()
    dw = None if weight is None else (dw_part.sum(0) if m else torch.zeros(n, device=z.device)).to(weight.dtype)
    db = None if bias is None else (db_part.sum(0) if m else torch.zeros(n, device=z.device)).to(bias.dtype)
    return dz, dx, dw, db


# --------------------------------------------------------------------------------------------------
# Custom ops (autograd, fake implementations): torch.compile traces through them
# --------------------------------------------------------------------------------------------------
def _maybe(t: torch.Tensor) -> torch.Tensor | None:
    """Custom ops cannot return None: an empty tensor stands for it."""
    return None if t.numel() == 0 else t


@torch.library.custom_op("transformer_kernels::norm_forward", mutates_args=())
def _norm_forward_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], eps: float, is_rms: bool, dropout_p: float,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z or empty, mean or empty, rstd, philox seed as a 0-dim int64 CPU tensor)."""
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    y, z, mean, rstd = norm_forward(x, residual, weight, bias, eps, is_rms=is_rms, dropout_p=dropout_p, seed=int(seed))
    return (y, x.new_empty(0) if z is None else z, x.new_empty(0, dtype=torch.float32) if mean is None else mean,
            rstd, seed)


@_norm_forward_op.register_fake
def _(x, residual, weight, bias, eps, is_rms, dropout_p):
    m, n = x.shape
    z = x.new_empty((m, n)) if (residual is not None or dropout_p > 0) else x.new_empty(0)
    mean = x.new_empty(0 if is_rms else m, dtype=torch.float32)
    return x.new_empty((m, n)), z, mean, x.new_empty(m, dtype=torch.float32), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("transformer_kernels::norm_backward", mutates_args=())
def _norm_backward_op(dy: torch.Tensor, dz_out: Optional[torch.Tensor], z: torch.Tensor, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, seed: torch.Tensor,
                      is_rms: bool, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz, dx or empty (= dz without dropout), dweight or empty, dbias or empty)."""
    dz, dx, dw, db = norm_backward(dy, z, weight, bias, _maybe(mean), rstd, is_rms=is_rms, dz_out=dz_out,
                                   dropout_p=dropout_p, seed=int(seed))
    empty = lambda: z.new_empty(0)  # noqa: E731 (distinct tensors: outputs may not alias)
    return dz, dx if dropout_p > 0 else empty(), empty() if dw is None else dw, empty() if db is None else db


@_norm_backward_op.register_fake
def _(dy, dz_out, z, weight, bias, mean, rstd, seed, is_rms, dropout_p):
    like = lambda t: z.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    return torch.empty_like(z), torch.empty_like(z) if dropout_p > 0 else z.new_empty(0), like(weight), like(bias)


def _norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms, dropout_p = inputs
    _, z, mean, rstd, seed = output
    ctx.has_residual = residual is not None
    ctx.z_is_x = residual is None and dropout_p == 0  # then z was not written: the kernel normalized x
    ctx.save_for_backward(x if ctx.z_is_x else z, weight, bias, mean, rstd, seed)
    ctx.is_rms, ctx.dropout_p = is_rms, dropout_p
    # An unused output's gradient stays None rather than a materialized zeros tensor (which DTensor
    # inputs would get as a plain tensor, mixing the two in the backward op).
    ctx.set_materialize_grads(False)


def _norm_autograd_backward(ctx, dy, dz_out, _dmean, _drstd, _dseed):
    """Gradients of x, residual, weight, bias; ``dz_out`` (the returned sum's gradient) matters for pre-norm."""
    z, weight, bias, mean, rstd, seed = ctx.saved_tensors
    if dy is None:  # only the pre-norm sum was used
        dy = torch.zeros_like(z)
    prenorm_grad = None if ctx.z_is_x or dz_out is None else dz_out
    dz, dx, dw, db = _norm_backward_op(dy, prenorm_grad, z, weight, bias, mean, rstd, seed, ctx.is_rms, ctx.dropout_p)
    dx = dx if ctx.dropout_p > 0 else dz
    return (dx, dz if ctx.has_residual else None, _maybe(dw) if weight is not None else None,
            _maybe(db) if bias is not None else None, None, None, None)


torch.library.register_autograd("transformer_kernels::norm_forward", _norm_autograd_backward, setup_context=_norm_setup_context)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def _normalized_shape(normalized_shape, op: str) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    try:
        if isinstance(normalized_shape, (str, bytes)):
            raise TypeError
        return tuple(int(s) for s in normalized_shape)
    except (TypeError, ValueError):
        raise InputTypeError(f"{op}: normalized_shape must be an int or a sequence of ints, "
                        f"got {type(normalized_shape).__name__}") from None


def _check_norm_inputs(op, input, shape, weight, bias, eps, residual=None, dropout_p=0.0) -> None:
    check_tensor("input", input, op=op, float64=True)
    if len(shape) == 0 or input.dim() < len(shape) or tuple(input.shape[-len(shape):]) != shape:
        raise InputValueError(f"{op}: normalized_shape {list(shape)} does not match the trailing dims of input "
                         f"of shape {tuple(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(name, t, op=op, float64=True)
        if tuple(t.shape) != shape:
            raise InputValueError(f"{op}: {name} must have shape {list(shape)}, got {tuple(t.shape)}")
    if residual is not None:
        check_tensor("residual", residual, op=op, float64=True)
        if residual.shape != input.shape:
            raise InputValueError(f"{op}: residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
        check_same(op, {"input": input, "residual": residual})
    check_same(op, {"input": input, "weight": weight, "bias": bias}, dtype=False)
    if not (isinstance(eps, numbers.Real) and eps > 0 and math.isfinite(eps)):
        raise InputValueError(f"{op}: eps must be a positive finite number, got {eps!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise InputValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p!r}")


def _norm(op, input, shape, weight, bias, eps, *, is_rms, residual=None, dropout_p=0.0, prenorm=False):
    """The shared body of every public norm function: checks, dispatch, flattening."""
    if is_rms and eps is None:
        eps = torch.finfo(input.dtype if isinstance(input, torch.Tensor) else torch.float32).eps
    _check_norm_inputs(op, input, shape, weight, bias, eps, residual, dropout_p)
    n = math.prod(shape)
    if not dispatch.triton_available_for(input) or input.numel() == 0:  # nothing to normalize: no launch
        dispatch.record_path("layer_norm", "torch")
        y, z = norm_reference(input, shape, weight, bias, eps, is_rms=is_rms, residual=residual, dropout_p=dropout_p,
                              return_residual=True)
        return (y, z) if prenorm else y
    dispatch.record_path("layer_norm", "triton")
    flat = lambda t: None if t is None else t.reshape(n).contiguous()  # noqa: E731 (kernel reads them at unit stride)
    y, z, _, _, _ = _norm_forward_op(input.reshape(-1, n), None if residual is None else residual.reshape(-1, n),
                                     flat(weight), flat(bias), float(eps), bool(is_rms), float(dropout_p))
    y = y.view(input.shape)
    if not prenorm:
        return y
    return y, (z.view(input.shape) if residual is not None or dropout_p > 0 else input)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalization over the trailing ``normalized_shape`` dims; drop-in for ``F.layer_norm``.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, biased variance, per row (Ba et al., 2016).

    Args:
        input: ``(*, *normalized_shape)``, float16, bfloat16 or float32, any strides; any row width.
        normalized_shape: int or sequence of ints, the trailing dims to normalize over.
        weight, bias: optional, shape ``normalized_shape``; may be a different float dtype than input
            (fp32 weights with bf16 activations); their gradients come back in their own dtype.
        eps: added to the variance; must be > 0.

    Returns:
        Tensor of input's shape and dtype, differentiable in input, weight and bias. Statistics in fp32.

    Raises:
        TypeError: non-tensor or unsupported dtype. ValueError: shape mismatch, mixed devices, eps <= 0.
    """
    shape = _normalized_shape(normalized_shape, "layer_norm")
    return _norm("layer_norm", input, shape, weight, bias, eps, is_rms=False)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """RMS normalization, y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019); drop-in for
    ``F.rms_norm``: ``eps=None`` means ``torch.finfo(input.dtype).eps``. Arguments, returns and errors
    as :func:`layer_norm` (no bias)."""
    shape = _normalized_shape(normalized_shape, "rms_norm")
    return _norm("rms_norm", input, shape, weight, None, eps, is_rms=True)


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5, dropout_p=0.0, prenorm=False):
    """Fused "Add & Norm": ``LayerNorm(residual + Dropout(input))`` (Vaswani et al., 2017, Sec. 3.1, 5.4).

    ``input`` is the sub-layer's output, ``residual`` the sub-layer's input (same shape and dtype). The
    dropout mask is drawn in-kernel from torch's default generator (pass ``dropout_p=0`` in eval).
    Post-norm (the paper) returns the normalized sum; ``prenorm=True`` returns ``(normalized, sum)``,
    the sum being the residual stream a pre-norm block carries on. Differentiable in input, residual,
    weight and bias (and through the returned sum). Other arguments and errors as :func:`layer_norm`.
    """
    shape = _normalized_shape(normalized_shape, "add_layer_norm")
    return _norm("add_layer_norm", input, shape, weight, bias, eps, is_rms=False, residual=residual,
                 dropout_p=dropout_p, prenorm=prenorm)


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, dropout_p=0.0, prenorm=False):
    """:func:`add_layer_norm` with RMSNorm: ``RMSNorm(residual + Dropout(input))`` (pre-norm Llama blocks)."""
    shape = _normalized_shape(normalized_shape, "add_rms_norm")
    return _norm("add_rms_norm", input, shape, weight, None, eps, is_rms=True, residual=residual,
                 dropout_p=dropout_p, prenorm=prenorm)


@torch.library.custom_op("transformer_kernels::norm_forward_fp8", mutates_args=())
def _norm_forward_fp8_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], eps: float, is_rms: bool,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y e4m3, y_scale float32 (M,), z or empty)."""
    scale = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    y, z, _, _ = norm_forward(x, residual, weight, bias, eps, is_rms=is_rms, y_scale=scale)
    return y, scale, x.new_empty(0) if z is None else z


@_norm_forward_fp8_op.register_fake
def _(x, residual, weight, bias, eps, is_rms):
    m, n = x.shape
    return (x.new_empty((m, n), dtype=torch.float8_e4m3fn), x.new_empty(m, dtype=torch.float32),
            x.new_empty((m, n)) if residual is not None else x.new_empty(0))


def norm_fp8(input, normalized_shape, weight=None, bias=None, eps=None, *, rms=False, residual=None):
    """LayerNorm (or RMSNorm with ``rms=True``) whose output is e4m3, quantized per row (token) with a
    dynamic scale in the same kernel: what an FP8 feed-forward network takes as its input
    (:func:`transformer_kernels.ffn` with ``input_scale``), so the activation is quantized inside the
    norm rather than in a pass of its own (issue 22; the per-token scaling of ``torch._scaled_mm``).

    Computes y as :func:`layer_norm` / :func:`rms_norm` (with ``residual``: of ``residual + input``, as
    :func:`add_layer_norm` with ``prenorm=True``), rounds it to input's dtype as that function would
    store it, and returns ``y_fp8 = e4m3(y * 448 / amax_row)`` with ``y_scale = amax_row / 448``, so
    ``y ~ y_fp8.float() * y_scale[..., None]`` (:func:`transformer_kernels.ffn_fp8.quantize_rows`'s
    arithmetic: ``ffn(norm_fp8(x)...)`` equals ``ffn(layer_norm(x))`` with FP8 weights bit for bit).

    Args:
        input: ``(*, *normalized_shape)`` float16, bfloat16 or float32. weight, bias: as :func:`layer_norm`
            (RMSNorm takes no bias). eps: default 1e-5 (LayerNorm) or ``torch.finfo(input.dtype).eps``
            (RMSNorm, as ``F.rms_norm``). residual: optional, input's shape and dtype.

    Returns:
        ``(y_fp8, y_scale)``: float8_e4m3fn of input's shape and float32 of shape ``input.shape[:-len(
        normalized_shape)]``; with ``residual``, ``(y_fp8, y_scale, residual + input)``, the sum in input's
        dtype (the pre-norm residual stream).

    Raises:
        As :func:`layer_norm`; ``ValueError`` also for a tensor that requires grad while autograd records
        (inference only: no backward).
    """
    op = "norm_fp8"
    shape = _normalized_shape(normalized_shape, op)
    if rms and bias is not None:
        raise InputValueError(f"{op}: RMSNorm (rms=True) takes no bias")
    eps = (torch.finfo(input.dtype).eps if rms and isinstance(input, torch.Tensor) and input.is_floating_point()
           else 1e-5) if eps is None else eps
    _check_norm_inputs(op, input, shape, weight, bias, eps, residual)
    if input.dtype == torch.float64:
        raise InputTypeError(f"{op}: input is float64; FP8 output takes float16, bfloat16 or float32 input")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, residual)):
        raise InputValueError(f"{op}: FP8 output is inference-only (no backward); run under torch.no_grad() or "
                              f"torch.inference_mode()")
    n = math.prod(shape)
    lead = input.shape[:input.dim() - len(shape)]
    from .ffn_fp8 import on_triton, quantize_rows
    if not on_triton(input) or input.numel() == 0:
        dispatch.record_path("layer_norm", "torch")
        y, z = norm_reference(input, shape, weight, bias, eps, is_rms=rms, residual=residual, return_residual=True)
        y_fp8, scale = quantize_rows(y.reshape(-1, n))
        out = (y_fp8.view(input.shape), scale.view(lead))
        return out if residual is None else (*out, z)
    dispatch.record_path("layer_norm", "triton")
    flat = lambda t: None if t is None else t.reshape(n).contiguous()  # noqa: E731
    y, scale, z = _norm_forward_fp8_op(input.reshape(-1, n), None if residual is None else residual.reshape(-1, n),
                                       flat(weight), flat(bias), float(eps), bool(rms))
    out = (y.view(input.shape), scale.view(lead))
    return out if residual is None else (*out, z.view(input.shape))


def norm_reference(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, is_rms=False, residual=None,
                   dropout_p=0.0, dropout_keep=None, return_residual=False):
    """Plain PyTorch (add &) LayerNorm / RMSNorm with fp32 statistics (any weight dtype); the tests run it
    in float64. ``dropout_keep`` fixes the dropout mask; without it one is drawn from torch's generator.
    With ``return_residual`` returns ``(y, z)``, z = residual + dropout(input) in input's dtype."""
    shape = _normalized_shape(normalized_shape, "norm_reference")
    dims = tuple(range(-len(shape), 0))
    z = input
    if dropout_p > 0:
        keep = dropout_keep if dropout_keep is not None else torch.rand_like(input, dtype=torch.float32) >= dropout_p
        z = torch.where(keep, input / (1.0 - dropout_p), torch.zeros_like(input))
    if residual is not None:
        z = z + residual
    x = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    if is_rms:
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    else:
        mean = x.mean(dims, keepdim=True)
        y = (x - mean) * torch.rsqrt((x - mean).pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = y.to(input.dtype)
    return (y, z) if return_residual else y


def layer_norm_reference(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Plain PyTorch layer norm with fp32 statistics (any weight dtype)."""
    return norm_reference(input, normalized_shape, weight, bias, eps)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` on :func:`layer_norm`: same constructor, parameters and ``state_dict``; being a
    subclass, it loads an ``nn.LayerNorm`` state_dict as is and passes ``isinstance`` checks.

    ``forward(input)`` is the plain norm; ``forward(input, residual, dropout_p=p, prenorm=False)`` is
    the fused Add & Norm of :func:`add_layer_norm`.
    """

    def forward(self, input, residual=None, dropout_p=0.0, prenorm=False):
        if residual is None and dropout_p == 0 and not prenorm:
            return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        if residual is None:
            residual = torch.zeros_like(input)
        return add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps, dropout_p,
                              prenorm)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` on :func:`rms_norm` (same constructor, parameters, state_dict); ``forward(input,
    residual, dropout_p, prenorm)`` as :class:`LayerNorm`'s, with :func:`add_rms_norm`."""

    def forward(self, input, residual=None, dropout_p=0.0, prenorm=False):
        if residual is None and dropout_p == 0 and not prenorm:
            return rms_norm(input, self.normalized_shape, self.weight, self.eps)
        if residual is None:
            residual = torch.zeros_like(input)
        return add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps, dropout_p, prenorm)
