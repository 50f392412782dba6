"""Fused scaled-dot-product attention, forward and backward, in Triton.

Algorithm: FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention with Better Parallelism
and Work Partitioning", Algorithms 1 and 2) on the online softmax of Milakov & Gimelshein (2018,
"Online normalizer calculation for softmax"). Each program owns a block of query rows, walks the key
blocks it can see once, keeping a running max and sum, and never stores the seqlen_q x seqlen_k score
matrix; the row logsumexp is saved so the backward can rebuild the probabilities block by block. The
program layout follows the Triton tutorial "Fused Attention" (python/tutorials/06-fused-attention.py).

One kernel family serves every entry point. What a query row i sees of key j:

* bounds and per-sequence lengths (dense, packed variable-length ``cu_seqlens``, or a KV cache's
  ``seqused_k``), and grouped-query attention (query head h reads key/value head h // group_size);
* a band ``-window_left <= j - i - diag <= window_right`` (either side may be unbounded), where
  ``diag`` is 0 (top-left alignment, torch) or seqlen_k - seqlen_q (bottom-right, flash-attention);
  causal attention is the band with ``window_right = 0``. Key blocks outside the band are skipped,
  not masked, so a window of r keys costs O(r n d) (Vaswani et al., 2017, Table 1, "restricted");
* optional score modifiers: tanh soft-capping (Gemma 2), ALiBi biases (Press et al., 2022), and a
  boolean or additive ``attn_mask`` of any broadcast strides (torch's SDPA);
* optional dropout on the probabilities, drawn from a Philox counter (Salmon et al., 2011) keyed by
  (seed, batch*head, row, column), so the backward regenerates exactly the forward's mask.

Rows that see no key output 0, logsumexp -inf, and get 0 gradient (never NaN).

The backward runs two kernels rather than one with atomics: one walks query blocks (over all query
heads of a group) to build dK and dV for a key block, the other walks key blocks to build dQ. That
recomputes Q K^T once more but needs no atomics, so gradients are bitwise deterministic always.
Decoding (few query rows, long KV cache) splits the keys across programs (flash-decoding, Dao et al.
2023) and merges the partial results by their logsumexp in ``_attn_combine_kernel``.

Layers, from the metal up: ``@triton.jit`` kernels -> ``attention_forward`` / ``attention_backward``
(launchers on 4-D views) -> the ``kernels::attention_forward`` / ``kernels::attention_backward``
torch.library custom ops with their autograd and fake (meta) implementations, so ``torch.compile``
traces through them without a graph break -> ``scaled_dot_product_attention`` (torch's signature; the
flash-attention signatures live in ``kernels/flash_attn_interface.py``). ``attention_reference`` is
the plain PyTorch definition of all of it, used by the tests and by the CPU path.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch
from ._triton_utils import autocast_to, block_size, check_same, check_tensor, dot, dot_flags

# Globals read inside @triton.jit code must be constexpr to compile (the interpreter does not check).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------------
# Kernel helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # From exp, exact at the limits: overflow gives 1, underflow -1 (interpreter and GPU alike).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _sequence(b, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, seqlen_q, seqlen_k,
              VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr):
    """(first q row, seqlen_q, first k row, seqlen_k) of batch entry ``b``; starts are int64."""
    q_start = tl.full([], 0, tl.int64)
    k_start = tl.full([], 0, tl.int64)
    if VARLEN:
        q_start = tl.load(CU_SEQLENS_Q + b).to(tl.int64)
        seqlen_q = (tl.load(CU_SEQLENS_Q + b + 1) - tl.load(CU_SEQLENS_Q + b))
        k_start = tl.load(CU_SEQLENS_K + b).to(tl.int64)
        seqlen_k = (tl.load(CU_SEQLENS_K + b + 1) - tl.load(CU_SEQLENS_K + b))
    if HAS_SEQUSED_K:
        seqlen_k = tl.load(SEQUSED_K + b)
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _key_range(m0, seqlen_k, diag, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks that rows [m0, m0 + BLOCK_M) can see, ``(lo, hi)``: everything else is skipped, not
    masked. Also ``(first, limit)``: the keys in [first, limit) are visible to every one of the rows."""
    lo = 0
    hi = seqlen_k
    first = 0
    limit = seqlen_k
    if HAS_RIGHT:
        hi = tl.minimum(hi, m0 + BLOCK_M + diag + window_right)
        limit = tl.minimum(limit, m0 + diag + window_right + 1)
    if HAS_LEFT:
        lo = tl.maximum(m0 + diag - window_left, 0) // BLOCK_N * BLOCK_N
        first = m0 + BLOCK_M - 1 + diag - window_left
    return lo, hi, first, limit


@triton.jit
def _query_range(n0, seqlen_q, diag, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that see some key of [n0, n0 + BLOCK_N), ``(lo, hi)``, and the rows [first, limit)
    that see every one of those keys."""
    lo = 0
    hi = seqlen_q
    first = 0
    limit = seqlen_q
    if HAS_RIGHT:
        lo = tl.maximum(n0 - diag - window_right, 0) // BLOCK_M * BLOCK_M
        first = n0 + BLOCK_N - 1 - diag - window_right
    if HAS_LEFT:
        hi = tl.minimum(hi, n0 + BLOCK_N - diag + window_left)
        limit = tl.minimum(limit, n0 - diag + window_left + 1)
    return lo, hi, first, limit


@triton.jit
def _walk(PART: tl.constexpr, SPLIT: tl.constexpr, lo, hi, first, limit, BLOCK: tl.constexpr):
    """Part ``PART`` of the walk over the blocks starting at lo, lo + BLOCK, ... below hi, as
    ``(start, stop)`` for ``range(start, stop, BLOCK)``. With ``SPLIT`` the walk is cut in three: parts
    0 and 2 are edge blocks, part 1 the interior blocks lying wholly in [first, limit), which need no
    positional mask. This is FlashAttention-2's split of the causal walk into the blocks on the
    diagonal and those below it (Dao, 2023, Sec. 3.1, "causal masking"; the Triton tutorial's two
    "stages"), generalized to windows and ragged ends. Without ``SPLIT``, part 0 is the whole walk."""
    start = lo
    stop = hi
    if SPLIT:
        end = lo + tl.cdiv(tl.maximum(hi - lo, 0), BLOCK) * BLOCK
        n1 = tl.minimum(lo + tl.cdiv(tl.maximum(first - lo, 0), BLOCK) * BLOCK, end)
        n2 = tl.maximum(tl.minimum(lo + tl.maximum(limit - lo, 0) // BLOCK * BLOCK, end), n1)
        if PART == 0:
            stop = n1
        elif PART == 1:
            start = n1
            stop = n2
        else:
            start = n2
    return start, stop


@triton.jit
def _scores(qk, i, j, seqlen_q, seqlen_k, diag, window_left, window_right,
            MASK, smask_m, smask_n, slope_log2, qk_scale_log2, softcap_scale, softcap_log2,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
            HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EDGE: tl.constexpr):
    """Scores of a tile in base-2 units (-inf where key j is not visible to query i).

    ``i`` and ``j`` broadcast to the tile (either orientation). ``EDGE`` False: the caller knows every
    streamed index is in bounds and inside the band (an interior block of :func:`_walk`), so the
    positional mask is skipped. Returns ``(s, t)``: ``t`` is the soft-cap's tanh, which the backward
    needs for its derivative (the raw tile when there is none).
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * softcap_scale)
        s = t * softcap_log2
    else:
        t = qk
        s = qk * qk_scale_log2
    inside = (i < seqlen_q) & (j < seqlen_k)
    valid = inside
    rel = j - i - diag
    if EDGE:
        if HAS_LEFT:
            valid = valid & (rel >= -window_left)
        if HAS_RIGHT:
            valid = valid & (rel <= window_right)
    if HAS_ALIBI:
        s = s - slope_log2 * tl.abs(rel).to(tl.float32)
    if MASK_KIND == 1:  # boolean: nonzero = take part
        valid = valid & (tl.load(MASK + i * smask_m + j * smask_n, mask=inside, other=0) != 0)
    elif MASK_KIND == 2:  # additive
        s = s + tl.load(MASK + i * smask_m + j * smask_n, mask=inside, other=0.0).to(tl.float32) * LOG2E
    if EDGE or MASK_KIND == 1:
        s = tl.where(valid, s, float("-inf"))
    return s, t


@triton.jit
def _dropout_keep(seed, row_base, i, j, philox_seqlen_k, dropout_p):
    """Philox keep-mask: element (i, j) of the (batch, head) whose rows start at ``row_base``."""
    offsets = (row_base + i) * philox_seqlen_k + j
    return tl.rand(seed, offsets) >= dropout_p


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, MASK, ALIBI, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, KV_BATCH_IDX,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_s, so_b, so_h, so_m, so_d,  # so_s / sl_s: split stride of the partial results (0 without splits)
    sl_s, sl_b, sl_h, sl_m,
    smask_b, smask_h, smask_m, smask_n,
    salibi_b, salibi_h,
    num_heads, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v,
    qk_scale_log2, softcap_scale, softcap_log2, window_left, window_right,
    dropout_p, dropout_scale, seed, philox_seqlen_q, philox_seqlen_k, split_size,
    BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr, HAS_KV_BATCH_IDX: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLIT_WALK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(0) // NUM_SPLITS
    split = tl.program_id(0) % NUM_SPLITS
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start, seqlen_q, k_start, seqlen_k = _sequence(b, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, seqlen_q, seqlen_k,
                                                     VARLEN, HAS_SEQUSED_K)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:  # a shorter sequence of a packed batch
        return
    kb = b
    if HAS_KV_BATCH_IDX:
        kb = tl.load(KV_BATCH_IDX + b)
    b64, h64, kb64, hk64 = b.to(tl.int64), h.to(tl.int64), kb.to(tl.int64), (h // group_size).to(tl.int64)
    Q += b64 * sq_b + h64 * sq_h + q_start * sq_m
    K += kb64 * sk_b + hk64 * sk_h + k_start * sk_n
    V += kb64 * sv_b + hk64 * sv_h + k_start * sv_n
    O += split * so_s + b64 * so_b + h64 * so_h + q_start * so_m
    LSE += split * sl_s + b64 * sl_b + h64 * sl_h + q_start * sl_m
    MASK += b64 * smask_b + h64 * smask_h
    diag = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0
    slope_log2 = tl.load(ALIBI + b * salibi_b + h * salibi_h) * LOG2E if HAS_ALIBI else 0.0

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q
    q = tl.load(Q + rows[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, hi, first, limit = _key_range(m0, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                      HAS_LEFT, HAS_RIGHT)
    if NUM_SPLITS > 1:  # flash-decoding: this program takes one slice of the keys
        lo = tl.maximum(lo, split * split_size)
        hi = tl.minimum(hi, (split + 1) * split_size)
    for part in tl.static_range(3 if SPLIT_WALK else 1):  # edge, interior (no positional mask), edge
        start, stop = _walk(part, SPLIT_WALK, lo, hi, first, limit, BLOCK_N)
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < seqlen_k
            kt = tl.load(K + cols[None, :] * sk_n + offs_d[:, None] * sk_d,
                         mask=col_ok[None, :] & (offs_d[:, None] < head_dim), other=0.0)
            qk = dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION)
            s, _ = _scores(qk, rows[:, None], cols[None, :], seqlen_q, seqlen_k, diag, window_left, window_right,
                           MASK, smask_m, smask_n, slope_log2, qk_scale_log2, softcap_scale, softcap_log2,
                           HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP, part != 1)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer counts dropped entries too (dropout follows softmax)
            if DROPOUT:
                keep = _dropout_keep(seed, pid_bh.to(tl.int64) * philox_seqlen_q, rows[:, None], cols[None, :],
                                     philox_seqlen_k, dropout_p)
                p = tl.where(keep, p * dropout_scale, 0.0)
            v = tl.load(V + cols[:, None] * sv_n + offs_dv[None, :] * sv_d,
                        mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
            acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
            m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    tl.store(O + rows[:, None] * so_m + offs_dv[None, :] * so_d, (acc / l_safe[:, None]).to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(LSE + rows * sl_m, tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2), mask=row_ok)


@triton.jit
def _attn_combine_kernel(
    O_PART, LSE_PART, O, LSE,
    sp_s, sp_b, sp_h, sp_m, slp_s, slp_b, slp_h,
    so_b, so_h, so_m, so_d, sl_b, sl_h, sl_m,
    num_heads, seqlen_q, head_dim_v,
    NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the splits' partial outputs: out = sum_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q
    LSE_PART += b * slp_b + h * slp_h
    O_PART += b * sp_b + h * sp_h
    lse_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(NUM_SPLITS):
        lse_max = tl.maximum(lse_max, tl.load(LSE_PART + s * slp_s + rows, mask=row_ok, other=float("-inf")))
    m_use = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for s in range(NUM_SPLITS):
        w = tl.exp(tl.load(LSE_PART + s * slp_s + rows, mask=row_ok, other=float("-inf")) - m_use)
        part = tl.load(O_PART + s * sp_s + rows[:, None] * sp_m + offs_dv[None, :],
                       mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        acc += w[:, None] * part
        total += w
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    tl.store(O + b * so_b + h * so_h + rows[:, None] * so_m + offs_dv[None, :] * so_d, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    lse = tl.where(empty, float("-inf"), m_use + tl.log(tl.where(empty, 1.0, total)))
    tl.store(LSE + b * sl_b + h * sl_h + rows * sl_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    so_b, so_h, so_m, so_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sl_b, sl_h, sl_m,
    num_heads, seqlen_q, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id: the row term of the softmax Jacobian (FlashAttention-2, Alg. 2 line 4).

    Rows are rows of the physical tensors, so packed (varlen) batches need no special case.
    """
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < seqlen_q) & (offs_dv[None, :] < head_dim_v)
    o = tl.load(O + b * so_b + h * so_h + rows[:, None] * so_m + offs_dv[None, :] * so_d, mask=mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_m + offs_dv[None, :] * sdo_d, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * sl_b + h * sl_h + rows * sl_m, delta, mask=rows < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, ALIBI, CU_SEQLENS_Q, CU_SEQLENS_K,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdk_b, sdk_h, sdk_n, sdk_d,
    sdv_b, sdv_h, sdv_n, sdv_d,
    sl_b, sl_h, sl_m,
    smask_b, smask_h, smask_m, smask_n,
    salibi_b, salibi_h,
    num_heads_k, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v,
    sm_scale, qk_scale_log2, softcap_scale, softcap_log2, window_left, window_right,
    dropout_p, dropout_scale, seed, philox_seqlen_q, philox_seqlen_k,
    BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, SPLIT_WALK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dV = (P*Z)^T dO and dK = scale * dS^T Q for one key block of one K/V head, summed over the
    query heads of its group and the query blocks that see it (FlashAttention-2, Alg. 2)."""
    pid_bhk = tl.program_id(1)
    b = pid_bhk // num_heads_k
    hk = pid_bhk % num_heads_k
    q_start, seqlen_q, k_start, seqlen_k = _sequence(b, CU_SEQLENS_Q, CU_SEQLENS_K, CU_SEQLENS_K, seqlen_q, seqlen_k,
                                                     VARLEN, False)
    n0 = tl.program_id(0) * BLOCK_N
    if n0 >= seqlen_k:
        return
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    diag = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = cols < seqlen_k
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    K += b64 * sk_b + hk64 * sk_h + k_start * sk_n
    V += b64 * sv_b + hk64 * sv_h + k_start * sv_n
    k = tl.load(K + cols[:, None] * sk_n + offs_d[None, :] * sk_d, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + cols[:, None] * sv_n + offs_dv[None, :] * sv_d, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo, hi, first, limit = _query_range(n0, seqlen_q, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                        HAS_LEFT, HAS_RIGHT)

    for g in range(group_size):
        h = hk * group_size + g
        h64 = h.to(tl.int64)
        Qh = Q + b64 * sq_b + h64 * sq_h + q_start * sq_m
        DOh = DO + b64 * sdo_b + h64 * sdo_h + q_start * sdo_m
        LSEh = LSE + b64 * sl_b + h64 * sl_h + q_start * sl_m
        DELTAh = DELTA + b64 * sl_b + h64 * sl_h + q_start * sl_m
        MASKh = MASK + b64 * smask_b + h64 * smask_h
        slope_log2 = tl.load(ALIBI + b * salibi_b + h * salibi_h) * LOG2E if HAS_ALIBI else 0.0
        row_base = (b64 * num_heads_k * group_size + h64) * philox_seqlen_q
        for part in tl.static_range(3 if SPLIT_WALK else 1):  # edge, interior (no positional mask), edge
            start, stop = _walk(part, SPLIT_WALK, lo, hi, first, limit, BLOCK_M)
            for start_m in range(start, stop, BLOCK_M):
                rows = start_m + offs_m
                row_ok = rows < seqlen_q
                q = tl.load(Qh + rows[:, None] * sq_m + offs_d[None, :] * sq_d,
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                do = tl.load(DOh + rows[:, None] * sdo_m + offs_dv[None, :] * sdo_d,
                             mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
                lse = tl.load(LSEh + rows * sl_m, mask=row_ok, other=0.0)
                delta = tl.load(DELTAh + rows * sl_m, mask=row_ok, other=0.0)
                # A row that saw no key has lse = -inf; +inf there makes its probabilities exactly 0.
                lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
                qkt = dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, PRECISION)
                st, tt = _scores(qkt, rows[None, :], cols[:, None], seqlen_q, seqlen_k, diag, window_left,
                                 window_right, MASKh, smask_m, smask_n, slope_log2, qk_scale_log2, softcap_scale,
                                 softcap_log2, HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP, part != 1)
                pt = tl.exp2(st - lse2[None, :])
                dpt = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, PRECISION)
                if DROPOUT:
                    keep = _dropout_keep(seed, row_base, rows[None, :], cols[:, None], philox_seqlen_k, dropout_p)
                    dv = dot(tl.where(keep, pt * dropout_scale, 0.0).to(do.dtype), do, dv, UPCAST, PRECISION)
                    dpt = tl.where(keep, dpt * dropout_scale, 0.0)
                else:
                    dv = dot(pt.to(do.dtype), do, dv, UPCAST, PRECISION)
                dst = pt * (dpt - delta[None, :])
                if HAS_SOFTCAP:
                    dst = dst * (1.0 - tt * tt)
                dk = dot(dst.to(q.dtype), q, dk, UPCAST, PRECISION)

    DK += b64 * sdk_b + hk64 * sdk_h + k_start * sdk_n
    DV += b64 * sdv_b + hk64 * sdv_h + k_start * sdv_n
    tl.store(DK + cols[:, None] * sdk_n + offs_d[None, :] * sdk_d, (dk * sm_scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + cols[:, None] * sdv_n + offs_dv[None, :] * sdv_d, dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & dv_ok[None, :])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, ALIBI, CU_SEQLENS_Q, CU_SEQLENS_K,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdq_b, sdq_h, sdq_m, sdq_d,
    sl_b, sl_h, sl_m,
    smask_b, smask_h, smask_m, smask_n,
    salibi_b, salibi_h,
    num_heads, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v,
    sm_scale, qk_scale_log2, softcap_scale, softcap_log2, window_left, window_right,
    dropout_p, dropout_scale, seed, philox_seqlen_q, philox_seqlen_k,
    BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, SPLIT_WALK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ = scale * dS K for one query block, walking the key blocks it sees."""
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start, seqlen_q, k_start, seqlen_k = _sequence(b, CU_SEQLENS_Q, CU_SEQLENS_K, CU_SEQLENS_K, seqlen_q, seqlen_k,
                                                     VARLEN, False)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // group_size).to(tl.int64)
    Q += b64 * sq_b + h64 * sq_h + q_start * sq_m
    K += b64 * sk_b + hk64 * sk_h + k_start * sk_n
    V += b64 * sv_b + hk64 * sv_h + k_start * sv_n
    DO += b64 * sdo_b + h64 * sdo_h + q_start * sdo_m
    LSE += b64 * sl_b + h64 * sl_h + q_start * sl_m
    DELTA += b64 * sl_b + h64 * sl_h + q_start * sl_m
    MASK += b64 * smask_b + h64 * smask_h
    diag = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0
    slope_log2 = tl.load(ALIBI + b * salibi_b + h * salibi_h) * LOG2E if HAS_ALIBI else 0.0

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    q = tl.load(Q + rows[:, None] * sq_m + offs_d[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + rows[:, None] * sdo_m + offs_dv[None, :] * sdo_d, mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(LSE + rows * sl_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + rows * sl_m, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi, first, limit = _key_range(m0, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                      HAS_LEFT, HAS_RIGHT)
    for part in tl.static_range(3 if SPLIT_WALK else 1):  # edge, interior (no positional mask), edge
        start, stop = _walk(part, SPLIT_WALK, lo, hi, first, limit, BLOCK_N)
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < seqlen_k
            kt = tl.load(K + cols[None, :] * sk_n + offs_d[:, None] * sk_d, mask=col_ok[None, :] & d_ok[:, None],
                         other=0.0)
            vt = tl.load(V + cols[None, :] * sv_n + offs_dv[:, None] * sv_d, mask=col_ok[None, :] & dv_ok[:, None],
                         other=0.0)
            qk = dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION)
            s, t = _scores(qk, rows[:, None], cols[None, :], seqlen_q, seqlen_k, diag, window_left, window_right,
                           MASK, smask_m, smask_n, slope_log2, qk_scale_log2, softcap_scale, softcap_log2,
                           HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP, part != 1)
            p = tl.exp2(s - lse2[:, None])
            dp = dot(do, vt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, pid_bh.to(tl.int64) * philox_seqlen_q, rows[:, None], cols[None, :],
                                     philox_seqlen_k, dropout_p)
                dp = tl.where(keep, dp * dropout_scale, 0.0)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = dot(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST, PRECISION)

    DQ += b64 * sdq_b + h64 * sdq_h + q_start * sdq_m
    tl.store(DQ + rows[:, None] * sdq_m + offs_d[None, :] * sdq_d, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _dropout_mask_kernel(KEEP, s_b, s_h, s_m, s_n, num_heads, seqlen_q, seqlen_k, dropout_p, seed,
                         philox_seqlen_q, philox_seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the attention kernels draw, materialized (for tests and ``return_attn_probs``)."""
    pid_bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, pid_bh.to(tl.int64) * philox_seqlen_q, rows[:, None], cols[None, :],
                         philox_seqlen_k, dropout_p)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    tl.store(KEEP + b * s_b + h * s_h + rows[:, None] * s_m + cols[None, :] * s_n, keep.to(tl.int8),
             mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------
def _config(block_d: int, dtype: torch.dtype, seqlen_q: int, heavy: bool) -> dict:
    """Forward block sizes and launch shape for a head_dim padded to ``block_d``.

    Half precision: 128 query rows per program feed the tensor cores; 64 keys per step bound the fp32
    score tile; head_dim 256 halves both so the accumulator stays in registers. ``heavy`` (dropout's
    Philox state, a loaded mask, ALiBi or soft-capping live beside the score tile) takes smaller or
    wider-spread tiles. Decoding (seqlen_q <= 16) uses 16-row blocks so no program computes on padding
    rows. True fp32 has no tensor-core path and Triton's FMA dot holds whole operand rows per thread,
    so its tiles are small. Every entry compiles without spills for sm_80 and sm_90a
    (``python -m kernels.static_check``). Interpreter: 32x32 blocks (16 rows when decoding), so small
    test shapes cross several blocks.
    """
    decode = seqlen_q <= 16
    if dispatch.INTERPRETER:
        return dict(BLOCK_M=16 if decode else 32, BLOCK_N=32, num_warps=4, num_stages=1)
    if decode:
        if dtype == torch.float32:
            return dict(BLOCK_M=16, BLOCK_N=32 if block_d <= 64 else 16, num_warps=4, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=64 if block_d <= 128 else 32, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2) if block_d <= 64 else \
            dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if heavy else 4, num_stages=2 if heavy else 3)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2) if heavy else \
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8 if heavy else 4, num_stages=2)


def _bwd_configs(block_d: int, dtype: torch.dtype, heavy: bool) -> tuple[dict, dict]:
    """Backward blocks as ``(dK/dV kernel, dQ kernel)``. Each program holds two fp32 accumulators (one
    for dQ) and five operand tiles, so tiles are smaller than the forward's; same no-spill rule.

    The rows of every product are the program's own block: keys (BLOCK_N) in the dK/dV kernel, queries
    (BLOCK_M) in the dQ kernel. On sm_90a Triton emits warpgroup MMA (HGMMA) only when those rows are a
    multiple of 64 with whole warpgroups (4 warps), so that block is 64 or 128 and the streamed one
    small, as in FlashAttention-2's backward (Dao, 2023, Sec. 3.2) and the Triton fused-attention
    tutorial. ``python -m kernels.static_check`` reports the HGMMA count of each.
    """
    if dispatch.INTERPRETER:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        return cfg, cfg
    if dtype == torch.float32:  # no tensor cores: the FMA dot wants small square tiles
        if heavy:
            cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        else:
            cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2) if block_d <= 64 else \
                dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
        return cfg, cfg
    if block_d > 128:  # two 64x256 fp32 accumulators would spill: small square tiles, mma.sync
        cfg = dict(BLOCK_M=16 if heavy else 32, BLOCK_N=32, num_warps=8, num_stages=2)
        return cfg, cfg
    own, streamed = (64, 16) if heavy else (64, 32)  # heavy: Philox state, mask, ALiBi beside the tile
    # 4 warps only at head_dim 64: at 32 the split walk (see _walk) needs a stack frame on sm_80 with 4.
    warps = 4 if block_d == 64 and not heavy else 8
    stages = 1 if heavy and block_d > 64 else 2  # sm_80's cp.async pipeline costs the registers it lacks
    dkdv = dict(BLOCK_M=streamed, BLOCK_N=own, num_warps=warps, num_stages=stages)
    dq = dict(BLOCK_M=own, BLOCK_N=streamed, num_warps=warps, num_stages=stages)
    return dkdv, dq


# The row sums dO.O are memory-bound; 64 rows x 8 warps stays spill-free up to fp32 head_dim 256.
_DELTA_BLOCK_M = 64
_MAX_SPLITS = 64


def _num_splits(requested: int, programs: int, seqlen_k: int, block_n: int, device: torch.device) -> int:
    """How many slices the keys are cut into (flash-decoding). ``requested`` > 0 is honoured (capped
    at one key block per slice); 0 picks enough slices to give every SM about two programs when the
    query blocks alone cannot, keeping at least four key blocks per slice."""
    key_blocks = triton.cdiv(max(seqlen_k, 1), block_n)
    if requested > 0:
        return max(1, min(requested, key_blocks, _MAX_SPLITS))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), key_blocks // 4, _MAX_SPLITS))


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _strides4(t, varlen: bool):
    """(batch, head, row, col) strides of a 4-D view; a packed batch's rows are found from cu_seqlens."""
    s = t.stride()
    return (0 if varlen else s[0], s[1], s[2], s[3])


def _problem(q, k, v, *, scale, bottom_right, window, softcap, alibi_slopes, attn_mask, dropout_p, seed,
             cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """Sizes, strides, scalars and constexprs that every attention kernel shares."""
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    num_heads, num_heads_k = q.shape[1], k.shape[1]
    seqlen_q = max_seqlen_q if varlen else q.shape[2]
    seqlen_k = max_seqlen_k if varlen else k.shape[2]
    window_left, window_right = window
    mask_kind = 0 if attn_mask is None else (1 if attn_mask.dtype == torch.bool else 2)
    mask_strides = attn_mask.stride() if attn_mask is not None else (0, 0, 0, 0)
    if alibi_slopes is None:
        alibi_strides = (0, 0)
    else:
        alibi_strides = (0, alibi_slopes.stride(0)) if alibi_slopes.dim() == 1 else tuple(alibi_slopes.stride())
    heavy = dropout_p > 0 or attn_mask is not None or alibi_slopes is not None or softcap > 0
    return dict(
        varlen=varlen, batch=batch, num_heads=num_heads, num_heads_k=num_heads_k,
        group_size=num_heads // num_heads_k if num_heads_k else 1, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        heavy=heavy,
        head_dim=q.shape[3], head_dim_v=v.shape[3], mask_strides=mask_strides, alibi_strides=alibi_strides,
        scalars=dict(
            qk_scale_log2=scale * LOG2E.value,
            softcap_scale=scale / softcap if softcap > 0 else 0.0,
            softcap_log2=softcap * LOG2E.value,
            window_left=max(window_left, 0), window_right=max(window_right, 0),
            dropout_p=dropout_p, dropout_scale=1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else float("inf"),
            seed=seed, philox_seqlen_q=seqlen_q, philox_seqlen_k=seqlen_k,
        ),
        flags=dict(
            BOTTOM_RIGHT=bottom_right, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
            MASK_KIND=mask_kind, HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap > 0,
            DROPOUT=dropout_p > 0, VARLEN=varlen,
            # Interior blocks skip the positional mask; a heavy tile pays per element anyway, and the
            # extra loops would cost it registers it lacks (spills on sm_80, static check).
            SPLIT_WALK=not heavy,
        ),
    )


def attention_forward(q, k, v, *, scale: float, bottom_right: bool = False, window=(-1, -1), softcap: float = 0.0,
                      alibi_slopes=None, attn_mask=None, dropout_p: float = 0.0, seed: int = 0,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                      seqused_k=None, kv_batch_idx=None, num_splits: int = 1, out=None, lse=None):
    """Launch the forward on 4-D ``(batch, heads, seqlen, head_dim)`` views of any strides.

    Packed batches: ``q`` is ``(1, heads, total_q, head_dim)`` with ``cu_seqlens_q/k`` (int32, batch+1)
    and ``max_seqlen_q/k``. ``window=(left, right)`` bounds ``j - i - diag`` (-1: unbounded); causal is
    ``right = 0``. ``attn_mask`` is a 4-D (broadcast) view, bool or additive. ``seqused_k`` (int32,
    batch) and ``kv_batch_idx`` serve a KV cache; ``num_splits`` > 1 splits the keys (no dropout).
    Returns ``(out, logsumexp)``: ``out`` ``(batch, heads, seqlen_q, head_dim_v)`` in q's dtype,
    ``logsumexp`` float32 ``(batch, heads, seqlen_q)`` (natural log; -inf for a row that sees no key).
    """
    pb = _problem(q, k, v, scale=scale, bottom_right=bottom_right, window=window, softcap=softcap,
                  alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p, seed=seed,
                  cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    batch, num_heads, seqlen_q = pb["batch"], pb["num_heads"], pb["seqlen_q"]
    if out is None:
        out = torch.empty((*q.shape[:3], pb["head_dim_v"]), device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if out.numel() == 0 or batch == 0:
        return out, lse
    block_d, block_dv = block_size(pb["head_dim"]), block_size(pb["head_dim_v"])
    cfg = _config(max(block_d, block_dv), q.dtype, seqlen_q, pb["heavy"])
    m_blocks = triton.cdiv(seqlen_q, cfg["BLOCK_M"])
    splits = 1 if (dropout_p > 0 or pb["varlen"]) else _num_splits(
        num_splits, m_blocks * batch * num_heads, pb["seqlen_k"], cfg["BLOCK_N"], q.device)
    split_size = triton.cdiv(triton.cdiv(pb["seqlen_k"], splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    if splits > 1:  # partial results in fp32, merged below
        o_dst = torch.empty((splits, batch, num_heads, seqlen_q, pb["head_dim_v"]), device=q.device, dtype=torch.float32)
        l_dst = torch.empty((splits, batch, num_heads, seqlen_q), device=q.device, dtype=torch.float32)
        o_strides, l_strides = o_dst.stride(), l_dst.stride()
    else:
        o_dst, l_dst = out, lse
        o_strides = (0, *_strides4(out, pb["varlen"]))
        l_strides = (0, 0 if pb["varlen"] else lse.stride(0), lse.stride(1), lse.stride(2))
    dummy = q
    _attn_fwd_kernel[(m_blocks * splits, batch * num_heads)](
        q, k, v, o_dst, l_dst, dummy if attn_mask is None else attn_mask,
        dummy if alibi_slopes is None else alibi_slopes,
        dummy if cu_seqlens_q is None else cu_seqlens_q, dummy if cu_seqlens_k is None else cu_seqlens_k,
        dummy if seqused_k is None else seqused_k, dummy if kv_batch_idx is None else kv_batch_idx,
        *_strides4(q, pb["varlen"]), *_strides4(k, pb["varlen"]), *_strides4(v, pb["varlen"]),
        *o_strides, *l_strides, *pb["mask_strides"], *pb["alibi_strides"],
        num_heads, pb["group_size"], seqlen_q, pb["seqlen_k"], pb["head_dim"], pb["head_dim_v"],
        **pb["scalars"], split_size=split_size,
        **pb["flags"], HAS_SEQUSED_K=seqused_k is not None, HAS_KV_BATCH_IDX=kv_batch_idx is not None,
        NUM_SPLITS=splits, BLOCK_D=block_d, BLOCK_DV=block_dv, **cfg, **dot_flags(q.dtype),
    )
    dispatch.record_launch("attention_fwd")
    if splits > 1:
        _attn_combine_kernel[(triton.cdiv(seqlen_q, 16), batch * num_heads)](
            o_dst, l_dst, out, lse, *o_dst.stride()[:4], *l_dst.stride()[:3], *out.stride(), *lse.stride(),
            num_heads, seqlen_q, pb["head_dim_v"], NUM_SPLITS=splits, BLOCK_M=16, BLOCK_DV=block_dv,
        )
        dispatch.record_launch("attention_combine")
    return out, lse


def attention_backward(do, q, k, v, out, lse, *, scale: float, bottom_right: bool = False, window=(-1, -1),
                       softcap: float = 0.0, alibi_slopes=None, attn_mask=None, dropout_p: float = 0.0, seed: int = 0,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                       dq=None, dk=None, dv=None):
    """Launch the three backward kernels; same arguments as :func:`attention_forward` plus ``do``,
    ``out`` and ``lse`` from it. Returns ``(dq, dk, dv)`` in the inputs' dtype (allocated like the
    inputs unless given)."""
    pb = _problem(q, k, v, scale=scale, bottom_right=bottom_right, window=window, softcap=softcap,
                  alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p, seed=seed,
                  cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    varlen, batch, num_heads = pb["varlen"], pb["batch"], pb["num_heads"]
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if pb["seqlen_k"] == 0 or pb["seqlen_q"] == 0 or batch * num_heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if varlen:  # tokens of no sequence (beyond cu_seqlens[-1]) get no program: their gradient is 0
        for t in (dq, dk, dv):
            t.zero_()
    block_d, block_dv = block_size(pb["head_dim"]), block_size(pb["head_dim_v"])
    cfg_dkdv, cfg_dq = _bwd_configs(max(block_d, block_dv), q.dtype, pb["heavy"])
    lse_strides = (0 if varlen else lse.stride(0), lse.stride(1), lse.stride(2))
    delta = torch.empty_like(lse)
    rows_o = out.shape[2]  # physical rows: for a packed batch, all tokens
    _attn_bwd_delta_kernel[(triton.cdiv(rows_o, _DELTA_BLOCK_M), out.shape[0] * num_heads)](
        out, do, delta, *out.stride(), *do.stride(), *delta.stride(), num_heads, rows_o, pb["head_dim_v"],
        BLOCK_M=_DELTA_BLOCK_M, BLOCK_DV=block_dv, num_warps=8,
    )
    dummy = q
    tensors = dict(MASK=dummy if attn_mask is None else attn_mask, ALIBI=dummy if alibi_slopes is None else alibi_slopes,
                   CU_SEQLENS_Q=dummy if cu_seqlens_q is None else cu_seqlens_q,
                   CU_SEQLENS_K=dummy if cu_seqlens_k is None else cu_seqlens_k)
    common = dict(**pb["scalars"], **pb["flags"], BLOCK_D=block_d, BLOCK_DV=block_dv, **dot_flags(q.dtype))
    sizes = (pb["group_size"], pb["seqlen_q"], pb["seqlen_k"], pb["head_dim"], pb["head_dim_v"], scale)
    qkvdo = (*_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(do, varlen))
    _attn_bwd_dkdv_kernel[(triton.cdiv(pb["seqlen_k"], cfg_dkdv["BLOCK_N"]), batch * pb["num_heads_k"])](
        q, k, v, do, lse, delta, dk, dv, *tensors.values(),
        *qkvdo, *_strides4(dk, varlen), *_strides4(dv, varlen), *lse_strides, *pb["mask_strides"], *pb["alibi_strides"],
        pb["num_heads_k"], *sizes, **common, **cfg_dkdv,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(pb["seqlen_q"], cfg_dq["BLOCK_M"]), batch * num_heads)](
        q, k, v, do, lse, delta, dq, *tensors.values(),
        *qkvdo, *_strides4(dq, varlen), *lse_strides, *pb["mask_strides"], *pb["alibi_strides"],
        num_heads, *sizes, **common, **cfg_dq,
    )
    for name in ("attention_bwd_delta", "attention_bwd_dkdv", "attention_bwd_dq"):
        dispatch.record_launch(name)
    return dq, dk, dv


def dropout_keep_mask(batch: int, num_heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float, seed: int,
                      device) -> torch.Tensor:
    """The ``(batch, num_heads, seqlen_q, seqlen_k)`` bool keep-mask the kernels draw for ``seed``
    (for a packed batch, seqlen_q/k are max_seqlen_q/k and row i is the i-th token of its sequence)."""
    keep = torch.empty((batch, num_heads, seqlen_q, seqlen_k), device=device, dtype=torch.int8)
    if keep.numel():
        _dropout_mask_kernel[(triton.cdiv(seqlen_q, 32), triton.cdiv(seqlen_k, 32), batch * num_heads)](
            keep, *keep.stride(), num_heads, seqlen_q, seqlen_k, dropout_p, seed, seqlen_q, seqlen_k,
            BLOCK_M=32, BLOCK_N=32)
        dispatch.record_launch("attention_dropout_mask")
    return keep.bool()


# --------------------------------------------------------------------------------------------------
# torch.library custom ops: autograd and fake (meta) implementations, so torch.compile traces them
# --------------------------------------------------------------------------------------------------
def _new_out(q: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """Output shaped like the 4-D q view, laid out as q is: (batch, seqlen, heads) order when q's heads
    are the faster dim (flash-attention / packed layouts), else (batch, heads, seqlen)."""
    batch, heads, seqlen, _ = q.shape
    if q.stride(1) < q.stride(2):
        return q.new_empty((batch, seqlen, heads, head_dim_v)).transpose(1, 2)
    return q.new_empty((batch, heads, seqlen, head_dim_v))


@torch.library.custom_op("kernels::attention_forward", mutates_args=())
def _attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    attn_mask: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor], kv_batch_idx: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, scale: float, bottom_right: bool,
    window_left: int, window_right: int, softcap: float, dropout_p: float, num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, logsumexp, philox seed as a 0-dim int64 CPU tensor)."""
    # The seed comes from torch's default generator, so torch.manual_seed makes dropout repeatable.
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    out, lse = attention_forward(
        q, k, v, scale=scale, bottom_right=bottom_right, window=(window_left, window_right), softcap=softcap,
        alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p, seed=int(seed),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        seqused_k=seqused_k, kv_batch_idx=kv_batch_idx, num_splits=num_splits, out=_new_out(q, v.shape[3]))
    return out, lse, seed


@_attention_forward_op.register_fake
def _(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx, max_seqlen_q,
      max_seqlen_k, scale, bottom_right, window_left, window_right, softcap, dropout_p, num_splits):
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return _new_out(q, v.shape[3]), lse, torch.empty((), dtype=torch.int64)


@torch.library.custom_op("kernels::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    seed: torch.Tensor, attn_mask: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, scale: float, bottom_right: bool,
    window_left: int, window_right: int, softcap: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(
        dout, q, k, v, out, lse, scale=scale, bottom_right=bottom_right, window=(window_left, window_right),
        softcap=softcap, alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p, seed=int(seed),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, seed, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, scale, bottom_right, window_left, window_right, softcap, dropout_p):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_SAVED_PARAMS = ("max_seqlen_q", "max_seqlen_k", "scale", "bottom_right", "window_left", "window_right",
                 "softcap", "dropout_p")


def _setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx, *params) = inputs
    out, lse, seed = output
    ctx.kv_cache = seqused_k is not None or kv_batch_idx is not None
    ctx.save_for_backward(q, k, v, out, lse, seed, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k)
    ctx.params = dict(zip(_SAVED_PARAMS, params[:len(_SAVED_PARAMS)]))


def _backward(ctx, dout, _dlse, _dseed):
    """dQ, dK, dV; the logsumexp output is not differentiable (its gradient is ignored)."""
    if ctx.kv_cache:
        raise NotImplementedError("attention with a KV cache (seqused_k / kv_batch_idx) has no backward, "
                                  "as in flash_attn_with_kvcache")
    q, k, v, out, lse, seed, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(dout, q, k, v, out, lse, seed, attn_mask, alibi_slopes,
                                        cu_seqlens_q, cu_seqlens_k, **ctx.params)
    return (dq, dk, dv) + (None,) * 15


torch.library.register_autograd("kernels::attention_forward", _backward, setup_context=_setup_context)


def attention_op(q, k, v, *, scale, bottom_right=False, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                 attn_mask=None, dropout_p=0.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                 max_seqlen_k=0, seqused_k=None, kv_batch_idx=None, num_splits=1):
    """Differentiable, compile-safe attention on 4-D views (see :func:`attention_forward` for the
    arguments). Returns ``(out, logsumexp, seed)``. Counted as a Triton call by :func:`kernels.last_path`."""
    dispatch.record_path("attention", "triton")
    return _attention_forward_op(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                 kv_batch_idx, int(max_seqlen_q), int(max_seqlen_k), float(scale), bool(bottom_right),
                                 int(window[0]), int(window[1]), float(softcap), float(dropout_p), int(num_splits))


# --------------------------------------------------------------------------------------------------
# Public function (torch's signature) and the reference
# --------------------------------------------------------------------------------------------------
def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(..., heads, L, E) -> (batch, heads, L, E), a view where the strides allow (always for 2-4 dims).
    A 3-D tensor's first dim is heads, as torch reads it (it matters for enable_gqa)."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(0)
    if t.dim() == 2:
        return t[None, None]
    return t.reshape(-1, *t.shape[-3:])


def check_qkv(op: str, q, k, v, *, heads_dim: int, gqa: bool, names=("q", "k", "v")) -> None:
    """Dtypes, devices, ranks and sizes shared by every attention entry point. ``heads_dim`` is where
    the heads sit (-3 in torch's layout, -2 in flash-attention's); ``gqa`` allows fewer K/V heads."""
    for name, t in zip(names, (q, k, v)):
        check_tensor(name, t, op=op)
    check_same(op, dict(zip(names, (q, k, v))))
    qn, kn, vn = names
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"{op}: {qn}, {kn} and {vn} must have the same number of dims, got {q.dim()}, {k.dim()}, {v.dim()}")
    min_dims = 2 if heads_dim == -3 else 3  # torch's layout allows (seqlen, head_dim)
    if q.dim() < min_dims:
        raise ValueError(f"{op}: {qn} needs at least {min_dims} dims, got shape {tuple(q.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: {qn} and {kn} must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    seq_dim = -2 if heads_dim == -3 else -3
    if k.shape[seq_dim] != v.shape[seq_dim]:
        raise ValueError(f"{op}: {kn} and {vn} must have the same seqlen, got {k.shape[seq_dim]} and {v.shape[seq_dim]}")
    if q.dim() >= -heads_dim:
        hq, hk, hv = q.shape[heads_dim], k.shape[heads_dim], v.shape[heads_dim]
        if hk != hv:
            raise ValueError(f"{op}: {kn} and {vn} must have the same number of heads, got {hk} and {hv}")
        if hq != hk and not (gqa and hk > 0 and hq % hk == 0):
            raise ValueError(f"{op}: {qn} has {hq} heads and {kn}/{vn} {hk}: "
                             + ("the query heads must be a multiple of the key/value heads (GQA/MQA)" if gqa else
                                "they must match (pass enable_gqa=True for grouped-query attention)"))
    if not (q.shape[:-3] == k.shape[:-3] == v.shape[:-3]):
        raise ValueError(f"{op}: {qn}, {kn} and {vn} must share their batch dims, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")


def _check_dropout(op: str, dropout_p) -> float:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1], got {dropout_p!r}")
    return float(dropout_p)


def _check_sdpa_mask(attn_mask, query, key, is_causal) -> torch.Tensor | None:
    op = "scaled_dot_product_attention"
    if attn_mask is None:
        return None
    if is_causal:
        raise ValueError(f"{op}: pass either attn_mask or is_causal=True, not both (as torch)")
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{op}: attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"{op}: attn_mask must be bool (True = take part) or a float additive mask, got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but query is on {query.device}")
    target = (*query.shape[:-1], key.shape[-2])
    try:
        return attn_mask.expand(target)
    except RuntimeError:
        raise ValueError(f"{op}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(..., seqlen_q, seqlen_k) = {target}") from None


def _mask_row_extent(mask: torch.Tensor) -> int:
    """Largest element offset within one (batch, head) plane of the mask: the kernels index the plane
    in int32 (the plane's base is int64)."""
    return (mask.shape[-2] - 1) * abs(mask.stride(-2)) + (mask.shape[-1] - 1) * abs(mask.stride(-1))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """softmax(scale * query @ key^T + mask) @ value, fused (Vaswani et al., 2017, Sec. 3.2.1).

    Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` with the same semantics, except
    that a query row whose keys are all masked out returns 0 (and 0 gradient) where torch returns NaN.
    ``is_causal`` is top-left aligned, as in torch, even when seqlen_q != seqlen_k (1 = attend)::

        seqlen_q=2, seqlen_k=4      1 0 0 0        seqlen_q=4, seqlen_k=2      1 0
                                    1 1 0 0                                    1 1
                                                                               1 1
                                                                               1 1

    (``kernels.flash_attn_func``'s ``causal`` is bottom-right aligned instead.)

    Args:
        query: ``(..., num_heads, seqlen_q, head_dim)``, float16, bfloat16 or float32, any strides.
        key: ``(..., num_heads_k, seqlen_k, head_dim)``; value: ``(..., num_heads_k, seqlen_k, head_dim_v)``;
            same dtype, device and leading dims as query.
        attn_mask: broadcastable to ``(..., num_heads, seqlen_q, seqlen_k)``: bool (True = take part;
            a key-padding mask is ``(batch, 1, 1, seqlen_k)``) or float, added to the scores.
        dropout_p: probability of zeroing an attention probability (survivors scaled by 1/(1-p)),
            drawn inside the kernel from torch's default generator (``torch.manual_seed`` repeats it).
        is_causal: top-left aligned causal mask (above); not together with attn_mask.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        enable_gqa: allow num_heads_k < num_heads (a divisor): query head h reads key/value head
            h // (num_heads // num_heads_k), as torch.

    Returns:
        ``(..., num_heads, seqlen_q, head_dim_v)`` in query's dtype; differentiable in query, key, value.

    Raises:
        TypeError: non-tensors, unsupported or mixed dtypes, a mask that is neither bool nor float.
        ValueError: mismatched shapes, devices or head counts; a mask that does not broadcast; attn_mask
        together with is_causal; dropout_p outside [0, 1].

    Under ``torch.autocast``, query, key and value are cast to its dtype first, as torch's SDPA does.

    Where it runs: Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``); otherwise PyTorch. Three
    documented fallbacks to ``F.scaled_dot_product_attention``, with a warning and
    ``kernels.last_path("attention") == "torch"``: head_dim above 256, an ``attn_mask`` that requires
    grad (the kernel computes no mask gradient), and a mask whose seqlen_q x seqlen_k plane spans
    2^31 elements or more.
    """
    op = "scaled_dot_product_attention"
    query, key, value = autocast_to(query, key, value)
    check_qkv(op, query, key, value, heads_dim=-3, gqa=bool(enable_gqa), names=("query", "key", "value"))
    dropout_p = _check_dropout(op, dropout_p)
    mask = _check_sdpa_mask(attn_mask, query, key, is_causal)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)

    fallback = None
    if dispatch.triton_available_for(query):
        if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
            fallback = f"head_dim {query.shape[-1]}/{value.shape[-1]} above the kernel's {MAX_HEAD_DIM}"
        elif attn_mask is not None and attn_mask.requires_grad:
            fallback = "an attn_mask that requires grad"
        elif mask is not None and _mask_row_extent(mask) >= 2**31:
            fallback = "an attn_mask whose (seqlen_q, seqlen_k) plane spans 2^31 elements or more"
        if fallback:
            warnings.warn(f"{op}: {fallback}; falling back to torch.nn.functional.scaled_dot_product_attention",
                          stacklevel=2)
    if fallback or not dispatch.triton_available_for(query):
        dispatch.record_path("attention", "torch")
        if mask is None or fallback:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=bool(is_causal), scale=scale, enable_gqa=bool(enable_gqa))
        return attention_reference(query, key, value, scale=scale, attn_mask=mask, dropout_p=dropout_p)

    q4, k4, v4 = _as_4d(query), _as_4d(key), _as_4d(value)
    out, _, _ = attention_op(q4, k4, v4, scale=scale, window=(-1, 0) if is_causal else (-1, -1),
                             attn_mask=None if mask is None else _as_4d(mask), dropout_p=dropout_p)
    return out.reshape(*query.shape[:-1], value.shape[-1])


def attention_reference(q, k, v, *, scale=None, causal=False, bottom_right=False, window=(-1, -1), softcap=0.0,
                        alibi_slopes=None, attn_mask=None, dropout_p=0.0, dropout_keep=None, return_probs=False):
    """Plain PyTorch attention over ``(..., heads, seqlen, head_dim)`` with every feature of the kernels;
    materializes the score matrix. The tests run it in float64; the CPU path runs it in the input dtype.

    ``causal`` is ``window=(left, 0)``; ``bottom_right`` aligns the diagonal at seqlen_k - seqlen_q.
    ``dropout_keep`` (bool, broadcastable to the scores) fixes the dropout pattern; without it and with
    ``dropout_p`` > 0, one is drawn from torch's generator. Rows with no visible key give 0.
    Returns ``out``, or with ``return_probs`` ``(out, probs, logsumexp)``: the softmax probabilities,
    negated where dropout zeroed them (flash-attention's ``S_dmask``), and the rows' logsumexp of
    the scores (-inf for a row with no visible key).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:  # GQA: query head h reads K/V head h // group
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    s = (q @ k.transpose(-2, -1)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
    i = torch.arange(seqlen_q, device=q.device)[:, None]
    j = torch.arange(seqlen_k, device=q.device)[None, :]
    rel = j - i - (seqlen_k - seqlen_q if bottom_right else 0)
    left, right = window[0], 0 if causal else window[1]
    visible = torch.ones_like(rel, dtype=torch.bool)
    if left >= 0:
        visible &= rel >= -left
    if right >= 0:
        visible &= rel <= right
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype)
        s = s - slopes[..., None, None] * rel.abs().to(s.dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            s = s + attn_mask.to(s.dtype)
    s = s.masked_fill(~visible, float("-inf"))
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    # Rows with no visible key: softmax of finite stand-ins, then 0, so neither value nor gradient is NaN.
    probs = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    dropped, keep = probs, None
    if dropout_p > 0:
        keep = dropout_keep if dropout_keep is not None else torch.rand_like(probs) >= dropout_p
        dropped = torch.where(keep, probs / (1.0 - dropout_p), torch.zeros_like(probs))
    out = dropped @ v
    if not return_probs:
        return out
    signed = probs if keep is None else torch.where(keep, probs, -probs)
    return out, signed, torch.logsumexp(s, dim=-1)
