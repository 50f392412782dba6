"""Fused scaled-dot-product attention, forward and backward, in Triton.

Algorithm: FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention with Better Parallelism
and Work Partitioning", Algorithms 1 and 2) on the online softmax of Milakov & Gimelshein (2018,
"Online normalizer calculation for softmax"). Each program owns a block of query rows, walks the key
blocks once keeping a running max and sum, and never stores the seqlen_q x seqlen_k score matrix; the
row logsumexp is saved so the backward pass can rebuild the probabilities block by block. The program
layout follows the Triton tutorial "Fused Attention" (python/tutorials/06-fused-attention.py).

The backward runs two kernels rather than one kernel with atomics: one walks query blocks to build
dK and dV for a key block, the other walks key blocks to build dQ for a query block. That recomputes
Q K^T once more (7 matmuls instead of 5) but needs no atomics and is bitwise deterministic.

Layers, from the metal up: ``_attn_fwd_kernel`` / ``_attn_bwd_*_kernel`` -> ``attention_forward`` /
``attention_backward`` (launchers) -> ``_AttentionFunction`` (autograd) ->
``scaled_dot_product_attention`` (public, torch's signature). ``attention_reference`` is the plain
PyTorch definition the tests compare against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch
from ._triton_utils import block_size, check_same, check_tensor, dot, dot_flags

# Globals read inside @triton.jit code must be constexpr to compile (the interpreter does not check).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_m, so_d,
    num_heads, seqlen_q, seqlen_k, head_dim, head_dim_v,
    qk_scale,  # softmax scale * log2(e): the scores live in base 2 so exp2 does the exponentials
    causal_offset,  # key j is visible to query i iff j <= i + causal_offset
    IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    Q += off_b * sq_b + off_h * sq_h
    K += off_b * sk_b + off_h * sk_h
    V += off_b * sv_b + off_h * sv_h
    O += off_b * so_b + off_h * so_h

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q
    q = tl.load(Q + rows[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = seqlen_k
    if IS_CAUSAL:  # key blocks entirely right of the diagonal are never visited
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + causal_offset)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        kt = tl.load(K + cols[None, :] * sk_n + offs_d[:, None] * sk_d,
                     mask=col_ok[None, :] & (offs_d[:, None] < head_dim), other=0.0)
        s = dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION) * qk_scale
        valid = col_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + causal_offset)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * sv_n + offs_dv[None, :] * sv_d,
                    mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
        m_i = m_new

    # Rows that saw no key (possible only with a negative causal offset) output 0, logsumexp -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + rows[:, None] * so_m + offs_dv[None, :] * so_d, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(LSE + pid_bh.to(tl.int64) * seqlen_q + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    so_b, so_h, so_m, so_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    num_heads, seqlen_q, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id: the row term of the softmax Jacobian (FlashAttention-2, Alg. 2 line 4)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < seqlen_q) & (offs_dv[None, :] < head_dim_v)
    o = tl.load(O + off_b * so_b + off_h * so_h + rows[:, None] * so_m + offs_dv[None, :] * so_d,
                mask=mask, other=0.0)
    do = tl.load(DO + off_b * sdo_b + off_h * sdo_h + rows[:, None] * sdo_m + offs_dv[None, :] * sdo_d,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * seqlen_q + rows, delta, mask=rows < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdk_b, sdk_h, sdk_n, sdk_d,
    sdv_b, sdv_h, sdv_n, sdv_d,
    num_heads, seqlen_q, seqlen_k, head_dim, head_dim_v,
    qk_scale, sm_scale, causal_offset,
    IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dV = P^T dO and dK = scale * dS^T Q for one key block, walking the query blocks that see it."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    Q += off_b * sq_b + off_h * sq_h
    K += off_b * sk_b + off_h * sk_h
    V += off_b * sv_b + off_h * sv_h
    DO += off_b * sdo_b + off_h * sdo_h
    LSE += pid_bh.to(tl.int64) * seqlen_q
    DELTA += pid_bh.to(tl.int64) * seqlen_q

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = cols < seqlen_k
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    k = tl.load(K + cols[:, None] * sk_n + offs_d[None, :] * sk_d, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + cols[:, None] * sv_n + offs_dv[None, :] * sv_d, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    lo = 0
    if IS_CAUSAL:  # query blocks entirely above the diagonal never see this key block
        lo = tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, seqlen_q, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen_q
        q = tl.load(Q + rows[:, None] * sq_m + offs_d[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + rows[:, None] * sdo_m + offs_dv[None, :] * sdo_d,
                     mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        # A row that saw no key has lse = -inf; +inf there makes its probabilities exactly 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
        st = dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, PRECISION) * qk_scale
        pt = tl.exp2(st - lse2[None, :])
        valid = col_ok[:, None] & row_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (cols[:, None] <= rows[None, :] + causal_offset)
        pt = tl.where(valid, pt, 0.0)
        dv = dot(pt.to(do.dtype), do, dv, UPCAST, PRECISION)
        dpt = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = dot(dst.to(q.dtype), q, dk, UPCAST, PRECISION)

    dk = dk * sm_scale
    DK += off_b * sdk_b + off_h * sdk_h
    DV += off_b * sdv_b + off_h * sdv_h
    tl.store(DK + cols[:, None] * sdk_n + offs_d[None, :] * sdk_d, dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + cols[:, None] * sdv_n + offs_dv[None, :] * sdv_d, dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & dv_ok[None, :])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdq_b, sdq_h, sdq_m, sdq_d,
    num_heads, seqlen_q, seqlen_k, head_dim, head_dim_v,
    qk_scale, sm_scale, causal_offset,
    IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ = scale * dS K for one query block, walking the key blocks it sees."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    Q += off_b * sq_b + off_h * sq_h
    K += off_b * sk_b + off_h * sk_h
    V += off_b * sv_b + off_h * sv_h
    DO += off_b * sdo_b + off_h * sdo_h

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    q = tl.load(Q + rows[:, None] * sq_m + offs_d[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + rows[:, None] * sdo_m + offs_dv[None, :] * sdo_d, mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * seqlen_q + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * seqlen_q + rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = seqlen_k
    if IS_CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + causal_offset)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        kt = tl.load(K + cols[None, :] * sk_n + offs_d[:, None] * sk_d, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(V + cols[None, :] * sv_n + offs_dv[:, None] * sv_d, mask=col_ok[None, :] & dv_ok[:, None], other=0.0)
        s = dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        valid = col_ok[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + causal_offset)
        p = tl.where(valid, p, 0.0)
        dp = dot(do, vt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST, PRECISION)

    dq = dq * sm_scale
    DQ += off_b * sdq_b + off_h * sdq_h
    tl.store(DQ + rows[:, None] * sdq_m + offs_d[None, :] * sdq_d, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _config(block_d: int, dtype: torch.dtype) -> dict:
    """Forward block sizes and launch shape for a head_dim padded to ``block_d``.

    Half precision: 128 query rows per program feed the tensor cores; 64 keys per step bound the fp32
    score tile; head_dim 256 halves both so the accumulator stays in registers. True fp32 has no
    tensor-core path and Triton's FMA dot holds whole operand rows per thread, so its tiles are small.
    Every entry compiles without spills for sm_80 and sm_90a (``python -m kernels.static_check``).
    Interpreter: 32x32 blocks, so small test shapes still cross several blocks and every tail mask.
    """
    if dispatch.INTERPRETER:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2) if block_d <= 64 else \
            dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def _bwd_config(block_d: int, dtype: torch.dtype) -> dict:
    """Backward blocks (shared by the dK/dV and dQ kernels): each program holds two fp32 accumulators
    and five operand tiles, so tiles are smaller than the forward's; same no-spill rule."""
    if dispatch.INTERPRETER:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2) if block_d <= 64 else \
            dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    if block_d <= 128:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)


# The row sums dO.O are memory-bound; 64 rows x 8 warps stays spill-free up to fp32 head_dim 256.
_DELTA_BLOCK_M = 64


def _causal_offset(is_causal: bool, seqlen_q: int, seqlen_k: int, align: str) -> int:
    """0 for torch's top-left alignment, seqlen_k - seqlen_q for flash-attention's bottom-right."""
    if not is_causal or align == "top_left":
        return 0
    return seqlen_k - seqlen_q


def attention_forward(q, k, v, *, is_causal: bool, scale: float, align: str = "top_left", out=None, lse=None):
    """Launch the forward kernel on 4-D ``(batch, num_heads, seqlen, head_dim)`` views of any strides.

    Returns ``(out, logsumexp)``: ``out`` is ``(batch, num_heads, seqlen_q, head_dim_v)`` in q's dtype;
    ``logsumexp`` is ``(batch, num_heads, seqlen_q)`` float32 contiguous, natural log of the row sums
    of exp(scale * q k^T) over the visible keys (-inf for a row that sees none). ``out``/``lse`` may be
    given (any strides for ``out``); otherwise they are allocated.
    """
    batch, num_heads, seqlen_q, head_dim = q.shape
    seqlen_k, head_dim_v = k.shape[2], v.shape[3]
    if out is None:
        out = torch.empty((batch, num_heads, seqlen_q, head_dim_v), device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty((batch, num_heads, seqlen_q), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    block_d, block_dv = block_size(head_dim), block_size(head_dim_v)
    cfg = _config(max(block_d, block_dv), q.dtype)
    grid = (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * num_heads)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_heads, seqlen_q, seqlen_k, head_dim, head_dim_v,
        scale * LOG2E.value, _causal_offset(is_causal, seqlen_q, seqlen_k, align),
        IS_CAUSAL=is_causal, BLOCK_D=block_d, BLOCK_DV=block_dv, **cfg, **dot_flags(q.dtype),
    )
    dispatch.record_launch("attention_fwd")
    return out, lse


def attention_backward(do, q, k, v, out, lse, *, is_causal: bool, scale: float, align: str = "top_left",
                       dq=None, dk=None, dv=None):
    """Launch the three backward kernels; returns ``(dq, dk, dv)`` in the inputs' dtype.

    ``dq``/``dk``/``dv`` may be given (any strides); otherwise they are allocated contiguous.
    """
    batch, num_heads, seqlen_q, head_dim = q.shape
    seqlen_k, head_dim_v = k.shape[2], v.shape[3]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype) if dq is None else dq
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype) if dk is None else dk
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype) if dv is None else dv
    if seqlen_k == 0 or seqlen_q == 0 or batch * num_heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d, block_dv = block_size(head_dim), block_size(head_dim_v)
    cfg = _bwd_config(max(block_d, block_dv), q.dtype)
    flags = dot_flags(q.dtype)
    offset = _causal_offset(is_causal, seqlen_q, seqlen_k, align)

    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(seqlen_q, _DELTA_BLOCK_M), batch * num_heads)](
        out, do, delta, *out.stride(), *do.stride(), num_heads, seqlen_q, head_dim_v,
        BLOCK_M=_DELTA_BLOCK_M, BLOCK_DV=block_dv, num_warps=8,
    )
    common = dict(IS_CAUSAL=is_causal, BLOCK_D=block_d, BLOCK_DV=block_dv, **cfg, **flags)
    _attn_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, cfg["BLOCK_N"]), batch * num_heads)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        num_heads, seqlen_q, seqlen_k, head_dim, head_dim_v, scale * LOG2E.value, scale, offset, **common,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * num_heads)](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        num_heads, seqlen_q, seqlen_k, head_dim, head_dim_v, scale * LOG2E.value, scale, offset, **common,
    )
    for name in ("attention_bwd_delta", "attention_bwd_dkdv", "attention_bwd_dq"):
        dispatch.record_launch(name)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------
class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, is_causal, scale):
        out, lse = attention_forward(q, k, v, is_causal=is_causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, is_causal=ctx.is_causal, scale=ctx.scale)
        return dq, dk, dv, None, None


# --------------------------------------------------------------------------------------------------
# Public function and reference
# --------------------------------------------------------------------------------------------------
def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(..., L, E) -> (batch, heads, L, E) as a view where the strides allow (always for 2-4 dims)."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() == 2:
        return t[None, None]
    return t.reshape(-1, t.shape[-3], t.shape[-2], t.shape[-1])


def _check_attention_inputs(query, key, value) -> None:
    op = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, op=op)
        if t.dim() < 2:
            raise ValueError(f"{op}: {name} must have at least 2 dims (..., seqlen, head_dim), got shape {tuple(t.shape)}")
    check_same(op, {"query": query, "key": key, "value": value})
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"{op}: query, key and value must have the same number of dims, got "
                         f"{query.dim()}, {key.dim()}, {value.dim()}")
    if query.shape[:-2] != key.shape[:-2] or key.shape[:-2] != value.shape[:-2]:
        raise ValueError(f"{op}: query, key and value must share their leading (batch, heads) dims, got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}; GQA is not supported yet")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"{op}: query and key must have the same head_dim, got {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"{op}: key and value must have the same seqlen, got {key.shape[-2]} and {value.shape[-2]}")


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """softmax(scale * query @ key^T [+ causal mask]) @ value, fused (Vaswani et al., 2017, Sec. 3.2.1).

    Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` for what it supports, with the same
    semantics: ``is_causal`` masks with a top-left aligned lower triangle (query i sees keys j <= i),
    as torch does even when seqlen_q != seqlen_k::

        seqlen_q=2, seqlen_k=4      1 0 0 0
                                    1 1 0 0

    Args:
        query: ``(..., seqlen_q, head_dim)``, float16, bfloat16 or float32, any strides.
        key: ``(..., seqlen_k, head_dim)``, same leading dims, dtype and device as query.
        value: ``(..., seqlen_k, head_dim_v)``.
        attn_mask, dropout_p: not supported yet; anything other than None / 0.0 raises NotImplementedError.
        is_causal: apply the causal mask above.
        scale: softmax scale; default ``1 / sqrt(head_dim)``.

    Returns:
        ``(..., seqlen_q, head_dim_v)`` in query's dtype. Differentiable in query, key and value.

    Raises:
        TypeError: a non-tensor, an unsupported dtype (float16, bfloat16, float32 are supported) or mixed dtypes.
        ValueError: mismatched shapes or devices, or head_dim > 256 on the Triton path.
        NotImplementedError: ``attn_mask`` or ``dropout_p`` given.

    Runs the Triton kernel on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors; otherwise
    ``torch.nn.functional.scaled_dot_product_attention`` (see :func:`kernels.last_path`).
    """
    if attn_mask is not None:
        raise NotImplementedError("scaled_dot_product_attention: attn_mask is not supported yet; "
                                  "pass is_causal=True for causal masking")
    if dropout_p != 0.0:
        raise NotImplementedError("scaled_dot_product_attention: dropout_p != 0 is not supported yet")
    _check_attention_inputs(query, key, value)
    head_dim = query.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    if not dispatch.triton_available_for(query):
        dispatch.record_path("attention", "torch")
        return F.scaled_dot_product_attention(query, key, value, is_causal=bool(is_causal), scale=scale)
    if max(head_dim, value.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"scaled_dot_product_attention: head_dim {head_dim} / head_dim_v {value.shape[-1]} "
                         f"is not supported by the Triton kernel; supported: 1..{MAX_HEAD_DIM}")
    dispatch.record_path("attention", "triton")
    out = _AttentionFunction.apply(_as_4d(query), _as_4d(key), _as_4d(value), bool(is_causal), scale)
    return out.reshape(*query.shape[:-1], value.shape[-1])


def attention_reference(query, key, value, is_causal=False, scale=None, align="top_left"):
    """Plain PyTorch attention (materializes the score matrix); the tests run it in float64.

    ``align`` is ``"top_left"`` (torch) or ``"bottom_right"`` (flash-attention). Rows with no visible
    key give 0.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        seqlen_q, seqlen_k = query.shape[-2], key.shape[-2]
        offset = _causal_offset(True, seqlen_q, seqlen_k, align)
        i = torch.arange(seqlen_q, device=query.device)[:, None]
        j = torch.arange(seqlen_k, device=query.device)[None, :]
        scores = scores.masked_fill(j > i + offset, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ value
