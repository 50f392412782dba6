"""The ``kernels::attention_forward`` / ``kernels::attention_backward`` torch.library custom ops, their
fake (meta) implementations and autograd registration, so ``torch.compile`` traces through them
without a graph break; :func:`attention_op` is the differentiable entry point on 4-D views."""

from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from .launch import attention_backward, attention_forward


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
