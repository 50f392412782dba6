"""Launchers of the attention kernels on 4-D ``(batch, heads, seqlen, head_dim)`` views: they pick the
config, allocate and launch. The kernels are looked up on the ``_kernels`` module and the configs on
``configs`` at call time, so ``transformer_kernels.static_check`` and the tests can swap either."""

from __future__ import annotations

import contextlib

import torch
import triton

from .. import autotune, dispatch
from .._triton_utils import block_size, dot_flags, persistent_programs, pow2_bucket, scratch_allocator, tma_device
from . import _kernels as K
from . import configs
from ._kernels import LOG2E
from .configs import _DELTA_BLOCK_M


def _strides4(t, varlen: bool):
    """(batch, head, row, col) strides of a 4-D view; a packed batch's rows are found from cu_seqlens."""
    s = t.stride()
    return (0 if varlen else s[0], s[1], s[2], s[3])


def _tma_ok(tensors, varlen: bool) -> bool:
    """Whether ``tensors`` (4-D views) qualify for the forward's tensor descriptors: a device with TMA
    (compute capability 9.x; the interpreter and the static check's meta tensors also run them), a
    contiguous last dim, and a 16-byte aligned start and row, head and batch strides (TMA's rules)."""
    for t in tensors:
        if not tma_device(t):
            return False
        step = t.element_size()
        strides = [s for s, n in zip(_strides4(t, varlen)[:3], t.shape[:3]) if n > 1] + [t.stride(2)]
        if t.stride(3) != 1 or t.data_ptr() % 16 or any(s * step % 16 for s in strides):
            return False
    return True


def _scratch(device, tma: bool):
    """Global memory for the descriptors a TMA kernel builds on the device (Triton asks its allocator)."""
    return scratch_allocator(device) if tma else contextlib.nullcontext()


def _bucket(pb: dict, q, num_splits: int, *extra) -> tuple:
    """The problem class a tuned winner is kept for: dtype, head dims, the score modifiers and causal
    kind, and power-of-two buckets of the lengths and of the (batch x heads) programs."""
    flags = tuple(sorted(pb["flags"].items()))
    return (str(q.dtype), pb["head_dim"], pb["head_dim_v"], flags, pb["group_size"] > 1, pow2_bucket(pb["seqlen_q"]),
            pow2_bucket(pb["seqlen_k"]), pow2_bucket(pb["batch"] * pb["num_heads"]), num_splits, *extra)


def _problem(q, k, v, *, scale, bottom_right, window, softcap, alibi_slopes, attn_mask, dropout_p, seed,
             cu_seqlens_q, max_seqlen_q, max_seqlen_k, philox=None):
    """Sizes, strides, scalars and constexprs that every attention kernel shares. ``philox``: see
    :func:`attention_forward`."""
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
    # fp32 keeps the scores in natural units and changes base only inside the exponent, after the row
    # max is subtracted (_kernels._exp2_scaled), and its backward sums delta from P and dP (DELTA_PASS):
    # torch's rounding at large logits (issue 20). Half precision keeps base 2, folded scales, rowsum(dO O).
    natural = q.dtype == torch.float32
    unit = 1.0 if natural else LOG2E.value
    return dict(
        varlen=varlen, batch=batch, num_heads=num_heads, num_heads_k=num_heads_k,
        group_size=num_heads // num_heads_k if num_heads_k else 1, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        heavy=heavy,
        head_dim=q.shape[3], head_dim_v=v.shape[3], mask_strides=mask_strides, alibi_strides=alibi_strides,
        scalars=dict(
            qk_scale_log2=scale * unit,
            softcap_scale=scale / softcap if softcap > 0 else 0.0,
            softcap_log2=softcap * unit,
            window_left=max(window_left, 0), window_right=max(window_right, 0),
            dropout_p=dropout_p, dropout_scale=1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else float("inf"),
            seed=seed, **_philox_scalars(philox, seqlen_q, seqlen_k, num_heads),
        ),
        flags=dict(
            BOTTOM_RIGHT=bottom_right, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
            MASK_KIND=mask_kind, HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap > 0,
            DROPOUT=dropout_p > 0, VARLEN=varlen,
            # Interior blocks skip the positional mask; a heavy tile pays per element anyway, and the
            # extra loops would cost it registers it lacks (spills on sm_80, static check).
            SPLIT_WALK=not heavy,
            # Raw scores scaled inside the exponent (_exp2_scaled): not with modifiers that add to the
            # scaled scores, and only for a positive scale.
            FOLD=scale > 0 and mask_kind != 2 and alibi_slopes is None and softcap <= 0 and not natural,
            NATURAL=natural,
            # head_dim fills its block: no column mask on loads (kept for fp32, whose FMA dots have no
            # registers to spare on sm_80).
            EVEN_D=q.dtype != torch.float32 and q.shape[3] == block_size(q.shape[3])
            and v.shape[3] == block_size(v.shape[3]),
        ),
    )


def _philox_scalars(philox, seqlen_q: int, seqlen_k: int, num_heads: int) -> dict:
    """The dropout stream's geometry. By default this call's own: element (b, h, i, j) draws counter
    ((b * heads + h) * seqlen_q + i) * seqlen_k + j. ``philox = (seqlen_q, seqlen_k, heads, offset)`` names
    a larger call's geometry and where this one sits in it (``offset`` = the first element's counter
    for b = 0), so a shard of the sequence or of the heads keeps one device's mask (context parallelism)."""
    if philox is None:
        philox = (seqlen_q, seqlen_k, num_heads, 0)
    sq, sk, heads, offset = (int(x) for x in philox)
    return dict(philox_seqlen_q=sq, philox_seqlen_k=sk, philox_heads=heads, philox_offset=offset)


def attention_forward(q, k, v, *, scale: float, bottom_right: bool = False, window=(-1, -1), softcap: float = 0.0,
                      alibi_slopes=None, attn_mask=None, dropout_p: float = 0.0, seed: int = 0,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                      seqused_k=None, kv_batch_idx=None, num_splits: int = 1, out=None, lse=None,
                      stats=None, sinks=None, block_table=None, leftpad=None, philox=None, descale=None):
    """Launch the forward on 4-D ``(batch, heads, seqlen, head_dim)`` views of any strides.

    Packed batches: ``q`` is ``(1, heads, total_q, head_dim)`` with ``cu_seqlens_q/k`` (int32, batch+1)
    and ``max_seqlen_q/k``. ``window=(left, right)`` bounds ``j - i - diag`` (-1: unbounded); causal is
    ``right = 0``. ``attn_mask`` is a 4-D (broadcast) view, bool or additive. ``seqused_k`` (int32,
    batch) and ``kv_batch_idx`` serve a KV cache; ``num_splits`` > 1 splits the keys (no dropout).
    Returns ``(out, logsumexp)``: ``out`` ``(batch, heads, seqlen_q, head_dim_v)`` in q's dtype,
    ``logsumexp`` float32 ``(batch, heads, seqlen_q)`` (natural log; -inf for a row that sees no key).
    ``stats``: float32 ``(2, *logsumexp.shape)``, laid out as ``logsumexp``, to receive each row's max
    score (base 2) and softmax sum for :func:`attention_backward`'s exact-fp32 path (no key split then).
    ``sinks``: ``(heads,)`` learnable sink logits (natural units) that join each row's normalizer.
    ``block_table``: int32 ``(batch, max_pages)``: k and v are paged caches ``(num_pages, heads_k,
    page_size, head_dim)`` (4-D views) and key j of sequence b sits at slot ``(leftpad + j) % page_size``
    of page ``block_table[b, (leftpad + j) // page_size]``. ``leftpad``: int32 ``(batch,)``, the cache row
    where each sequence's keys start (``seqused_k`` stays the row where they end).
    ``philox``: ``(seqlen_q, seqlen_k, heads, offset)`` of the dropout stream when this call is a part of
    a larger one (see :func:`_philox_scalars`); default: its own.
    ``descale``: float32 ``(3, batch, heads_k)``, the q, k and v descales of float8_e4m3fn inputs
    (FlashAttention-3's ``q/k/v_descale`` stacked; a view of any strides): q . k is multiplied by
    ``q_descale * k_descale`` and the output by ``v_descale``; ``out`` is then bfloat16 by default and P
    is quantized to e4m3 for the PV product (:data:`_kernels.P_LOG2`).
    """
    pb = _problem(q, k, v, scale=scale, bottom_right=bottom_right, window=window, softcap=softcap,
                  alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p, seed=seed,
                  cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, philox=philox)
    batch, num_heads, seqlen_q = pb["batch"], pb["num_heads"], pb["seqlen_q"]
    if block_table is not None and not pb["varlen"]:  # the longest sequence the page table can hold
        pb["seqlen_k"] = block_table.shape[1] * k.shape[2]
    fp8 = descale is not None
    if out is None:
        out = torch.empty((*q.shape[:3], pb["head_dim_v"]), device=q.device,
                          dtype=torch.bfloat16 if fp8 else q.dtype)
    if lse is None:
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if stats is not None and stats[0].stride() != lse.stride():
        raise ValueError("attention_forward: stats must be laid out as the logsumexp")
    if out.numel() == 0 or batch == 0:
        return out, lse
    # an 8-bit tensor-core product takes 32 along its reduced dim (wgmma's k for e4m3)
    block_d, block_dv = block_size(pb["head_dim"], 32 if fp8 else 16), block_size(pb["head_dim_v"])
    candidates = configs.fwd_candidates(max(block_d, block_dv), q.dtype, seqlen_q, pb["heavy"],
                                        dispatch.target_arch(q.device), varlen=pb["varlen"])
    if block_table is not None or not _tma_ok((k, v), pb["varlen"]):  # a page table: rows found per tile
        candidates = [c for c in candidates if not c["TMA"]] or [dict(candidates[0], TMA=False)]
    if block_table is not None or v.stride(2) == 1:  # pages cannot be transposed; a V^T view needs no copy
        candidates = [c for c in candidates if not c.get("V_T")] or [candidates[0]]
    v_t = None
    page_args = (block_table.stride(0), k.shape[2]) if block_table is not None else (0, 1)
    kv_packed = pb["varlen"] and block_table is None  # paged K/V keep their page stride in the batch slot

    def launch(cfg):
        nonlocal v_t
        cfg = dict(cfg)
        v_in = v
        if cfg.pop("V_T", False):  # FP8: V copied head_dim-major once, so 8-bit wgmma reads it K-major
            if v_t is None:
                v_t = v.transpose(2, 3).contiguous().transpose(2, 3)
            v_in = v_t
        m_blocks = triton.cdiv(seqlen_q, cfg["BLOCK_M"])
        unsplit = dropout_p > 0 or pb["varlen"] or cfg["PERSISTENT"] or stats is not None
        splits = 1 if unsplit else configs._num_splits(num_splits, m_blocks * batch * num_heads, pb["seqlen_k"],
                                                       cfg["BLOCK_N"], q.device)
        grid = (m_blocks * splits, batch * num_heads)
        if cfg["PERSISTENT"]:
            # Two CTAs per SM at head_dim <= 64, whose tiles take half the shared memory.
            grid = (min(m_blocks * batch * num_heads, persistent_programs(q.device, 2 if block_d <= 64 else 1)), 1)
        split_size = triton.cdiv(triton.cdiv(pb["seqlen_k"], splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
        if splits > 1:  # partial results in fp32, merged below
            o_dst = torch.empty((splits, batch, num_heads, seqlen_q, pb["head_dim_v"]), device=q.device,
                                dtype=torch.float32)
            l_dst = torch.empty((splits, batch, num_heads, seqlen_q), device=q.device, dtype=torch.float32)
            o_strides, l_strides = o_dst.stride(), l_dst.stride()
        else:
            o_dst, l_dst = out, lse
            o_strides = (0, *_strides4(out, pb["varlen"]))
            l_strides = (0, 0 if pb["varlen"] else lse.stride(0), lse.stride(1), lse.stride(2))
        dummy = q
        with _scratch(q.device, cfg["TMA"]):
            K._attn_fwd_kernel[grid](
                q, k, v_in, o_dst, l_dst, dummy if stats is None else stats, dummy if attn_mask is None else attn_mask,
                dummy if alibi_slopes is None else alibi_slopes,
                dummy if cu_seqlens_q is None else cu_seqlens_q, dummy if cu_seqlens_k is None else cu_seqlens_k,
                dummy if seqused_k is None else seqused_k, dummy if kv_batch_idx is None else kv_batch_idx,
                dummy if sinks is None else sinks, dummy if block_table is None else block_table,
                dummy if leftpad is None else leftpad, descale if fp8 else dummy,
                *_strides4(q, pb["varlen"]), *_strides4(k, kv_packed), *_strides4(v_in, kv_packed),
                *o_strides, *l_strides, 0 if stats is None else stats.stride(0), *pb["mask_strides"],
                *pb["alibi_strides"], *(descale.stride() if fp8 else (0, 0, 0)),
                num_heads, pb["group_size"], seqlen_q, pb["seqlen_k"], pb["head_dim"], pb["head_dim_v"],
                **pb["scalars"], split_size=split_size, batch_heads=batch * num_heads, sbt_b=page_args[0],
                page_size=page_args[1],
                **pb["flags"], HAS_SEQUSED_K=seqused_k is not None, HAS_KV_BATCH_IDX=kv_batch_idx is not None,
                NUM_SPLITS=splits, ROW_STATS=stats is not None, HAS_SINKS=sinks is not None,
                PAGED=block_table is not None, HAS_LEFTPAD=leftpad is not None, FP8=fp8,
                BLOCK_D=block_d, BLOCK_DV=block_dv,
                # Pages a multiple of the key tile (and no left padding): a tile never straddles two pages.
                PAGE_TILES=block_table is not None and leftpad is None and page_args[1] % cfg["BLOCK_N"] == 0,
                **cfg,
                **dot_flags(q.dtype),
                # Only 128-key tiles keep their offsets in registers: it saves ~23 instructions per step there
                # (sm_90a, static check), and smaller tiles on sm_80 have no registers to spare for it.
                FIXED_OFFSETS=cfg["BLOCK_N"] >= 128,
            )
        dispatch.record_launch("attention_fwd")
        if splits > 1:
            K._attn_combine_kernel[(triton.cdiv(seqlen_q, 16), batch * num_heads)](
                o_dst, l_dst, out, lse, *o_dst.stride()[:4], *l_dst.stride()[:3], *out.stride(), *lse.stride(),
                num_heads, seqlen_q, pb["head_dim_v"], NUM_SPLITS=splits, BLOCK_M=16, BLOCK_DV=block_dv,
            )
            dispatch.record_launch("attention_combine")

    extra = (seqused_k is not None, sinks is not None, block_table is not None, leftpad is not None)
    cfg = autotune.choose("attention_fwd", _bucket(pb, q, num_splits, *extra), candidates, launch,
                          q.device, kernel=K._attn_fwd_kernel, outputs=lambda: [out, lse])
    launch(cfg)
    return out, lse


def attention_backward(do, q, k, v, out, lse, *, scale: float, bottom_right: bool = False, window=(-1, -1),
                       softcap: float = 0.0, alibi_slopes=None, attn_mask=None, dropout_p: float = 0.0, seed: int = 0,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                       dq=None, dk=None, dv=None, stats=None, dmask=None, delta=None, philox=None):
    """Launch the three backward kernels; same arguments as :func:`attention_forward` plus ``do``,
    ``out`` and ``lse`` from it, and its ``stats`` if it wrote them (probabilities then as exact as
    torch's fp32 softmax). ``dmask``: a zeroed (batch, heads, seqlen_q, seqlen_k) tensor that receives
    the additive ``attn_mask``'s gradient. ``delta``: float32, laid out as ``lse``: each row's
    sum_j P_ij dP_ij (= rowsum(dO * O)) when the caller has it (a shard of the keys, whose own P and dP
    would sum only part of it: context parallelism); ``out`` is then not read. ``philox``: as in
    :func:`attention_forward`. Returns ``(dq, dk, dv)`` in the inputs' dtype (allocated like the inputs
    unless given)."""
    pb = _problem(q, k, v, scale=scale, bottom_right=bottom_right, window=window, softcap=softcap,
                  alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p, seed=seed,
                  cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, philox=philox)
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
    dkdv_candidates, dq_candidates = configs.bwd_candidates(max(block_d, block_dv), q.dtype, pb["heavy"],
                                                             dispatch.target_arch(q.device), varlen=varlen)
    if not _tma_ok((q, do), varlen):
        dkdv_candidates = [c for c in dkdv_candidates if not c["TMA"]] or [dict(dkdv_candidates[0], TMA=False)]
    if not _tma_ok((k, v), varlen):
        dq_candidates = [c for c in dq_candidates if not c["TMA"]] or [dict(dq_candidates[0], TMA=False)]
    lse_strides = (0 if varlen else lse.stride(0), lse.stride(1), lse.stride(2),
                   0 if stats is None else stats.stride(0))
    given_delta = delta is not None
    natural = pb["flags"]["NATURAL"] and not given_delta
    if given_delta:
        if delta.dtype != torch.float32 or delta.stride() != lse.stride() or delta.shape != lse.shape:
            raise ValueError("attention_backward: delta must be float32 and laid out as the logsumexp")
    elif natural:
        # rowsum(P dP) by the dQ kernel's walk (DELTA_PASS, below); rows of no sequence (packed batches) stay 0
        delta = torch.zeros_like(lse)
    else:
        delta = torch.empty_like(lse)
        rows_o = out.shape[2]  # physical rows: for a packed batch, all tokens
        K._attn_bwd_delta_kernel[(triton.cdiv(rows_o, _DELTA_BLOCK_M), out.shape[0] * num_heads)](
            out, do, delta, *out.stride(), *do.stride(), *delta.stride(), num_heads, rows_o, pb["head_dim_v"],
            BLOCK_M=_DELTA_BLOCK_M, BLOCK_DV=block_dv, num_warps=8,
        )
    dummy = q
    tensors = dict(MASK=dummy if attn_mask is None else attn_mask, ALIBI=dummy if alibi_slopes is None else alibi_slopes,
                   CU_SEQLENS_Q=dummy if cu_seqlens_q is None else cu_seqlens_q,
                   CU_SEQLENS_K=dummy if cu_seqlens_k is None else cu_seqlens_k)
    common = dict(**pb["scalars"], **pb["flags"], ROW_STATS=stats is not None, BLOCK_D=block_d, BLOCK_DV=block_dv,
                  **dot_flags(q.dtype))
    sizes = (pb["group_size"], pb["seqlen_q"], pb["seqlen_k"], pb["head_dim"], pb["head_dim_v"], scale)
    qkvdo = (*_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(do, varlen))

    def launch_dkdv(cfg):
        with _scratch(q.device, cfg["TMA"]):
            K._attn_bwd_dkdv_kernel[(triton.cdiv(pb["seqlen_k"], cfg["BLOCK_N"]), batch * pb["num_heads_k"])](
                q, k, v, do, lse, q if stats is None else stats, delta, dk, dv, *tensors.values(),
                *qkvdo, *_strides4(dk, varlen), *_strides4(dv, varlen), *lse_strides, *pb["mask_strides"],
                *pb["alibi_strides"], pb["num_heads_k"], *sizes, **common, **cfg,
            )

    def launch_dq(cfg, delta_pass=False):
        with _scratch(q.device, cfg["TMA"]):
            K._attn_bwd_dq_kernel[(triton.cdiv(pb["seqlen_q"], cfg["BLOCK_M"]), batch * num_heads)](
                q, k, v, do, lse, q if stats is None else stats, delta, dq, q if dmask is None else dmask,
                *tensors.values(), *qkvdo, *_strides4(dq, varlen),
                *(dmask.stride() if dmask is not None else (0,) * 4), *lse_strides, *pb["mask_strides"],
                *pb["alibi_strides"],
                num_heads, *sizes, **common, **cfg, MASK_GRAD=dmask is not None and not delta_pass,
                DELTA_PASS=delta_pass,
            )

    key = _bucket(pb, q, 1, dmask is not None)
    dq_outputs = lambda: [dq] + ([dmask] if dmask is not None else [])  # noqa: E731 (autotune's guard)
    dq_cfg = None
    if natural:  # delta first: the dK/dV and dQ kernels read it (tuning runs on a stale delta are only timed)
        dq_cfg = autotune.choose("attention_bwd_dq", key, dq_candidates, launch_dq, q.device,
                                 kernel=K._attn_bwd_dq_kernel, outputs=dq_outputs)
        launch_dq(dict(dq_cfg, num_stages=1), delta_pass=True)  # (2 stages spill two scalars on sm_90a, d=128)
    launch_dkdv(autotune.choose("attention_bwd_dkdv", key, dkdv_candidates, launch_dkdv, q.device,
                                kernel=K._attn_bwd_dkdv_kernel, outputs=lambda: [dk, dv]))
    launch_dq(dq_cfg or autotune.choose("attention_bwd_dq", key, dq_candidates, launch_dq, q.device,
                                        kernel=K._attn_bwd_dq_kernel, outputs=dq_outputs))
    for name in ("attention_bwd_delta",) * (not given_delta) + ("attention_bwd_dkdv", "attention_bwd_dq"):
        dispatch.record_launch(name)
    return dq, dk, dv


def dropout_keep_mask(batch: int, num_heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float, seed: int,
                      device) -> torch.Tensor:
    """The ``(batch, num_heads, seqlen_q, seqlen_k)`` bool keep-mask the kernels draw for ``seed``
    (for a packed batch, seqlen_q/k are max_seqlen_q/k and row i is the i-th token of its sequence)."""
    keep = torch.empty((batch, num_heads, seqlen_q, seqlen_k), device=device, dtype=torch.int8)
    if keep.numel():
        K._dropout_mask_kernel[(triton.cdiv(seqlen_q, 32), triton.cdiv(seqlen_k, 32), batch * num_heads)](
            keep, *keep.stride(), num_heads, seqlen_q, seqlen_k, dropout_p, seed, seqlen_q, seqlen_k,
            BLOCK_M=32, BLOCK_N=32)
        dispatch.record_launch("attention_dropout_mask")
    return keep.bool()
