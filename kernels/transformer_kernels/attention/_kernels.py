"""The ``@triton.jit`` code of attention: score helpers and the forward, split-combine, backward and
dropout-mask kernels (FlashAttention-2; see the package docstring, ``kernels/transformer_kernels/attention/__init__.py``)."""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton_utils import dot, tanh, to_fp8

# Globals read inside @triton.jit code must be constexpr to compile (the interpreter does not check).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# FP8 forward: P is computed as 2^P_LOG2 x the probabilities (FlashAttention-3 offsets its FP8 row max by 8
# likewise, hopper/softmax.h), so the largest is 256 and e4m3 keeps 3 mantissa bits down to 2^-14.
P_LOG2 = tl.constexpr(8.0)
P_ONE = tl.constexpr(256.0)


# --------------------------------------------------------------------------------------------------
# Kernel helpers
# --------------------------------------------------------------------------------------------------
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
            HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EDGE: tl.constexpr, FOLD: tl.constexpr,
            NATURAL: tl.constexpr):
    """Scores of a tile in base-2 units (-inf where key j is not visible to query i); with ``FOLD`` the
    raw ``q . k`` instead, which the caller scales inside the exponent (:func:`_exp2_scaled`); with
    ``NATURAL`` (fp32) in natural units, as torch adds them: ``qk_scale_log2``, ``softcap_log2`` and
    ``slope_log2`` then hold the plain scale, soft-cap and slope, and the mask is added as it is.

    ``i`` and ``j`` broadcast to the tile (either orientation). ``EDGE`` False: the caller knows every
    streamed index is in bounds and inside the band (an interior block of :func:`_walk`), so the
    positional mask is skipped. Returns ``(s, t)``: ``t`` is the soft-cap's tanh, which the backward
    needs for its derivative (the raw tile when there is none).
    """
    if HAS_SOFTCAP:
        t = tanh(qk * softcap_scale)
        s = t * softcap_log2
    else:
        t = qk
        s = qk if FOLD else qk * qk_scale_log2
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
        mask = tl.load(MASK + i * smask_m + j * smask_n, mask=inside, other=0.0).to(tl.float32)
        if not NATURAL:
            mask = mask * LOG2E
        s = s + mask
    if EDGE or MASK_KIND == 1:
        s = tl.where(valid, s, float("-inf"))
    return s, t


@triton.jit
def _exp2_scaled(s, scale_log2, shift, FOLD: tl.constexpr, NATURAL: tl.constexpr):
    """exp2(s * scale_log2 - shift) for raw scores (``FOLD``), else exp2(s - shift). Folding the softmax
    scale into the exponent makes it one FFMA per score instead of an FMUL and an FADD, as the Triton
    fused-attention tutorial does; it needs scale > 0, so the row max of q.k is that of the scores.

    ``NATURAL`` (fp32; never with ``FOLD``): s and shift in natural units, exp(s - shift) (on the GPU
    ex2 of (s - shift) * log2 e: the same instructions as the base-2 path plus one FMUL, and on sm_90a
    fewer registers than spelling out exp2 of the product: 96 instead of 255 with 237 spills, fp32
    d=128 with a mask). The difference is taken before the unit change, so its rounding scales with
    s - shift, small where the probabilities are large, as in torch's softmax; in base 2 the scores
    (tens to hundreds at T5's unscaled logits) are rounded at their own magnitude first, which cost
    fp32 up to 2.3x torch's error (issue 20)."""
    if NATURAL:
        return tl.exp(s - shift)
    if FOLD:
        return tl.exp2(s * scale_log2 - shift)
    return tl.exp2(s - shift)


@triton.jit
def _slope(ptr, HAS_ALIBI: tl.constexpr, NATURAL: tl.constexpr):
    """This head's ALiBi slope in the scores' units (natural with ``NATURAL``, else base 2); 0 without ALiBi."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ptr).to(tl.float32)
        if not NATURAL:
            slope = slope * LOG2E
    return slope


@triton.jit
def _load_tile(ptrs, seq_ok, dim_ok, CHECK_SEQ: tl.constexpr, CHECK_DIM: tl.constexpr):
    """A tile load masked only where needed: ``CHECK_SEQ`` False in an interior block of :func:`_walk`
    (every streamed row is in bounds), ``CHECK_DIM`` False when head_dim fills its block. An interior
    step then computes no predicate per element (static check: fewer instructions per iteration)."""
    if CHECK_SEQ and CHECK_DIM:
        return tl.load(ptrs, mask=seq_ok & dim_ok, other=0.0)
    elif CHECK_SEQ:
        return tl.load(ptrs, mask=seq_ok, other=0.0)
    elif CHECK_DIM:
        return tl.load(ptrs, mask=dim_ok, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _softmax_shift(LSE, STATS, offs, row_ok, sst_s, CHECK: tl.constexpr, ROW_STATS: tl.constexpr,
                   NATURAL: tl.constexpr):
    """``(shift, inv_l)`` of the rows at ``offs`` such that P = exp2(s - shift) * inv_l (``inv_l`` only
    with ``ROW_STATS``; with ``NATURAL``, exp(s - shift) * inv_l). From the logsumexp, shift = lse in base 2 and P carries the rounding of lse at
    its magnitude, which fp32 sees at large logits (dV 2.6x torch's error at scale 2.5); with
    ``ROW_STATS`` the forward's row max m and 1 / sum (``STATS``) give P = exp2(s - m) / l as torch's
    softmax computes it. A row that saw no key gets shift = +inf: its probabilities are exactly 0.
    ``NATURAL``: the shift in natural units (the stats are stored in the forward's units)."""
    if ROW_STATS:
        return (_load_tile(STATS + offs, row_ok, row_ok, CHECK, False),
                _load_tile(STATS + sst_s + offs, row_ok, row_ok, CHECK, False))
    lse = _load_tile(LSE + offs, row_ok, row_ok, CHECK, False)
    shift = tl.where(lse == float("-inf"), float("inf"), lse)
    if not NATURAL:
        shift = shift * LOG2E
    return shift, tl.full(lse.shape, 1.0, tl.float32)  # inv_l unused


@triton.jit
def _paged_rows(BLOCK_TABLE, logical, ok, page_size, sk_page, sk_n, sv_page, sv_n):
    """Element offsets of the K and V rows at ``logical`` positions of a paged cache: page
    ``BLOCK_TABLE[logical // page_size]``, slot ``logical % page_size`` (vLLM's PagedAttention layout,
    Kwon et al., 2023, as flash-attention's ``block_table``). Positions past the sequence read page 0."""
    page = tl.load(BLOCK_TABLE + logical // page_size, mask=ok, other=0).to(tl.int64)
    slot = (logical % page_size).to(tl.int64)
    return page * sk_page + slot * sk_n, page * sv_page + slot * sv_n


@triton.jit
def _dropout_keep(seed, row_base, i, j, philox_seqlen_k, philox_offset, dropout_p):
    """Philox keep-mask: element (i, j) of the (batch, head) whose rows start at ``row_base``;
    ``philox_offset`` moves the whole call inside a larger one's stream (a shard of the sequence or of the
    heads under context parallelism draws the mask one device draws there; 0 otherwise)."""
    offsets = (row_base + i) * philox_seqlen_k + j + philox_offset
    return tl.rand(seed, offsets) >= dropout_p


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, STATS, MASK, ALIBI, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, KV_BATCH_IDX,
    SINKS, BLOCK_TABLE, LEFTPAD, DESCALE,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_s, so_b, so_h, so_m, so_d,  # so_s / sl_s: split stride of the partial results (0 without splits)
    sl_s, sl_b, sl_h, sl_m, sst_s,  # sst_s: from the row maxima to the row sums in STATS
    smask_b, smask_h, smask_m, smask_n,
    salibi_b, salibi_h,
    sds_t, sds_b, sds_h,  # DESCALE (3, batch, heads_k): q, k, v descales of FP8 inputs
    num_heads, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v,
    qk_scale_log2, softcap_scale, softcap_log2, window_left, window_right,
    dropout_p, dropout_scale, seed, philox_seqlen_q, philox_seqlen_k, philox_heads, philox_offset,
    split_size, batch_heads,
    sbt_b, page_size,
    BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr, HAS_KV_BATCH_IDX: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLIT_WALK: tl.constexpr, FOLD: tl.constexpr, EVEN_D: tl.constexpr, FIXED_OFFSETS: tl.constexpr,
    TMA: tl.constexpr, PERSISTENT: tl.constexpr, ROW_STATS: tl.constexpr, NATURAL: tl.constexpr,
    HAS_SINKS: tl.constexpr, PAGED: tl.constexpr, PAGE_TILES: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Attention forward (FlashAttention-2, Alg. 1): one query block per program, or with ``PERSISTENT``
    one program per SM walking the (query block, batch x head) tiles, the last query blocks (the longest
    causal rows) first so the tail of the schedule holds the short ones (FlashAttention-3's longest-
    processing-time-first order, Shah et al., 2024)."""
    if PERSISTENT:
        m_blocks = tl.cdiv(seqlen_q, BLOCK_M)
        for tile in range(tl.program_id(0), m_blocks * batch_heads, tl.num_programs(0)):
            _attn_fwd_tile(
                m_blocks - 1 - tile // batch_heads, tile % batch_heads, 0,
                Q, K, V, O, LSE, STATS, MASK, ALIBI, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, KV_BATCH_IDX,
                SINKS, BLOCK_TABLE, LEFTPAD, DESCALE,
                sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_s, so_b, so_h, so_m, so_d,
                sl_s, sl_b, sl_h, sl_m, sst_s, smask_b, smask_h, smask_m, smask_n, salibi_b, salibi_h,
                sds_t, sds_b, sds_h, num_heads, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v,
                qk_scale_log2, softcap_scale, softcap_log2, window_left, window_right,
                dropout_p, dropout_scale, seed, philox_seqlen_q, philox_seqlen_k, philox_heads, philox_offset,
                split_size, batch_heads,
                sbt_b, page_size,
                BOTTOM_RIGHT, HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP, DROPOUT, VARLEN, HAS_SEQUSED_K,
                HAS_KV_BATCH_IDX, NUM_SPLITS, SPLIT_WALK, FOLD, EVEN_D, FIXED_OFFSETS, TMA, ROW_STATS, NATURAL,
                HAS_SINKS, PAGED, PAGE_TILES, HAS_LEFTPAD, FP8,
                BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, PRECISION)
    else:
        _attn_fwd_tile(
            tl.program_id(0) // NUM_SPLITS, tl.program_id(1), tl.program_id(0) % NUM_SPLITS,
            Q, K, V, O, LSE, STATS, MASK, ALIBI, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, KV_BATCH_IDX,
            SINKS, BLOCK_TABLE, LEFTPAD, DESCALE,
            sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_s, so_b, so_h, so_m, so_d,
            sl_s, sl_b, sl_h, sl_m, sst_s, smask_b, smask_h, smask_m, smask_n, salibi_b, salibi_h,
            sds_t, sds_b, sds_h, num_heads, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v,
            qk_scale_log2, softcap_scale, softcap_log2, window_left, window_right,
            dropout_p, dropout_scale, seed, philox_seqlen_q, philox_seqlen_k, philox_heads, philox_offset,
            split_size, batch_heads,
            sbt_b, page_size,
            BOTTOM_RIGHT, HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP, DROPOUT, VARLEN, HAS_SEQUSED_K,
            HAS_KV_BATCH_IDX, NUM_SPLITS, SPLIT_WALK, FOLD, EVEN_D, FIXED_OFFSETS, TMA, ROW_STATS, NATURAL,
            HAS_SINKS, PAGED, PAGE_TILES, HAS_LEFTPAD, FP8,
            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, PRECISION)


@triton.jit
def _attn_fwd_tile(
    pid_m, pid_bh, split,
    Q, K, V, O, LSE, STATS, MASK, ALIBI, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, KV_BATCH_IDX,
    SINKS, BLOCK_TABLE, LEFTPAD, DESCALE,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_s, so_b, so_h, so_m, so_d,  # so_s / sl_s: split stride of the partial results (0 without splits)
    sl_s, sl_b, sl_h, sl_m, sst_s,  # sst_s: from the row maxima to the row sums in STATS
    smask_b, smask_h, smask_m, smask_n,
    salibi_b, salibi_h,
    sds_t, sds_b, sds_h,  # DESCALE (3, batch, heads_k): q, k, v descales of FP8 inputs
    num_heads, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v,
    qk_scale_log2, softcap_scale, softcap_log2, window_left, window_right,
    dropout_p, dropout_scale, seed, philox_seqlen_q, philox_seqlen_k, philox_heads, philox_offset,
    split_size, batch_heads,
    sbt_b, page_size,
    BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr, HAS_KV_BATCH_IDX: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLIT_WALK: tl.constexpr, FOLD: tl.constexpr, EVEN_D: tl.constexpr, FIXED_OFFSETS: tl.constexpr,
    TMA: tl.constexpr, ROW_STATS: tl.constexpr, NATURAL: tl.constexpr,
    HAS_SINKS: tl.constexpr, PAGED: tl.constexpr, PAGE_TILES: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Query block ``pid_m`` of (batch x head) ``pid_bh``, key slice ``split`` of :func:`_attn_fwd_kernel`."""
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start, seqlen_q, k_start, seqlen_k = _sequence(b, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, seqlen_q, seqlen_k,
                                                     VARLEN, HAS_SEQUSED_K)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:  # a shorter sequence of a packed batch
        return
    page_first = tl.full([], 0, tl.int64)  # paged: the logical cache row of key 0 (cu_seqlens_k only count)
    if HAS_LEFTPAD:  # the cache of this sequence starts at row LEFTPAD[b]
        leftpad = tl.load(LEFTPAD + b)
        k_start += leftpad
        page_first += leftpad
        seqlen_k -= leftpad
    kb = b
    if HAS_KV_BATCH_IDX:
        kb = tl.load(KV_BATCH_IDX + b)
    b64, h64, kb64, hk64 = b.to(tl.int64), h.to(tl.int64), kb.to(tl.int64), (h // group_size).to(tl.int64)
    Q += b64 * sq_b + h64 * sq_h + q_start * sq_m
    if PAGED:  # K/V rows are found per tile through this sequence's row of the block table
        K += hk64 * sk_h
        V += hk64 * sv_h
        BLOCK_TABLE += b64 * sbt_b
    else:
        K += kb64 * sk_b + hk64 * sk_h + k_start * sk_n
        V += kb64 * sv_b + hk64 * sv_h + k_start * sv_n
    O += split * so_s + b64 * so_b + h64 * so_h + q_start * so_m
    LSE += split * sl_s + b64 * sl_b + h64 * sl_h + q_start * sl_m
    MASK += b64 * smask_b + h64 * smask_h
    diag = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0
    slope_log2 = _slope(ALIBI + b * salibi_b + h * salibi_h, HAS_ALIBI, NATURAL)
    if FP8:  # q.k is in units of 1 / (q_descale k_descale): both scales of the raw scores take the product
        DESCALE += b64 * sds_b + hk64 * sds_h
        qk_descale = tl.load(DESCALE) * tl.load(DESCALE + sds_t)
        qk_scale_log2 = qk_scale_log2 * qk_descale
        softcap_scale = softcap_scale * qk_descale

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q
    q = tl.load(Q + rows[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # a learnable sink: a logit of this head that joins the normalizer and takes no value
        if split == 0:  # (one key slice counts it)
            sink = tl.load(SINKS + h).to(tl.float32)
            if not NATURAL:
                sink = sink * LOG2E
            m_i = tl.full([BLOCK_M], 1.0, tl.float32) * sink
            l_i += P_ONE if FP8 else 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, hi, first, limit = _key_range(m0, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                      HAS_LEFT, HAS_RIGHT)
    # FIXED_OFFSETS: offsets within a K/V tile stay in registers and a step moves only the scalar base
    # pointer (fewer address instructions per step; costs BLOCK_N x (d + d_v) / threads registers).
    kt_offs = offs_n[None, :] * sk_n + offs_d[:, None] * sk_d
    v_offs = offs_n[:, None] * sv_n + offs_dv[None, :] * sv_d
    if TMA:  # Hopper's tensor memory accelerator: one instruction per tile, zero fill past this sequence's keys
        k_desc = tl.make_tensor_descriptor(K, shape=[seqlen_k, head_dim], strides=[sk_n, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(V, shape=[seqlen_k, head_dim_v], strides=[sv_n, 1],
                                           block_shape=[BLOCK_N, BLOCK_DV])
    if NUM_SPLITS > 1:  # flash-decoding: this program takes one slice of the keys
        lo = tl.maximum(lo, split * split_size)
        hi = tl.minimum(hi, (split + 1) * split_size)
    for part in tl.static_range(3 if SPLIT_WALK else 1):  # edge, interior (no positional mask), edge
        start, stop = _walk(part, SPLIT_WALK, lo, hi, first, limit, BLOCK_N)
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < seqlen_k
            if PAGE_TILES:  # the tile lies in one page: one table lookup, then contiguous rows
                page = tl.load(BLOCK_TABLE + start_n // page_size).to(tl.int64)
                slot = (start_n % page_size).to(tl.int64)
                k_rows = page * sk_b + slot * sk_n + offs_n * sk_n
                v_rows = page * sv_b + slot * sv_n + offs_n * sv_n
            elif PAGED:
                k_rows, v_rows = _paged_rows(BLOCK_TABLE, page_first + cols, col_ok, page_size, sk_b, sk_n, sv_b, sv_n)
            if TMA:
                kt = tl.trans(k_desc.load([start_n, 0]))
            else:
                if PAGED:
                    kt_ptrs = K + k_rows[None, :] + offs_d[:, None] * sk_d
                elif FIXED_OFFSETS:
                    kt_ptrs = K + tl.cast(start_n, tl.int64) * sk_n + kt_offs
                else:
                    kt_ptrs = K + cols[None, :] * sk_n + offs_d[:, None] * sk_d
                kt = _load_tile(kt_ptrs, col_ok[None, :], offs_d[:, None] < head_dim, part != 1, not EVEN_D)
            qk = dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION)
            s, _ = _scores(qk, rows[:, None], cols[None, :], seqlen_q, seqlen_k, diag, window_left, window_right,
                           MASK, smask_m, smask_n, slope_log2, qk_scale_log2, softcap_scale, softcap_log2,
                           HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP, part != 1, FOLD, NATURAL)
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2 if FOLD else tl.max(s, 1))
            # A row with nothing visible yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            # FP8: P in units of 2^-P_LOG2 (at most 2^P_LOG2 = 256 < e4m3's 448), so probabilities
            # down to 2^-14 stay normal numbers when P is quantized for the PV product
            p = _exp2_scaled(s, qk_scale_log2, (m_use - P_LOG2 if FP8 else m_use)[:, None], FOLD, NATURAL)
            if NATURAL:
                alpha = tl.exp(m_i - m_use)
            else:
                alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer counts dropped entries too (dropout follows softmax)
            if DROPOUT:
                keep = _dropout_keep(seed, (b.to(tl.int64) * philox_heads + h) * philox_seqlen_q, rows[:, None],
                                     cols[None, :], philox_seqlen_k, philox_offset, dropout_p)
                p = tl.where(keep, p * dropout_scale, 0.0)
            if TMA:
                v = v_desc.load([start_n, 0])
            else:
                if PAGED:
                    v_ptrs = V + v_rows[:, None] + offs_dv[None, :] * sv_d
                elif FIXED_OFFSETS:
                    v_ptrs = V + tl.cast(start_n, tl.int64) * sv_n + v_offs
                else:
                    v_ptrs = V + cols[:, None] * sv_n + offs_dv[None, :] * sv_d
                v = _load_tile(v_ptrs, col_ok[:, None], offs_dv[None, :] < head_dim_v, part != 1, not EVEN_D)
            acc = dot(to_fp8(p) if FP8 else p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
            m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    if FP8:
        o = o * tl.load(DESCALE + 2 * sds_t)
    tl.store(O + rows[:, None] * so_m + offs_dv[None, :] * so_d, o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    if NATURAL:
        lse = m_i + tl.log2(l_safe) * LN2
    elif FP8:
        lse = (m_i + tl.log2(l_safe) - P_LOG2) * LN2
    else:
        lse = (m_i + tl.log2(l_safe)) * LN2
    tl.store(LSE + rows * sl_m, tl.where(empty, float("-inf"), lse), mask=row_ok)
    if ROW_STATS:  # for an fp32 backward (see _softmax_shift); +inf makes an empty row's probabilities 0
        STATS += b64 * sl_b + h64 * sl_h + q_start * sl_m
        tl.store(STATS + rows * sl_m, tl.where(empty, float("inf"), m_i), mask=row_ok)
        tl.store(STATS + sst_s + rows * sl_m, 1.0 / l_safe, mask=row_ok)


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
    Q, K, V, DO, LSE, STATS, DELTA, DK, DV, MASK, ALIBI, CU_SEQLENS_Q, CU_SEQLENS_K,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdk_b, sdk_h, sdk_n, sdk_d,
    sdv_b, sdv_h, sdv_n, sdv_d,
    sl_b, sl_h, sl_m, sst_s,
    smask_b, smask_h, smask_m, smask_n,
    salibi_b, salibi_h,
    num_heads_k, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v,
    sm_scale, qk_scale_log2, softcap_scale, softcap_log2, window_left, window_right,
    dropout_p, dropout_scale, seed, philox_seqlen_q, philox_seqlen_k, philox_heads, philox_offset,
    BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, SPLIT_WALK: tl.constexpr, FOLD: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
    ROW_STATS: tl.constexpr, NATURAL: tl.constexpr,
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
        STATSh = STATS + b64 * sl_b + h64 * sl_h + q_start * sl_m
        DELTAh = DELTA + b64 * sl_b + h64 * sl_h + q_start * sl_m
        MASKh = MASK + b64 * smask_b + h64 * smask_h
        slope_log2 = _slope(ALIBI + b * salibi_b + h * salibi_h, HAS_ALIBI, NATURAL)
        row_base = (b64 * philox_heads + h64) * philox_seqlen_q
        if TMA:  # tensor descriptors of this head's Q and dO (see the forward)
            q_desc = tl.make_tensor_descriptor(Qh, shape=[seqlen_q, head_dim], strides=[sq_m, 1],
                                               block_shape=[BLOCK_M, BLOCK_D])
            do_desc = tl.make_tensor_descriptor(DOh, shape=[seqlen_q, head_dim_v], strides=[sdo_m, 1],
                                                block_shape=[BLOCK_M, BLOCK_DV])
        for part in tl.static_range(3 if SPLIT_WALK else 1):  # edge, interior (no positional mask), edge
            start, stop = _walk(part, SPLIT_WALK, lo, hi, first, limit, BLOCK_M)
            for start_m in range(start, stop, BLOCK_M):
                rows = start_m + offs_m
                row_ok = rows < seqlen_q
                if TMA:
                    q = q_desc.load([start_m, 0])
                    do = do_desc.load([start_m, 0])
                else:
                    q = _load_tile(Qh + rows[:, None] * sq_m + offs_d[None, :] * sq_d, row_ok[:, None],
                                   d_ok[None, :], part != 1, not EVEN_D)
                    do = _load_tile(DOh + rows[:, None] * sdo_m + offs_dv[None, :] * sdo_d, row_ok[:, None],
                                    dv_ok[None, :], part != 1, not EVEN_D)
                shift, inv_l = _softmax_shift(LSEh, STATSh, rows * sl_m, row_ok, sst_s, part != 1, ROW_STATS, NATURAL)
                delta = _load_tile(DELTAh + rows * sl_m, row_ok, row_ok, part != 1, False)
                qkt = dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, PRECISION)
                st, tt = _scores(qkt, rows[None, :], cols[:, None], seqlen_q, seqlen_k, diag, window_left,
                                 window_right, MASKh, smask_m, smask_n, slope_log2, qk_scale_log2, softcap_scale,
                                 softcap_log2, HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP, part != 1,
                                 FOLD, NATURAL)
                pt = _exp2_scaled(st, qk_scale_log2, shift[None, :], FOLD, NATURAL)
                if ROW_STATS:
                    pt = pt * inv_l[None, :]
                dpt = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, PRECISION)
                if DROPOUT:
                    keep = _dropout_keep(seed, row_base, rows[None, :], cols[:, None], philox_seqlen_k, philox_offset,
                                         dropout_p)
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
    Q, K, V, DO, LSE, STATS, DELTA, DQ, DMASK, MASK, ALIBI, CU_SEQLENS_Q, CU_SEQLENS_K,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdq_b, sdq_h, sdq_m, sdq_d,
    sdm_b, sdm_h, sdm_m, sdm_n,
    sl_b, sl_h, sl_m, sst_s,
    smask_b, smask_h, smask_m, smask_n,
    salibi_b, salibi_h,
    num_heads, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v,
    sm_scale, qk_scale_log2, softcap_scale, softcap_log2, window_left, window_right,
    dropout_p, dropout_scale, seed, philox_seqlen_q, philox_seqlen_k, philox_heads, philox_offset,
    BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, SPLIT_WALK: tl.constexpr, FOLD: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
    ROW_STATS: tl.constexpr, NATURAL: tl.constexpr, MASK_GRAD: tl.constexpr, DELTA_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ = scale * dS K for one query block, walking the key blocks it sees. With ``MASK_GRAD`` also the
    additive mask's gradient, dS itself (the mask adds to the scores after scale and soft-cap), written
    to ``DMASK`` (batch, heads, seqlen_q, seqlen_k): each element once, by the program owning its row;
    blocks no row sees are left as the caller's zeros. Summing over the dims the mask broadcasts
    along is autograd's (the mask reaches the op as an expanded view).

    ``DELTA_PASS`` (fp32): the same walk computes delta_i = sum_j P_ij dP_ij instead, from the very P and
    dP the backward kernels compute, and writes it to ``DELTA`` (no dQ). FlashAttention's delta,
    rowsum(dO * O), carries O's rounding at the magnitude of V, so where one key takes nearly all the
    probability (large logits) dP_j - delta does not cancel and dS = P (dP - delta) is noise of order
    eps |dP| where the exact value is ~0 (T5: q/k gradients 10^3 times torch's error). torch's softmax
    backward subtracts sum_j P_j dP_j from the same dP, whose error scales with 1 - P_max; so does this
    one. It costs a second walk over the keys (two products per tile) in fp32 only."""
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
    DMASK += b64 * sdm_b + h64 * sdm_h
    diag = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0
    slope_log2 = _slope(ALIBI + b * salibi_b + h * salibi_h, HAS_ALIBI, NATURAL)

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    q = tl.load(Q + rows[:, None] * sq_m + offs_d[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + rows[:, None] * sdo_m + offs_dv[None, :] * sdo_d, mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    STATS += b64 * sl_b + h64 * sl_h + q_start * sl_m
    shift, inv_l = _softmax_shift(LSE, STATS, rows * sl_m, row_ok, sst_s, True, ROW_STATS, NATURAL)
    delta = tl.zeros([BLOCK_M], tl.float32)
    if not DELTA_PASS:
        delta = tl.load(DELTA + rows * sl_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pdp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # DELTA_PASS: P dP summed per column, rows reduced at the end

    lo, hi, first, limit = _key_range(m0, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                      HAS_LEFT, HAS_RIGHT)
    if TMA:  # tensor descriptors of K and V (see the forward)
        k_desc = tl.make_tensor_descriptor(K, shape=[seqlen_k, head_dim], strides=[sk_n, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(V, shape=[seqlen_k, head_dim_v], strides=[sv_n, 1],
                                           block_shape=[BLOCK_N, BLOCK_DV])
    for part in tl.static_range(3 if SPLIT_WALK else 1):  # edge, interior (no positional mask), edge
        start, stop = _walk(part, SPLIT_WALK, lo, hi, first, limit, BLOCK_N)
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < seqlen_k
            if TMA:
                kt = tl.trans(k_desc.load([start_n, 0]))
                vt = tl.trans(v_desc.load([start_n, 0]))
            else:
                kt = _load_tile(K + cols[None, :] * sk_n + offs_d[:, None] * sk_d, col_ok[None, :], d_ok[:, None],
                                part != 1, not EVEN_D)
                vt = _load_tile(V + cols[None, :] * sv_n + offs_dv[:, None] * sv_d, col_ok[None, :],
                                dv_ok[:, None], part != 1, not EVEN_D)
            qk = dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION)
            s, t = _scores(qk, rows[:, None], cols[None, :], seqlen_q, seqlen_k, diag, window_left, window_right,
                           MASK, smask_m, smask_n, slope_log2, qk_scale_log2, softcap_scale, softcap_log2,
                           HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP, part != 1, FOLD, NATURAL)
            p = _exp2_scaled(s, qk_scale_log2, shift[:, None], FOLD, NATURAL)
            if ROW_STATS:  # P = exp2(s - m) / l, rounded as the dK/dV kernel and the delta walk round it
                p = p * inv_l[:, None]
            dp = dot(do, vt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, (b.to(tl.int64) * philox_heads + h) * philox_seqlen_q, rows[:, None],
                                     cols[None, :], philox_seqlen_k, philox_offset, dropout_p)
                dp = tl.where(keep, dp * dropout_scale, 0.0)
            if DELTA_PASS:  # P and dP exactly as the dK/dV kernel forms them: dP - delta cancels where it should
                pdp += p * dp
            else:
                ds = p * (dp - delta[:, None])
                if MASK_GRAD:
                    tl.store(DMASK + rows[:, None] * sdm_m + cols[None, :] * sdm_n, ds.to(DMASK.dtype.element_ty),
                             mask=row_ok[:, None] & col_ok[None, :])
                if HAS_SOFTCAP:
                    ds = ds * (1.0 - t * t)
                dq = dot(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST, PRECISION)

    if DELTA_PASS:
        tl.store(DELTA + rows * sl_m, tl.sum(pdp, 1), mask=row_ok)
    else:
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
                         philox_seqlen_k, 0, dropout_p)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    tl.store(KEEP + b * s_b + h * s_h + rows[:, None] * s_m + cols[None, :] * s_n, keep.to(tl.int8),
             mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))
