"""The ``transformer_kernels::attention_forward`` / ``transformer_kernels::attention_backward`` torch.library custom ops, their
fake (meta) implementations and autograd registration, so ``torch.compile`` traces through them
without a graph break; :func:`attention_op` is the differentiable entry point on 4-D views."""

from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from .launch import attention_backward, attention_forward


def _new_out(q: torch.Tensor, head_dim_v: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Output shaped like the 4-D q view, laid out as q is: (batch, seqlen, heads) order when q's heads
    are the faster dim (flash-attention / packed layouts), else (batch, heads, seqlen)."""
    batch, heads, seqlen, _ = q.shape
    if q.stride(1) < q.stride(2):
        return q.new_empty((batch, seqlen, heads, head_dim_v), dtype=dtype).transpose(1, 2)
    return q.new_empty((batch, heads, seqlen, head_dim_v), dtype=dtype)


def _new_stats(q: torch.Tensor, row_stats: bool) -> torch.Tensor:
    """Row maxima and sums, (2, batch, heads, seqlen_q) float32, or an empty tensor without ``row_stats``."""
    return q.new_empty((2, *q.shape[:3]) if row_stats else (0,), dtype=torch.float32)


@torch.library.custom_op("transformer_kernels::attention_forward", mutates_args=())
def _attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    attn_mask: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor], kv_batch_idx: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor], leftpad: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, scale: float, bottom_right: bool,
    window_left: int, window_right: int, softcap: float, dropout_p: float, num_splits: int, row_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, logsumexp, philox seed as a 0-dim int64 CPU tensor, row stats). ``row_stats``: also
    each row's max and softmax sum, (2, *logsumexp.shape), for an exact fp32 backward (else empty)."""
    # The seed comes from torch's default generator, so torch.manual_seed makes dropout repeatable.
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    stats = _new_stats(q, row_stats)
    out, lse = attention_forward(
        q, k, v, scale=scale, bottom_right=bottom_right, window=(window_left, window_right), softcap=softcap,
        alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p, seed=int(seed),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        seqused_k=seqused_k, kv_batch_idx=kv_batch_idx, num_splits=num_splits, out=_new_out(q, v.shape[3]),
        lse=lse, stats=stats if row_stats else None, sinks=sinks, block_table=block_table, leftpad=leftpad)
    return out, lse, seed, stats


@_attention_forward_op.register_fake
def _(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx, sinks, block_table,
      leftpad, max_seqlen_q, max_seqlen_k, scale, bottom_right, window_left, window_right, softcap, dropout_p,
      num_splits, row_stats):
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return _new_out(q, v.shape[3]), lse, torch.empty((), dtype=torch.int64), _new_stats(q, row_stats)


@torch.library.custom_op("transformer_kernels::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    seed: torch.Tensor, stats: torch.Tensor, attn_mask: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, scale: float, bottom_right: bool,
    window_left: int, window_right: int, softcap: float, dropout_p: float, mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dmask): ``dmask`` is the additive mask's gradient at the full (batch, heads,
    seqlen_q, seqlen_k) with ``mask_grad``, else empty."""
    dmask = _new_dmask(q, k, attn_mask, mask_grad)
    dq, dk, dv = attention_backward(
        dout, q, k, v, out, lse, scale=scale, bottom_right=bottom_right, window=(window_left, window_right),
        softcap=softcap, alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p, seed=int(seed),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        stats=stats if stats.numel() else None, dmask=dmask.zero_() if mask_grad else None)
    return dq, dk, dv, dmask


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, seed, stats, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, scale, bottom_right, window_left, window_right, softcap, dropout_p, mask_grad):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), _new_dmask(q, k, attn_mask, mask_grad)


def _new_dmask(q, k, attn_mask, mask_grad: bool) -> torch.Tensor:
    """The mask gradient's buffer, (batch, heads, seqlen_q, seqlen_k) in the mask's dtype, or empty."""
    if not mask_grad:
        return q.new_empty((0,))
    return q.new_empty((*q.shape[:3], k.shape[2]), dtype=attn_mask.dtype)


_SAVED_PARAMS = ("max_seqlen_q", "max_seqlen_k", "scale", "bottom_right", "window_left", "window_right",
                 "softcap", "dropout_p")


def _setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx, sinks, block_table,
     leftpad, *params) = inputs
    out, lse, seed, stats = output
    ctx.kv_cache = seqused_k is not None or kv_batch_idx is not None or leftpad is not None
    ctx.paged = block_table is not None
    ctx.save_for_backward(q, k, v, out, lse, seed, stats, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, sinks)
    ctx.params = dict(zip(_SAVED_PARAMS, params[:len(_SAVED_PARAMS)]))


def _backward(ctx, dout, _dlse, _dseed, _dstats):
    """dQ, dK, dV, and an additive attn_mask's gradient when it requires one; the logsumexp output is
    not differentiable (its gradient is ignored)."""
    if ctx.kv_cache:
        raise NotImplementedError("attention with a KV cache (seqused_k / kv_batch_idx / cache_leftpad) has no "
                                  "backward, as in flash_attn_with_kvcache")
    if ctx.paged:
        raise NotImplementedError("attention over a paged KV cache (block_table) has no backward (flash-attention's "
                                  "neither); run the training forward on unpaged k and v")
    q, k, v, out, lse, seed, stats, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, sinks = ctx.saved_tensors
    mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = _attention_backward_op(dout, q, k, v, out, lse, seed, stats, attn_mask, alibi_slopes,
                                               cu_seqlens_q, cu_seqlens_k, **ctx.params, mask_grad=mask_grad)
    dsinks = _sinks_grad(dout, out, lse, sinks, cu_seqlens_q) if sinks is not None and ctx.needs_input_grad[9] \
        else None
    return (dq, dk, dv, dmask if mask_grad else None) + (None,) * 5 + (dsinks,) + (None,) * 12


def _sinks_grad(dout, out, lse, sinks, cu_seqlens_q):
    """d loss / d sink_h = -sum over rows of P(sink) * delta, with P(sink) = exp(sink_h - lse) and
    delta = rowsum(dO * O) (a sink joins the normalizer and adds no value). Rows of no sequence in a
    packed batch (past cu_seqlens_q[-1]) count nothing."""
    delta = (dout.float() * out.float()).sum(-1)
    terms = torch.exp(sinks.float()[None, :, None] - lse) * delta
    if cu_seqlens_q is not None:
        rows = torch.arange(lse.shape[2], device=lse.device)
        terms = torch.where(rows < cu_seqlens_q[-1], terms, 0.0)
    return (-terms.sum((0, 2))).to(sinks.dtype)


torch.library.register_autograd("transformer_kernels::attention_forward", _backward, setup_context=_setup_context)


@torch.library.custom_op("transformer_kernels::attention_forward_fp8", mutates_args=())
def _attention_forward_fp8_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor],
    kv_batch_idx: Optional[torch.Tensor], sinks: Optional[torch.Tensor], block_table: Optional[torch.Tensor],
    leftpad: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float, bottom_right: bool,
    window_left: int, window_right: int, softcap: float, num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 forward (``transformer_kernels.attention.fp8``): (out in bfloat16, logsumexp). No autograd."""
    out, lse = attention_forward(
        q, k, v, scale=scale, bottom_right=bottom_right, window=(window_left, window_right), softcap=softcap,
        alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, kv_batch_idx=kv_batch_idx, num_splits=num_splits,
        out=_new_out(q, v.shape[3], torch.bfloat16), lse=q.new_empty(q.shape[:3], dtype=torch.float32), sinks=sinks,
        block_table=block_table, leftpad=leftpad, descale=descale)
    return out, lse


@_attention_forward_fp8_op.register_fake
def _(q, k, v, descale, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx, sinks, block_table, leftpad,
      max_seqlen_q, max_seqlen_k, scale, bottom_right, window_left, window_right, softcap, num_splits):
    return _new_out(q, v.shape[3], torch.bfloat16), q.new_empty(q.shape[:3], dtype=torch.float32)


def attention_fp8_op(q, k, v, descale, *, scale, bottom_right=True, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                     cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, seqused_k=None,
                     kv_batch_idx=None, num_splits=1, sinks=None, block_table=None, leftpad=None):
    """The FP8 forward on 4-D views, compile-safe (a torch.library custom op); see :func:`attention_forward`'s
    ``descale``. Returns ``(out, logsumexp)``, out in bfloat16 laid out as q. Counted as a Triton call."""
    dispatch.record_path("attention", "triton")
    return _attention_forward_fp8_op(
        q, k, v, descale, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx, sinks, block_table,
        leftpad, int(max_seqlen_q), int(max_seqlen_k), float(scale), bool(bottom_right), int(window[0]),
        int(window[1]), float(softcap), int(num_splits))


def attention_op(q, k, v, *, scale, bottom_right=False, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                 attn_mask=None, dropout_p=0.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                 max_seqlen_k=0, seqused_k=None, kv_batch_idx=None, num_splits=1, sinks=None, block_table=None,
                 leftpad=None):
    """Differentiable, compile-safe attention on 4-D views (see :func:`attention_forward` for the
    arguments). Returns ``(out, logsumexp, seed)``. Counted as a Triton call by :func:`transformer_kernels.last_path`."""
    dispatch.record_path("attention", "triton")
    # fp32 training keeps each row's max and sum for the backward (see _kernels._softmax_shift).
    row_stats = q.dtype == torch.float32 and torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad)
    out, lse, seed, _ = _attention_forward_op(
        q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx, sinks, block_table,
        leftpad, int(max_seqlen_q),
        int(max_seqlen_k), float(scale), bool(bottom_right), int(window[0]), int(window[1]), float(softcap),
        float(dropout_p), int(num_splits), row_stats)
    return out, lse, seed
