"""Fused position-wise feed-forward network, forward and backward, in Triton.

FFN(x) = act(x W1^T + b1) W2^T + b2, the Transformer's eq. (2) (Vaswani et al., 2017, Sec. 3.3), with
act = ReLU (the paper), GELU (Hendrycks & Gimpel, 2016; erf or tanh form) or SiLU; and the gated forms
of Shazeer (2020, "GLU Variants Improve Transformer"), h = act(x W_gate^T + b_gate) * (x W1^T + b1),
as SwiGLU (SiLU gate: Llama) and GeGLU (GELU gate).

Every product runs through one tiled Triton matmul (the grouped-ordering kernel of the Triton tutorial
"Matrix Multiplication", 03-matrix-multiplication.py) whose epilogue does the elementwise work while the
tile is still in registers, so no intermediate makes an extra trip through memory:

    forward   h   = act(x W1^T + b1)         bias + activation in the epilogue (the pre-activation is kept
                                             for the backward unless ``recompute``)
              h   = act(x Wg^T + bg) * (x W1^T + b1)   gated: both projections in one kernel, x read once
              y   = h W2^T + b2 [+ residual] bias (and the residual add) in the epilogue
    backward  dh' = (dy W2) * act'(.)        the activation's derivative in the epilogue (gated: both
                                             halves' gradients from one product)
              dW2 = dy^T h,  dW1 = dh'^T x,  dx = dh' W1 (+ dh'_gate Wg in the same kernel),
              db  = column sums (fp32)

With ``recompute=True`` only x is kept for the backward, which reruns the first product: activation
memory drops from 1-3 d_ff-wide tensors per token to none, for one more GEMM.

ReLU's derivative is read off the stored activation (h > 0), so it keeps no pre-activation.

``gemm="torch"`` instead runs the products through ``torch.matmul`` (cuBLAS) with the same elementwise
work in one fused Triton kernel; ``gemm="auto"`` picks per shape by :func:`_use_torch_gemm` (the rule).

Layers: ``_matmul_kernel`` / ``_ffn_elementwise_kernel`` -> ``matmul`` / ``elementwise`` (launchers) ->
``ffn_forward`` / ``ffn_backward`` -> ``transformer_kernels::ffn_forward`` / ``transformer_kernels::ffn_backward`` custom ops ->
``ffn`` -> ``FFN``, ``GatedFFN``. ``ffn_reference`` is the plain PyTorch definition.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from . import autotune, dispatch
from ._triton_utils import (InputValueError, autocast_to, check_same, check_tensor, dot, dot_flags,
                            persistent_programs, pow2_bucket, scratch_allocator, tanh, tma_device, to_fp8_rows,
                            to_out, fp8_row_scales)


PLAIN_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "quick_gelu")
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}  # name -> the gate's activation
ACTIVATIONS = PLAIN_ACTIVATIONS + tuple(GATED_ACTIVATIONS)
GEMMS = ("auto", "triton", "torch")

# Globals read inside @triton.jit code must be constexpr to compile (the interpreter does not check).
_RSQRT2 = tl.constexpr(0.7071067811865476)
_RSQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_C = tl.constexpr(0.044715)
_QUICK_GELU_C = tl.constexpr(1.702)


# --------------------------------------------------------------------------------------------------
# Activations (forward and derivative), shared by every kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.relu
    elif ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.erf(x * _RSQRT2))
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * x * (1.0 + tanh((x + x * x * x * _GELU_TANH_C) * _SQRT_2_OVER_PI))
    elif ACTIVATION == "silu":
        return x / (1.0 + tl.exp(-x))
    elif ACTIVATION == "quick_gelu":  # x sigmoid(1.702 x) (CLIP; Hendrycks & Gimpel, 2016, Sec. 2)
        return x / (1.0 + tl.exp(-(x * _QUICK_GELU_C)))
    else:
        return x


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    """d act / d x, from the pre-activation (ReLU: from either side, since x > 0 iff act(x) > 0)."""
    if ACTIVATION == "relu":
        return tl.where(x > 0.0, 1.0, 0.0)
    elif ACTIVATION == "gelu":  # Phi(x) + x phi(x)
        return 0.5 * (1.0 + tl.erf(x * _RSQRT2)) + x * tl.exp(-0.5 * x * x) * _RSQRT_2PI
    elif ACTIVATION == "gelu_tanh":
        # (constexpr on the right: the interpreter cannot multiply a constexpr by a tensor)
        t = tanh((x + x * x * x * _GELU_TANH_C) * _SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + x * x * _GELU_TANH_C * 3.0)
    elif ACTIVATION == "silu":  # s (1 + x (1 - s))
        s = 1.0 / (1.0 + tl.exp(-x))
        return s * (1.0 + x * (1.0 - s))
    else:  # quick_gelu: s (1 + 1.702 x (1 - s)), s = sigmoid(1.702 x)
        s = 1.0 / (1.0 + tl.exp(-(x * _QUICK_GELU_C)))
        return s * (1.0 + x * _QUICK_GELU_C * (1.0 - s))


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _descriptor(X, R, C, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, R_CONTIG: tl.constexpr):
    """A TMA descriptor of the (R, C) matrix X along its contiguous dim: X itself, or X^T when its
    rows are the contiguous dim (``R_CONTIG``: a transposed weight or activation)."""
    if R_CONTIG:  # (an else: Triton compiles code after a constexpr branch's return too)
        desc = tl.make_tensor_descriptor(X, shape=[C, R], strides=[stride_c, 1], block_shape=[BLOCK_C, BLOCK_R])
    else:
        desc = tl.make_tensor_descriptor(X, shape=[R, C], strides=[stride_r, 1], block_shape=[BLOCK_R, BLOCK_C])
    return desc


@triton.jit
def _descriptor_load(desc, r, c, R_CONTIG: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) tile at (r, c) of a :func:`_descriptor` matrix; zeros past its edges."""
    if R_CONTIG:
        tile = tl.trans(desc.load([c, r]))
    else:
        tile = desc.load([r, c])
    return tile


@triton.jit
def _matmul_kernel(
    A, B, C, BIAS, AUX, B2, BIAS2, A2, RES, SA, SB, SB2, AMAX,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_xm, stride_xn,
    stride_b2k, stride_b2n, stride_a2m, stride_a2k, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    EPILOGUE: tl.constexpr,  # "none" | "act" | "gated" | "act_grad" | "gated_grad"
    ACTIVATION: tl.constexpr, STORE_AUX: tl.constexpr,
    SECOND: tl.constexpr,  # "none" | "dual_b": acc2 = A @ B2 (the gate) | "sum_pair": acc += A2 @ B2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, WS: tl.constexpr, PERSISTENT: tl.constexpr, A_COLS: tl.constexpr, B_COLS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    A_FP8: tl.constexpr = "none",  # "none" | "e4m3" | "amax" | "sweep": see below
    AMAX_OUT: tl.constexpr = False,
):
    """C = epilogue(A @ B + bias) for A (M, K), B (K, N) of any strides; fp32 accumulation.

    FP8 (``A_FP8`` not "none"): B (and B2) are e4m3 with per-column float32 descales SB (SB2), and the
    product runs on e4m3 operands, dequantized in the epilogue as ``acc * SA[m] * SB[n]`` (the row-wise
    scaling of ``torch._scaled_mm``). A is either e4m3 with per-row descales SA ("e4m3"), or a float
    tensor quantized to e4m3 per row as it is loaded, with the dynamic descale amax / 448 of its row:
    the amax read from SA ("amax": computed by the producer's epilogue) or found by a first sweep over
    the program's row block ("sweep"). ``AMAX_OUT``: each row's largest |C| (as stored) is max-reduced
    into AMAX (float32, zeroed by the caller) with atomics across the column tiles.

    ``TMA``: A and B (and B2) are read through tensor descriptors (Hopper), each along its contiguous
    dim (``A_COLS`` / ``B_COLS``: the operand is column-major, e.g. a transposed weight).

    ``PERSISTENT``: each program walks the tiles pid, pid + programs, ... (the grid is about one
    program per SM), as in Triton's persistent-matmul tutorial; its descriptors are built once.

    Epilogues: "act": act(acc) (the pre-activation into AUX if STORE_AUX); "gated": act(A@B2 + bias2) *
    acc (gate and up pre-activations into AUX's two halves); "act_grad": acc * act'(AUX); "gated_grad":
    from dh = acc and AUX = [gate | up], writes [dgate | dup] into C's two halves. Then + residual.
    """
    a_desc, b_desc, b2_desc = A, B, B2  # stand-ins the pointer path never reads
    if TMA:
        a_desc = _descriptor(A, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_COLS)
        b_desc = _descriptor(B, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_COLS)
        if SECOND == "dual_b":
            b2_desc = _descriptor(B2, K, N, stride_b2k, stride_b2n, BLOCK_K, BLOCK_N, B_COLS)
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for pid in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _matmul_tile(pid, A, B, C, BIAS, AUX, B2, BIAS2, A2, RES, SA, SB, SB2, AMAX, a_desc, b_desc, b2_desc,
                         M, N, K,
                         stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_xm, stride_xn,
                         stride_b2k, stride_b2n, stride_a2m, stride_a2k, stride_rm, stride_rn,
                         HAS_BIAS, HAS_BIAS2, HAS_RESIDUAL, EPILOGUE, ACTIVATION, STORE_AUX, SECOND,
                         BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA, WS, A_COLS, B_COLS, UPCAST, PRECISION, A_FP8,
                         AMAX_OUT)
    else:
        _matmul_tile(tl.program_id(0), A, B, C, BIAS, AUX, B2, BIAS2, A2, RES, SA, SB, SB2, AMAX, a_desc, b_desc,
                     b2_desc, M, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_xm, stride_xn,
                     stride_b2k, stride_b2n, stride_a2m, stride_a2k, stride_rm, stride_rn,
                     HAS_BIAS, HAS_BIAS2, HAS_RESIDUAL, EPILOGUE, ACTIVATION, STORE_AUX, SECOND,
                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA, WS, A_COLS, B_COLS, UPCAST, PRECISION, A_FP8,
                     AMAX_OUT)


@triton.jit
def _matmul_tile(
    pid, A, B, C, BIAS, AUX, B2, BIAS2, A2, RES, SA, SB, SB2, AMAX, a_desc, b_desc, b2_desc,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_xm, stride_xn,
    stride_b2k, stride_b2n, stride_a2m, stride_a2k, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    EPILOGUE: tl.constexpr,  # "none" | "act" | "gated" | "act_grad" | "gated_grad"
    ACTIVATION: tl.constexpr, STORE_AUX: tl.constexpr,
    SECOND: tl.constexpr,  # "none" | "dual_b": acc2 = A @ B2 (the gate) | "sum_pair": acc += A2 @ B2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, WS: tl.constexpr, A_COLS: tl.constexpr, B_COLS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, A_FP8: tl.constexpr, AMAX_OUT: tl.constexpr,
):
    """Tile ``pid`` (grouped order) of :func:`_matmul_kernel`."""
    # Grouped ordering: GROUP_M row-blocks share each column-block while it is hot in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = A + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    b2_ptrs = B2 + rk[:, None] * stride_b2k + rn[None, :] * stride_b2n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if A_FP8 == "e4m3":
        sa = tl.load(SA + rm, mask=m_ok, other=0.0)
    elif A_FP8 == "amax" or A_FP8 == "sweep":
        if A_FP8 == "sweep":  # the row block's amax: a first pass whose tiles the product then rereads
            amax = tl.zeros([BLOCK_M], tl.float32)
            for k in range(0, K, BLOCK_K):
                k_ok = (k + rk) < K
                a = tl.load(a_ptrs + k * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
        else:
            amax = tl.load(SA + rm, mask=m_ok, other=0.0)
        sa, a_mult = fp8_row_scales(amax)  # the dynamic per-row descale (ffn_fp8.quantize_rows's arithmetic)
    if TMA:
        for k in tl.range(0, K, BLOCK_K, warp_specialize=WS):
            a = _descriptor_load(a_desc, pid_m * BLOCK_M, k, A_COLS)
            if A_FP8 == "amax" or A_FP8 == "sweep":
                a = to_fp8_rows(a, a_mult)
            acc = dot(a, _descriptor_load(b_desc, k, pid_n * BLOCK_N, B_COLS), acc, UPCAST, PRECISION)
            if SECOND == "dual_b":
                acc2 = dot(a, _descriptor_load(b2_desc, k, pid_n * BLOCK_N, B_COLS), acc2, UPCAST, PRECISION)
    else:
        for k in range(0, K, BLOCK_K):
            k_ok = (k + rk) < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if A_FP8 == "amax" or A_FP8 == "sweep":
                a = to_fp8_rows(a, a_mult)
            acc = dot(a, tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc, UPCAST, PRECISION)
            if SECOND == "dual_b":
                acc2 = dot(a, tl.load(b2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc2, UPCAST,
                           PRECISION)
                b2_ptrs += BLOCK_K * stride_b2k
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    if SECOND == "sum_pair":
        a2_ptrs = A2 + rm[:, None] * stride_a2m + rk[None, :] * stride_a2k
        for k in range(0, K, BLOCK_K):
            k_ok = (k + rk) < K
            a2 = tl.load(a2_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = dot(a2, tl.load(b2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc, UPCAST, PRECISION)
            a2_ptrs += BLOCK_K * stride_a2k
            b2_ptrs += BLOCK_K * stride_b2k

    mask = m_ok[:, None] & n_ok[None, :]
    if A_FP8 != "none":  # row-wise dequantization (torch._scaled_mm's scale_a (M, 1), scale_b (1, N))
        acc = acc * sa[:, None] * tl.load(SB + rn, mask=n_ok, other=0.0)[None, :]
        if SECOND == "dual_b":
            acc2 = acc2 * sa[:, None] * tl.load(SB2 + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    aux_ptrs = AUX + rm[:, None] * stride_xm + rn[None, :] * stride_xn
    c_ptrs = C + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if EPILOGUE == "act":
        if STORE_AUX:
            tl.store(aux_ptrs, acc.to(AUX.dtype.element_ty), mask=mask)
        acc = _activation(acc, ACTIVATION)
    elif EPILOGUE == "gated":
        if HAS_BIAS2:
            acc2 += tl.load(BIAS2 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if STORE_AUX:
            tl.store(aux_ptrs, acc2.to(AUX.dtype.element_ty), mask=mask)
            tl.store(aux_ptrs + N * stride_xn, acc.to(AUX.dtype.element_ty), mask=mask)
        acc = _activation(acc2, ACTIVATION) * acc
    elif EPILOGUE == "act_grad":
        acc = acc * _activation_grad(tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32), ACTIVATION)
    elif EPILOGUE == "gated_grad":
        gate = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(aux_ptrs + N * stride_xn, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, (acc * up * _activation_grad(gate, ACTIVATION)).to(C.dtype.element_ty), mask=mask)
        acc = acc * _activation(gate, ACTIVATION)
        c_ptrs += N * stride_cn
    if HAS_RESIDUAL:
        acc += tl.load(RES + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
    out = to_out(acc, C.dtype.element_ty)
    tl.store(c_ptrs, out, mask=mask)
    if AMAX_OUT:  # the next product's per-row quantization scale, from the values as stored
        tl.atomic_max(AMAX + rm, tl.max(tl.where(mask, tl.abs(out.to(tl.float32)), 0.0), axis=1), mask=m_ok)


@triton.jit
def _ffn_elementwise_kernel(
    X, AUX, OUT, M, N, stride_xm, stride_am, stride_om,
    EPILOGUE: tl.constexpr, ACTIVATION: tl.constexpr, STORE_AUX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The matmul epilogues on their own, for the cuBLAS route: X is a product's output.

    "act": OUT = act(X); "gated": X = [gate | up] (M, 2N), OUT = act(gate) * up; "act_grad": OUT = X * act'(AUX);
    "gated_grad": X = dh, AUX = [gate | up], OUT = [dgate | dup]. (Pre-activations already are X: no aux store.)
    """
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    x_ptrs = X + rm[:, None] * stride_xm + rn[None, :]
    a_ptrs = AUX + rm[:, None] * stride_am + rn[None, :]
    o_ptrs = OUT + rm[:, None] * stride_om + rn[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if EPILOGUE == "act":
        out = _activation(x, ACTIVATION)
    elif EPILOGUE == "gated":
        out = _activation(x, ACTIVATION) * tl.load(x_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    elif EPILOGUE == "act_grad":
        out = x * _activation_grad(tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32), ACTIVATION)
    else:  # gated_grad
        gate = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(a_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, (x * up * _activation_grad(gate, ACTIVATION)).to(OUT.dtype.element_ty), mask=mask)
        out = x * _activation(gate, ACTIVATION)
        o_ptrs += N
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _config(dtype: torch.dtype, epilogue: str, second: str) -> dict:
    """Tile shapes. Half precision: 128x128x64 tiles on the tensor cores with a 3-stage pipeline (64
    along K halves the per-FLOP loop overhead of 32: static check, benchmarks/NOTES.md); the
    epilogues that also hold a loaded pre-activation tile (act_grad, gated_grad) and the dual-product
    gated forward (two accumulators) narrow to 128x64 (x64 along K) to stay spill-free. True fp32 (no
    tensor cores) uses 64x64x16 tiles, halved along N when two accumulators or tiles are live. Every entry
    compiles without spills for sm_80 and sm_90a (``python -m transformer_kernels.static_check``). FP8
    (``dtype`` float8_e4m3fn: the products' operand type): 128x128x128, the gated forward 128x64x128. Interpreter:
    32^3 tiles so small test shapes still cross several tiles and every tail mask."""
    if dispatch.INTERPRETER:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float8_e4m3fn:  # FP8: 128 along K moves the bf16 tile's bytes per step
        return dict(BLOCK_M=128, BLOCK_N=64 if second == "dual_b" else 128, BLOCK_K=128, GROUP_M=8, num_warps=8,
                    num_stages=3)
    wide = epilogue in ("act_grad", "gated_grad") or second == "dual_b"
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32 if wide else 64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
    if wide:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def candidates(dtype: torch.dtype, epilogue: str, second: str, arch: str = "sm_80", residual: bool = False) -> list[dict]:
    """The matmul's launch candidates, the default (:func:`_config`) first; the device picks among them
    (:func:`transformer_kernels.autotune.choose`). On sm_90a in half precision: the default tile read through TMA
    tensor descriptors (``TMA``; the launcher drops it for operands that do not qualify), and for the
    plain products (the weight gradients, dx) a 128x256x64 TMA tile (the persistent-matmul tutorial's
    Hopper tile; spill-free only with TMA, whose loads need no per-thread addresses, and only without an
    epilogue: the activation or residual tile beside the 128x256 accumulator spills), the warp-specialized
    TMA loop (from Triton 3.7: :func:`transformer_kernels.dispatch.hopper_candidates`) and the persistent
    TMA schedule. On sm_100a (half precision and FP8, from Triton 3.7): the default, through TMA and
    TMA-persistent. Their sign on a real GPU is for the device to tell (static figures in benchmarks/NOTES.md)."""
    if (pin := _pinned()) is not None:
        return [pin]
    default = dict(_config(dtype, epilogue, second), TMA=False, WS=False, PERSISTENT=False)
    if arch == "sm_100a" and dtype == torch.float32 and not dispatch.INTERPRETER:
        # Blackwell's ptxas held the plain fp32 product (dx) at 96 registers with 2 spill instructions over
        # 4 warps; 8 warps halve each thread's accumulators: 70 registers, none (benchmarks/NOTES.md)
        default["num_warps"] = 8
    if arch == "sm_100a" and dtype != torch.float32 and not dispatch.INTERPRETER and dispatch.hopper_candidates():
        # Blackwell: the default tile read through TMA descriptors, and TMA's persistent schedule (static
        # check --arch sm_100a: the bf16 product's loop 148 -> 87 instructions, FP8's 124 -> 88, all
        # spill-free; benchmarks/NOTES.md); from Triton 3.7, as on Hopper
        return [default, dict(default, TMA=True), dict(default, TMA=True, PERSISTENT=True)]
    if dispatch.INTERPRETER or arch != "sm_90a" or dtype == torch.float32:
        return [default]
    if dtype == torch.float8_e4m3fn:
        return [default, dict(default, TMA=True)]
    found = [default, dict(default, TMA=True)]
    if epilogue == "none" and second == "none" and not residual:
        found.append(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, TMA=True,
                          WS=False, PERSISTENT=False))
    # two products in one loop do not specialize (spills, or Triton's pass fails); Triton before 3.7
    # specializes wrongly (transformer_kernels.dispatch.hopper_candidates)
    if second == "none" and dispatch.hopper_candidates():
        found.append(dict(default, num_warps=4, num_stages=4, TMA=True, WS=True))
    found.append(dict(default, TMA=True, PERSISTENT=True))
    return found


_PIN_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def _pinned() -> dict | None:
    """The matmul config ``KERNELS_FFN_CONFIG`` pins for every product, or None: a JSON object with
    positive integer ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` (powers of two, >= 16), ``GROUP_M``,
    ``num_warps`` (a power of two), ``num_stages``, and optionally ``"TMA"``, ``"WS"``,
    ``"PERSISTENT"`` (true or false; TMA is used where the operands qualify). A GPU session compares
    candidates with it. Raises ``ValueError`` for a malformed value."""
    text = os.environ.get("KERNELS_FFN_CONFIG")
    if not text:
        return None
    try:
        cfg = json.loads(text)
        flags = {k: cfg.pop(k, False) for k in ("TMA", "WS", "PERSISTENT")}
        if set(cfg) != set(_PIN_KEYS) or not all(type(v) is int and v > 0 for v in cfg.values()) or \
                not all(type(f) is bool for f in flags.values()) or \
                any(cfg[k] & (cfg[k] - 1) or cfg[k] < 16 for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) or \
                cfg["num_warps"] & (cfg["num_warps"] - 1) or (flags["WS"] and not flags["TMA"]):
            raise ValueError
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"KERNELS_FFN_CONFIG must be a JSON object of positive integer {', '.join(_PIN_KEYS)} "
                         f"(blocks powers of two >= 16, warps a power of two), optionally \"TMA\", \"WS\" (with TMA) "
                         f"and \"PERSISTENT\" true or false; got {text!r}") from None
    return cfg | flags


def _tma_operands(*operands) -> tuple[bool, list[bool]]:
    """Whether 2-D ``operands`` qualify for tensor descriptors (:func:`tma_device`, one unit stride, the
    other stride and the start 16-byte aligned), and for each whether it is column-major."""
    cols = []
    for t in operands:
        if t.stride(1) == 1:
            col, lead = False, t.stride(0)
        elif t.stride(0) == 1:
            col, lead = True, t.stride(1)
        else:
            return False, []
        if not tma_device(t) or t.data_ptr() % 16 or lead * t.element_size() % 16:
            return False, []
        cols.append(col)
    return True, cols


def matmul(a, b, bias=None, *, epilogue="none", activation="none", aux=None, store_aux=False, b2=None, bias2=None,
           a2=None, residual=None, out=None, fp8=None):
    """``epilogue(a @ b + bias) [+ residual]`` for 2-D ``a`` (M, K) and ``b`` (K, N) of any strides.

    ``b2`` with ``epilogue="gated"``: the gate's weights (K, N), one kernel computing both products;
    ``a2``/``b2`` with any other epilogue: ``+ a2 @ b2`` summed into the same accumulator. ``aux`` is
    (M, N), or (M, 2N) ``[gate | up]`` for the gated epilogues (written when ``store_aux``, read by the
    "_grad" ones). Writes into ``out`` if given, else a new contiguous tensor of a's dtype, (M, N) or
    (M, 2N) for "gated_grad".

    ``fp8``: a dict for the FP8 products (``_matmul_kernel``'s ``A_FP8``): ``"a"`` one of "e4m3", "amax",
    "sweep"; ``"sa"`` a's per-row descales ("e4m3") or amaxes ("amax"); ``"sb"`` (``"sb2"``) b's (b2's)
    per-column descales; ``"amax_out"`` a float32 (M,) (zeroed here) that receives the rows' amax of the output;
    ``"out_dtype"`` the output dtype. b and b2 are e4m3.
    """
    m, k = a.shape
    n = b.shape[1]
    width = 2 * n if epilogue == "gated_grad" else n
    fp8 = fp8 or {}
    mode = fp8.get("a", "none")
    c = torch.empty((m, width), device=a.device, dtype=fp8.get("out_dtype", a.dtype)) if out is None else out
    if c.numel() == 0:
        return c
    if k == 0:  # an empty sum; only the empty-batch backward (dW of zero tokens) reaches this
        return c.zero_()
    second = "dual_b" if epilogue == "gated" else ("sum_pair" if a2 is not None else "none")
    operand = torch.float8_e4m3fn if fp8 else a.dtype
    found = candidates(operand, epilogue, second, dispatch.target_arch(a.device), residual is not None)
    tma_ok, cols = _tma_operands(a, b, *([b2] if second == "dual_b" else []))
    if not tma_ok or len(set(cols[1:])) > 1:  # b and b2 share the kernel's B_COLS
        found, cols = [c for c in found if not c["TMA"]] or [dict(found[0], TMA=False, WS=False)], [False, False]
    a_cols, b_cols = cols[:2]
    if mode in ("sweep", "amax") and _pinned() is None:
        # The same quantization as a pass of its own, then the e4m3 product: bit-identical output, one more
        # trip of A through memory against the quantize-on-load loop's issue cost (benchmarks/NOTES.md): the
        # device picks per shape
        found = found + [dict(found[0], TMA=False, WS=False, PERSISTENT=False, PREQUANT=True)]
    aux_arg, b2_arg, a2_arg, res_arg = (t if t is not None else c for t in (aux, b2, a2, residual))
    sa, sb, sb2, amax = (fp8.get(n, c) for n in ("sa", "sb", "sb2", "amax_out"))

    def launch(cfg):
        cfg = dict(cfg)
        a_in, sa_in, a_mode = a, sa, mode
        if cfg.pop("PREQUANT", False):
            from .ffn_fp8 import quantize_rows_triton
            a_in, sa_in = quantize_rows_triton(a, sa if mode == "amax" else None)
            a_mode = "e4m3"
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        with scratch_allocator(a.device) if cfg["TMA"] else contextlib.nullcontext():
            _matmul_kernel[(min(tiles, persistent_programs(a.device)) if cfg["PERSISTENT"] else tiles,)](
                a_in, b, c, bias if bias is not None else c, aux_arg, b2_arg, bias2 if bias2 is not None else c,
                a2_arg, res_arg, sa_in, sb, sb2, amax, m, n, k,
                a_in.stride(0), a_in.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                aux_arg.stride(0), aux_arg.stride(1), b2_arg.stride(0), b2_arg.stride(1),
                a2_arg.stride(0), a2_arg.stride(1), res_arg.stride(0), res_arg.stride(1),
                HAS_BIAS=bias is not None, HAS_BIAS2=bias2 is not None, HAS_RESIDUAL=residual is not None,
                EPILOGUE=epilogue, ACTIVATION=activation, STORE_AUX=store_aux, SECOND=second,
                A_COLS=a_cols and a_in is a, B_COLS=b_cols, A_FP8=a_mode, AMAX_OUT="amax_out" in fp8, **cfg,
                **dot_flags(operand),
            )

    key = (str(a.dtype), mode, epilogue, activation, second, store_aux, residual is not None, a_cols, b_cols,
           pow2_bucket(m), pow2_bucket(n), pow2_bucket(k))
    chosen = autotune.choose("ffn_matmul", key, found, launch, a.device, kernel=_matmul_kernel,
                             outputs=lambda: [c] + ([aux] if store_aux else []))
    if "amax_out" in fp8:  # (timed candidates max-reduced into it too)
        fp8["amax_out"].zero_()
    launch(chosen)
    dispatch.record_launch("ffn_matmul")
    return c


def elementwise(x, *, epilogue, activation, aux=None, out_width=None):
    """The matmul epilogues as one fused elementwise kernel over contiguous rows (the cuBLAS route)."""
    m = x.shape[0]
    n = x.shape[1] // 2 if epilogue == "gated" else x.shape[1]
    out = torch.empty((m, 2 * n if epilogue == "gated_grad" else n), device=x.device, dtype=x.dtype)
    if out.numel():
        block_m, block_n = (16, 64) if dispatch.INTERPRETER else (8, 256)
        aux_arg = aux if aux is not None else x
        _ffn_elementwise_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            x, aux_arg, out, m, n, x.stride(0), aux_arg.stride(0), out.stride(0),
            EPILOGUE=epilogue, ACTIVATION=activation, STORE_AUX=False, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
        dispatch.record_launch("ffn_elementwise")
    return out


def _use_torch_gemm(m: int, d_model: int, d_ff: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The ``gemm="auto"`` rule: True where cuBLAS plus the fused elementwise kernel beats the Triton
    GEMM with its fused epilogue. Not yet measured on a GPU (no run recorded under
    benchmarks/results/), so it keeps the fused Triton path everywhere; the FFN benchmark is to set it."""
    return False


def ffn_forward(x, w1, b1, w2, b2, *, activation, wg=None, bg=None, residual=None, keep=True, use_torch_gemm=False):
    """Forward on a 2-D ``x`` (tokens, d_model). Returns ``(y, h, aux)``: ``h`` the (tokens, d_ff) hidden
    activation and ``aux`` the pre-activation(s) the backward needs ((tokens, 2 d_ff) ``[gate | up]`` when
    gated; None for ReLU), both None unless ``keep``."""
    gated = activation in GATED_ACTIVATIONS
    base = GATED_ACTIVATIONS.get(activation, activation)
    d_ff = w1.shape[0]
    aux = None
    if gated or base != "relu":
        aux = torch.empty((x.shape[0], 2 * d_ff if gated else d_ff), device=x.device, dtype=x.dtype) if keep else None
    if use_torch_gemm:
        pre = torch.cat([F.linear(x, wg, bg), F.linear(x, w1, b1)], dim=1) if gated else F.linear(x, w1, b1)
        h = elementwise(pre, epilogue="gated" if gated else "act", activation=base)
        aux = pre if aux is not None else None
        y = F.linear(h, w2, b2) if residual is None else F.linear(h, w2, b2) + residual
    else:
        h = matmul(x, w1.t(), b1, epilogue="gated" if gated else "act", activation=base, aux=aux,
                   store_aux=aux is not None, b2=None if wg is None else wg.t(), bias2=bg)
        y = matmul(h, w2.t(), b2, residual=residual)
    return y, (h if keep else None), aux


def ffn_backward(dy, x, w1, b1, w2, wg, bg, h, aux, *, activation, needs, use_torch_gemm=False):
    """Gradients ``(dx, dw1, db1, dw2, db2, dwg, dbg)`` (None where ``needs`` is False). ``h`` and ``aux``
    from :func:`ffn_forward` with ``keep=True``, or None to recompute them (``recompute``)."""
    need_x, need_w1, need_b1, need_w2, need_b2, need_wg, need_bg = needs
    gated = activation in GATED_ACTIVATIONS
    base = GATED_ACTIVATIONS.get(activation, activation)
    d_ff = w1.shape[0]
    if h is None:  # recompute: rerun the first product, keeping what the backward reads
        _, h, aux = ffn_forward(x, w1, b1, w2, None, activation=activation, wg=wg, bg=bg, keep=True,
                                use_torch_gemm=use_torch_gemm)
    grads = dict.fromkeys(("dx", "dw1", "db1", "dw2", "db2", "dwg", "dbg"))
    grads["dw2"] = (dy.t() @ h if use_torch_gemm else matmul(dy.t(), h)) if need_w2 else None
    if need_b2:
        grads["db2"] = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    if not (need_x or need_w1 or need_b1 or need_wg or need_bg):
        return tuple(grads.values())
    epilogue = "gated_grad" if gated else "act_grad"
    saved = aux if aux is not None else h  # ReLU's derivative reads h
    if use_torch_gemm:
        dpre = elementwise(dy @ w2, epilogue=epilogue, activation=base, aux=saved)
    else:
        dpre = matmul(dy, w2, epilogue=epilogue, activation=base, aux=saved)
    # gated: dpre = [dgate | dup], (tokens, 2 d_ff)
    dgate, dup = (dpre[:, :d_ff], dpre[:, d_ff:]) if gated else (None, dpre)
    if need_w1 or need_wg:
        dw = dpre.t() @ x if use_torch_gemm else matmul(dpre.t(), x)  # gated: [dWg; dW1] in one product
        grads["dwg"], grads["dw1"] = (dw[:d_ff], dw[d_ff:]) if gated else (None, dw)
    if need_b1 or need_bg:
        db = dpre.sum(0, dtype=torch.float32).to(dpre.dtype)
        grads["dbg"], grads["db1"] = (db[:d_ff], db[d_ff:]) if gated else (None, db)
    if need_x:
        if use_torch_gemm:
            grads["dx"] = dup @ w1 + (dgate @ wg if gated else 0)
        else:
            grads["dx"] = matmul(dup, w1, a2=dgate, b2=wg) if gated else matmul(dup, w1)
    return tuple(grads.values())


# --------------------------------------------------------------------------------------------------
# Custom ops (autograd, fake implementations): torch.compile traces through them
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("transformer_kernels::ffn_forward", mutates_args=())
def _ffn_forward_op(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                    b2: Optional[torch.Tensor], wg: Optional[torch.Tensor], bg: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], activation: str, recompute: bool, use_torch_gemm: bool,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h or empty, aux or empty)."""
    y, h, aux = ffn_forward(x, w1, b1, w2, b2, activation=activation, wg=wg, bg=bg, residual=residual,
                            keep=not recompute, use_torch_gemm=use_torch_gemm)
    return y, x.new_empty(0) if h is None else h, x.new_empty(0) if aux is None else aux


@_ffn_forward_op.register_fake
def _(x, w1, b1, w2, b2, wg, bg, residual, activation, recompute, use_torch_gemm):
    d_ff = w1.shape[0]
    gated = activation in GATED_ACTIVATIONS
    keep_aux = not recompute and (gated or activation != "relu")
    h = x.new_empty(0) if recompute else x.new_empty((x.shape[0], d_ff))
    aux = x.new_empty((x.shape[0], 2 * d_ff if gated else d_ff)) if keep_aux else x.new_empty(0)
    return x.new_empty((x.shape[0], w2.shape[0])), h, aux


@torch.library.custom_op("transformer_kernels::ffn_backward", mutates_args=())
def _ffn_backward_op(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                     w2: torch.Tensor, wg: Optional[torch.Tensor], bg: Optional[torch.Tensor], h: torch.Tensor,
                     aux: torch.Tensor, activation: str, needs: list[bool], use_torch_gemm: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    """[dx, dw1, db1, dw2, db2, dwg, dbg], an empty tensor where not needed."""
    grads = ffn_backward(dy, x, w1, b1, w2, wg, bg, h if h.numel() else None, aux if aux.numel() else None,
                         activation=activation, needs=needs, use_torch_gemm=use_torch_gemm)
    # Custom-op outputs may not alias each other: the gated weight gradients are halves of one product.
    # (A tuple, not a list: DTensor's sharding rules (_sharding.py) give each output its own placement.)
    return tuple(x.new_empty(0) if g is None else (g.clone() if g._base is not None else g) for g in grads)


@_ffn_backward_op.register_fake
def _(dy, x, w1, b1, w2, wg, bg, h, aux, activation, needs, use_torch_gemm):
    like = [x, w1, b1, w2, w2[:, 0], wg, bg]
    return tuple(torch.empty_like(t) if (n and t is not None) else x.new_empty(0) for t, n in zip(like, needs))


def _ffn_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, wg, bg, residual, activation, recompute, use_torch_gemm = inputs
    _, h, aux = output
    ctx.save_for_backward(x, w1, b1, w2, wg, bg, h, aux)
    ctx.activation, ctx.use_torch_gemm = activation, use_torch_gemm
    ctx.has = [b1 is not None, b2 is not None, wg is not None, bg is not None, residual is not None]


def _ffn_autograd_backward(ctx, dy, _dh, _daux):
    x, w1, b1, w2, wg, bg, h, aux = ctx.saved_tensors
    has_b1, has_b2, has_wg, has_bg, has_res = ctx.has
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2] and has_b1, n[3], n[4] and has_b2, n[5] and has_wg, n[6] and has_bg]
    grads = _ffn_backward_op(dy, x, w1, b1, w2, wg, bg, h, aux, ctx.activation, needs, ctx.use_torch_gemm)
    dx, dw1, db1, dw2, db2, dwg, dbg = (g if need else None for g, need in zip(grads, needs))
    dres = dy if (has_res and n[7]) else None
    return dx, dw1, db1, dw2, db2, dwg, dbg, dres, None, None, None


torch.library.register_autograd("transformer_kernels::ffn_forward", _ffn_autograd_backward, setup_context=_ffn_setup_context)


# --------------------------------------------------------------------------------------------------
# Public function, reference, modules
# --------------------------------------------------------------------------------------------------
def _check_ffn_inputs(input, weight1, bias1, weight2, bias2, activation, weight_gate, bias_gate, residual, gemm,
                      fp8=False):
    op = "ffn"
    if activation not in ACTIVATIONS:
        raise InputValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if gemm not in GEMMS:
        raise InputValueError(f"{op}: gemm must be one of {GEMMS}, got {gemm!r}")
    gated = activation in GATED_ACTIVATIONS
    if gated and weight_gate is None:
        raise InputValueError(f"{op}: the gated activation {activation!r} needs weight_gate (d_ff, d_model)")
    if not gated and (weight_gate is not None or bias_gate is not None):
        raise InputValueError(f"{op}: weight_gate/bias_gate are only for the gated activations {tuple(GATED_ACTIVATIONS)}")
    named = {"input": input, "weight1": weight1, "bias1": bias1, "weight2": weight2, "bias2": bias2,
             "weight_gate": weight_gate, "bias_gate": bias_gate, "residual": residual}
    for name, t in named.items():
        if t is not None or name in ("input", "weight1", "weight2"):
            if fp8 and not isinstance(t, torch.Tensor):
                raise InputTypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
            elif not fp8:
                check_tensor(name, t, op=op, float64=True)
    check_same(op, named, dtype=not fp8)
    if input.dim() < 1 or weight1.dim() != 2 or weight2.dim() != 2:
        raise InputValueError(f"{op}: expected input (..., d_model), weight1 (d_ff, d_model), weight2 (d_model, d_ff); "
                         f"got {tuple(input.shape)}, {tuple(weight1.shape)}, {tuple(weight2.shape)}")
    d_model, d_ff = input.shape[-1], weight1.shape[0]
    if weight1.shape[1] != d_model or tuple(weight2.shape) != (d_model, d_ff):
        raise InputValueError(f"{op}: with input (..., {d_model}) expected weight1 ({d_ff}, {d_model}) and weight2 "
                         f"({d_model}, {d_ff}); got {tuple(weight1.shape)} and {tuple(weight2.shape)}")
    if weight_gate is not None and tuple(weight_gate.shape) != tuple(weight1.shape):
        raise InputValueError(f"{op}: weight_gate must have weight1's shape {tuple(weight1.shape)}, got {tuple(weight_gate.shape)}")
    for name, t, size in (("bias1", bias1, d_ff), ("bias2", bias2, d_model), ("bias_gate", bias_gate, d_ff)):
        if t is not None and tuple(t.shape) != (size,):
            raise InputValueError(f"{op}: {name} must have shape ({size},), got {tuple(t.shape)}")
    if residual is not None and residual.shape != input.shape:
        raise InputValueError(f"{op}: residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")


def ffn(input, weight1, bias1, weight2, bias2, activation="relu", *, weight_gate=None, bias_gate=None, residual=None,
        recompute=False, gemm="auto", weight1_scale=None, weight2_scale=None, weight_gate_scale=None, input_scale=None,
        out_dtype=None):
    """Position-wise feed-forward network (Vaswani et al., 2017, eq. 2), plain or gated (Shazeer, 2020).

    Plain: ``act(input W1^T + b1) W2^T + b2``; gated (``"swiglu"``, ``"geglu"``, ``"geglu_tanh"``):
    ``(act(input Wg^T + bg) * (input W1^T + b1)) W2^T + b2``. Weights follow ``nn.Linear``'s layout, so
    ``ffn(x, l1.weight, l1.bias, l2.weight, l2.bias, "relu")`` equals ``l2(relu(l1(x)))``; for Llama's
    MLP pass ``up_proj`` as weight1, ``gate_proj`` as weight_gate and ``down_proj`` as weight2.

    Args:
        input: ``(..., d_model)``, float16, bfloat16 or float32, any strides.
        weight1: ``(d_ff, d_model)``; bias1: ``(d_ff,)`` or None. weight2: ``(d_model, d_ff)``; bias2:
            ``(d_model,)`` or None. All of input's dtype and device; any strides (a transposed view too).
        activation: ``"relu"`` (the paper), ``"gelu"`` (erf), ``"gelu_tanh"``, ``"silu"``, ``"quick_gelu"``
            (``x * sigmoid(1.702 x)``, CLIP's), or gated
            ``"swiglu"`` (SiLU gate), ``"geglu"`` (GELU gate), ``"geglu_tanh"``.
        weight_gate, bias_gate: the gate projection, shaped like weight1/bias1 (gated activations only).
        residual: optional ``(..., d_model)`` added to the output in the last product's epilogue.
        recompute: keep only the input for the backward and recompute the hidden activations there
            (one more product; saves 1-3 (tokens, d_ff) tensors of activation memory).
        gemm: ``"triton"`` (fused epilogues), ``"torch"`` (cuBLAS products + one fused elementwise
            kernel), or ``"auto"`` (the shape rule :func:`_use_torch_gemm`).
        weight1_scale, weight2_scale, weight_gate_scale: FP8 inference (:mod:`transformer_kernels.ffn_fp8`):
            with ``torch.float8_e4m3fn`` weights, their float32 scales per output channel (``(d_ff,)``,
            ``(d_model,)``; ``(n, 1)`` or one element per tensor also taken): ``W = W_fp8 * scale[:, None]``
            (:func:`transformer_kernels.ffn_fp8.quantize_rows` makes them). The input is then float16,
            bfloat16 or float32, quantized per token inside the first GEMM, or float8_e4m3fn with
            ``input_scale`` (float32, one per token: ``input.shape[:-1]``) and ``out_dtype`` (default
            bfloat16). Biases and residual in the output dtype. Both products run on FP8 tensor cores
            with row-wise scaling (``torch._scaled_mm``'s); the hidden activation is quantized per token
            with a dynamic scale. No backward (inference only: a tensor that requires grad while autograd
            records is refused); ``recompute`` does not apply; ``gemm="torch"`` is refused.

    Returns:
        ``(..., d_model)`` in input's dtype. Differentiable in every tensor argument.

    Raises:
        TypeError: non-tensor, unsupported or mixed dtypes. ValueError: shape mismatch, mixed devices,
        unknown activation or gemm, a gate given for a plain activation or missing for a gated one. FP8:
        see :func:`transformer_kernels.ffn_fp8.check` (a float8 dtype other than e4m3fn, missing or
        misshapen scales, grad, a GPU before compute capability 8.9).

    Under ``torch.autocast`` every tensor is first cast to the autocast dtype, as ``F.linear`` would.
    """
    if _fp8_requested(input, weight1, weight2, weight_gate, weight1_scale, weight2_scale, weight_gate_scale,
                      input_scale):
        return _ffn_fp8(input, weight1, bias1, weight2, bias2, activation, weight_gate, bias_gate, residual, gemm,
                        weight1_scale, weight2_scale, weight_gate_scale, input_scale, out_dtype)
    if out_dtype is not None:
        raise InputValueError("ffn: out_dtype is for FP8 calls (a float8_e4m3fn input); the output has input's dtype")
    input, weight1, bias1, weight2, bias2, weight_gate, bias_gate, residual = autocast_to(
        input, weight1, bias1, weight2, bias2, weight_gate, bias_gate, residual)
    _check_ffn_inputs(input, weight1, bias1, weight2, bias2, activation, weight_gate, bias_gate, residual, gemm)
    if not dispatch.triton_available_for(input):
        dispatch.record_path("ffn", "torch")
        return ffn_reference(input, weight1, bias1, weight2, bias2, activation, weight_gate=weight_gate,
                             bias_gate=bias_gate, residual=residual)
    dispatch.record_path("ffn", "triton")
    d_model = input.shape[-1]
    x2d = input.reshape(-1, d_model)
    use_torch_gemm = gemm == "torch" or (gemm == "auto" and _use_torch_gemm(
        x2d.shape[0], d_model, weight1.shape[0], input.dtype, input.device))
    y, _, _ = _ffn_forward_op(x2d, weight1, bias1, weight2, bias2, weight_gate, bias_gate,
                              None if residual is None else residual.reshape(-1, d_model), activation,
                              bool(recompute), use_torch_gemm)
    return y.view(*input.shape[:-1], d_model)


def _fp8_requested(input, weight1, weight2, weight_gate, *scales) -> bool:
    """Whether an :func:`ffn` call is an FP8 one: a float8 input or weight, or any FP8 scale given."""
    from .attention.fp8 import requested
    return requested((input, weight1, weight2, weight_gate), scales)


def _ffn_fp8(input, weight1, bias1, weight2, bias2, activation, weight_gate, bias_gate, residual, gemm,
             weight1_scale, weight2_scale, weight_gate_scale, input_scale, out_dtype):
    """:func:`ffn`'s FP8 route (:mod:`transformer_kernels.ffn_fp8`)."""
    from . import ffn_fp8

    _check_ffn_inputs(input, weight1, bias1, weight2, bias2, activation, weight_gate, bias_gate, residual, gemm,
                      fp8=True)
    d_ff, d_model = weight1.shape
    weights = {"weight1": weight1, "weight2": weight2, "weight_gate": weight_gate}
    biases = {"bias1": bias1, "bias2": bias2, "bias_gate": bias_gate}
    out = ffn_fp8.check("ffn", input, weights, {"weight1_scale": weight1_scale, "weight2_scale": weight2_scale,
                                                 "weight_gate_scale": weight_gate_scale},
                        biases, residual, input_scale, out_dtype, gemm)
    s1 = ffn_fp8.weight_scale_vector("ffn", "weight1_scale", weight1_scale, d_ff, weight1.device)
    s2 = ffn_fp8.weight_scale_vector("ffn", "weight2_scale", weight2_scale, d_model, weight1.device)
    sg = None if weight_gate is None else ffn_fp8.weight_scale_vector("ffn", "weight_gate_scale", weight_gate_scale,
                                                                       d_ff, weight1.device)
    if weight_gate is None and weight_gate_scale is not None:
        raise InputValueError("ffn: weight_gate_scale without weight_gate")
    sx = None if input_scale is None else input_scale.reshape(input.shape[:-1])
    if not ffn_fp8.on_triton(input):
        dispatch.record_path("ffn", "torch")
        return ffn_fp8.ffn_fp8_reference(input, weight1, s1, bias1, weight2, s2, bias2, activation,
                                         weight_gate=weight_gate, weight_gate_scale=sg, bias_gate=bias_gate,
                                         residual=residual, input_scale=sx, out_dtype=out)
    dispatch.record_path("ffn", "triton")
    x2d = input.reshape(-1, d_model)
    y = ffn_fp8._ffn_fp8_op(x2d, weight1, s1.contiguous(), bias1, weight2, s2.contiguous(), bias2, weight_gate,
                            None if sg is None else sg.contiguous(), bias_gate,
                            None if residual is None else residual.reshape(-1, d_model),
                            None if sx is None else sx.reshape(-1).contiguous(), activation, out)
    return y.view(*input.shape[:-1], d_model)


_TORCH_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
                      "silu": F.silu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


def ffn_reference(input, weight1, bias1, weight2, bias2, activation="relu", *, weight_gate=None, bias_gate=None,
                  residual=None):
    """Plain PyTorch FFN (``F.linear`` and the activation); the tests run it in float64."""
    act = _TORCH_ACTIVATIONS[GATED_ACTIVATIONS.get(activation, activation)]
    if activation in GATED_ACTIVATIONS:
        hidden = act(F.linear(input, weight_gate, bias_gate)) * F.linear(input, weight1, bias1)
    else:
        hidden = act(F.linear(input, weight1, bias1))
    out = F.linear(hidden, weight2, bias2)
    return out if residual is None else out + residual


def _fp8_scales(*linears, input_scale=None, residual=None) -> dict:
    """``ffn``'s FP8 arguments for the modules' Linears (weight1, weight2[, weight_gate]) once
    :func:`transformer_kernels.quantize_fp8` made them FP8 (a ``weight_scale`` buffer); else nothing.
    ``input_scale``: the input is e4m3 (:func:`transformer_kernels.norm_fp8`); the output then takes the
    residual's dtype (bfloat16 without one)."""
    scales = [getattr(linear, "weight_scale", None) for linear in linears]
    if scales[0] is None:
        return {} if input_scale is None else {"input_scale": input_scale}
    found = dict(zip(("weight1_scale", "weight2_scale", "weight_gate_scale"), scales))
    if input_scale is not None:
        found.update(input_scale=input_scale, out_dtype=torch.bfloat16 if residual is None else residual.dtype)
    return found


class FFN(nn.Module):
    """The position-wise feed-forward sub-layer on :func:`ffn` (plain activations).

    Parameters are ``linear1`` (d_model -> d_ff) and ``linear2`` (d_ff -> d_model), two ``nn.Linear``
    like ``nn.TransformerEncoderLayer``'s, so its ``state_dict`` keys are ``linear1.weight``,
    ``linear1.bias``, ``linear2.weight``, ``linear2.bias`` and the initialization is nn.Linear's.

    Args:
        d_model: model width (512 in the paper's base model). d_ff: inner width (2048).
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"quick_gelu"``. bias: whether the projections
            have biases. recompute: see :func:`ffn`.
    ``forward(x, residual=None, input_scale=None)``: ``(..., d_model)`` in and out; ``residual`` is added
    in the epilogue; after :func:`transformer_kernels.quantize_fp8`, ``x`` may be e4m3 with its per-token
    ``input_scale`` (:func:`transformer_kernels.norm_fp8`'s output), the output in the residual's dtype.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", bias: bool = True, recompute: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if activation not in PLAIN_ACTIVATIONS:
            raise ValueError(f"FFN: activation must be one of {PLAIN_ACTIVATIONS} (GatedFFN takes "
                             f"{tuple(GATED_ACTIVATIONS)}), got {activation!r}")
        self.activation, self.recompute = activation, recompute
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                ) -> torch.Tensor:
        return ffn(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias, self.activation,
                   residual=residual, recompute=self.recompute,
                   **_fp8_scales(self.linear1, self.linear2, input_scale=input_scale, residual=residual))

    def _fp8_linears(self):  # transformer_kernels.quantize_fp8
        return self.linear1, self.linear2

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, recompute={self.recompute}"


class GatedFFN(nn.Module):
    """The gated feed-forward sub-layer (Shazeer, 2020) on :func:`ffn`: ``down_proj(act(gate_proj(x)) *
    up_proj(x))``, with Llama's parameter names ``gate_proj``, ``up_proj``, ``down_proj`` (nn.Linear),
    so a Llama MLP's state_dict loads as is.

    Args:
        d_model, d_ff: widths. activation: ``"swiglu"`` (Llama), ``"geglu"`` or ``"geglu_tanh"`` (Gemma).
        bias: whether the projections have biases (Llama: no). recompute: see :func:`ffn`.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", bias: bool = False,
                 recompute: bool = False, device=None, dtype=None):
        super().__init__()
        if activation not in GATED_ACTIVATIONS:
            raise ValueError(f"GatedFFN: activation must be one of {tuple(GATED_ACTIVATIONS)}, got {activation!r}")
        self.activation, self.recompute = activation, recompute
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                ) -> torch.Tensor:
        return ffn(x, self.up_proj.weight, self.up_proj.bias, self.down_proj.weight, self.down_proj.bias,
                   self.activation, weight_gate=self.gate_proj.weight, bias_gate=self.gate_proj.bias,
                   residual=residual, recompute=self.recompute,
                   **_fp8_scales(self.up_proj, self.down_proj, self.gate_proj, input_scale=input_scale,
                                 residual=residual))

    def _fp8_linears(self):  # transformer_kernels.quantize_fp8
        return self.gate_proj, self.up_proj, self.down_proj

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, recompute={self.recompute}"
