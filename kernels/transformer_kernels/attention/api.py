"""The public function with torch's signature, :func:`scaled_dot_product_attention`, and the input
checks every attention entry point shares (``check_qkv``, also used by ``kernels/transformer_kernels/flash_attn_interface.py``)."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .. import dispatch
from .._triton_utils import InputTypeError, InputValueError, autocast_to, check_same, check_tensor
from .ops import attention_op
from .reference import attention_reference

MAX_HEAD_DIM = 256


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


def check_qkv(op: str, q, k, v, *, heads_dim: int, gqa: bool, names=("q", "k", "v"), float64: bool = False,
              fp8: bool = False) -> None:
    """Dtypes, devices, ranks and sizes shared by every attention entry point. ``heads_dim`` is where
    the heads sit (-3 in torch's layout, -2 in flash-attention's); ``gqa`` allows fewer K/V heads;
    ``float64`` accepts float64 (torch's SDPA runs it); ``fp8``: the dtypes were checked by
    :func:`transformer_kernels.attention.fp8.check`."""
    for name, t in zip(names, (q, k, v)):
        if not fp8:
            check_tensor(name, t, op=op, float64=float64)
    check_same(op, dict(zip(names, (q, k, v))), dtype=not fp8)
    qn, kn, vn = names
    if not (q.dim() == k.dim() == v.dim()):
        raise InputValueError(f"{op}: {qn}, {kn} and {vn} must have the same number of dims, got {q.dim()}, {k.dim()}, {v.dim()}")
    min_dims = 2 if heads_dim == -3 else 3  # torch's layout allows (seqlen, head_dim)
    if q.dim() < min_dims:
        raise InputValueError(f"{op}: {qn} needs at least {min_dims} dims, got shape {tuple(q.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise InputValueError(f"{op}: {qn} and {kn} must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    seq_dim = -2 if heads_dim == -3 else -3
    if k.shape[seq_dim] != v.shape[seq_dim]:
        raise InputValueError(f"{op}: {kn} and {vn} must have the same seqlen, got {k.shape[seq_dim]} and {v.shape[seq_dim]}")
    if q.dim() >= -heads_dim:
        hq, hk, hv = q.shape[heads_dim], k.shape[heads_dim], v.shape[heads_dim]
        if hk != hv:
            raise InputValueError(f"{op}: {kn} and {vn} must have the same number of heads, got {hk} and {hv}")
        if hq != hk and not (gqa and hk > 0 and hq % hk == 0):
            raise InputValueError(f"{op}: {qn} has {hq} heads and {kn}/{vn} {hk}: "
                             + ("the query heads must be a multiple of the key/value heads (GQA/MQA)" if gqa else
                                "they must match (pass enable_gqa=True for grouped-query attention)"))
    if not (q.shape[:-3] == k.shape[:-3] == v.shape[:-3]):
        raise InputValueError(f"{op}: {qn}, {kn} and {vn} must share their batch dims, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")


def _check_dropout(op: str, dropout_p) -> float:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise InputValueError(f"{op}: dropout_p must be a float in [0, 1], got {dropout_p!r}")
    return float(dropout_p)


def _check_sdpa_mask(attn_mask, query, key, is_causal) -> torch.Tensor | None:
    op = "scaled_dot_product_attention"
    if attn_mask is None:
        return None
    if is_causal:
        raise InputValueError(f"{op}: pass either attn_mask or is_causal=True, not both (as torch)")
    if not isinstance(attn_mask, torch.Tensor):
        raise InputTypeError(f"{op}: attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise InputTypeError(f"{op}: attn_mask must be bool (True = take part) or a float additive mask, got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise InputValueError(f"{op}: attn_mask is on {attn_mask.device} but query is on {query.device}")
    target = (*query.shape[:-1], key.shape[-2])
    try:
        return attn_mask.expand(target)
    except RuntimeError:
        raise InputValueError(f"{op}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(..., seqlen_q, seqlen_k) = {target}") from None


def _causal_bias(attn_mask, query, key, is_causal) -> tuple[torch.Tensor | None, bool]:
    """``(attn_mask, bottom_right)`` when ``attn_mask`` is torch's ``CausalBias``
    (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``), else ``(None, False)``."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # pragma: no cover - torch without attention biases
        return None, False
    if not isinstance(attn_mask, CausalBias):
        return None, False
    op = "scaled_dot_product_attention"
    if is_causal:
        raise InputValueError(f"{op}: pass either attn_mask or is_causal=True, not both (as torch)")
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (query.shape[-2], key.shape[-2]):
        raise InputValueError(f"{op}: the CausalBias is for seqlen_q={attn_mask.seq_len_q}, "
                              f"seqlen_k={attn_mask.seq_len_kv}, but query and key have {query.shape[-2]} and "
                              f"{key.shape[-2]}")
    return attn_mask, attn_mask.variant == CausalVariant.LOWER_RIGHT


def check_sink(op: str, sink, q: torch.Tensor, num_heads: int) -> None:
    """A learnable sink must be a float tensor of shape (num_heads,) on q's device."""
    if sink is None:
        return
    if not isinstance(sink, torch.Tensor) or not sink.dtype.is_floating_point:
        raise InputTypeError(f"{op}: learnable_sink must be a float tensor of shape ({num_heads},), got "
                             f"{sink.dtype if isinstance(sink, torch.Tensor) else type(sink).__name__}")
    if tuple(sink.shape) != (num_heads,):
        raise InputValueError(f"{op}: learnable_sink must have shape ({num_heads},) (one logit per query head), "
                              f"got {tuple(sink.shape)}")
    if sink.device != q.device:
        raise InputValueError(f"{op}: learnable_sink is on {sink.device} but the queries are on {q.device}")



def _mask_row_extent(mask: torch.Tensor) -> int:
    """Largest element offset within one (batch, head) plane of the mask: the kernels index the plane
    in int32 (the plane's base is int64)."""
    return (mask.shape[-2] - 1) * abs(mask.stride(-2)) + (mask.shape[-1] - 1) * abs(mask.stride(-1))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, softcap: float = 0.0, learnable_sink=None):
    """softmax(scale * query @ key^T + mask) @ value, fused (Vaswani et al., 2017, Sec. 3.2.1).

    Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` with the same semantics, except
    that a query row whose keys are all masked out returns 0 (and 0 gradient) where torch returns NaN.
    ``is_causal`` is top-left aligned, as in torch, even when seqlen_q != seqlen_k (1 = attend)::

        seqlen_q=2, seqlen_k=4      1 0 0 0        seqlen_q=4, seqlen_k=2      1 0
                                    1 1 0 0                                    1 1
                                                                               1 1
                                                                               1 1

    (``transformer_kernels.flash_attn_func``'s ``causal`` is bottom-right aligned instead.)

    Args:
        query: ``(..., num_heads, seqlen_q, head_dim)``, float16, bfloat16 or float32, any strides.
        key: ``(..., num_heads_k, seqlen_k, head_dim)``; value: ``(..., num_heads_k, seqlen_k, head_dim_v)``;
            same dtype, device and leading dims as query.
        attn_mask: broadcastable to ``(..., num_heads, seqlen_q, seqlen_k)``: bool (True = take part;
            a key-padding mask is ``(batch, 1, 1, seqlen_k)``) or float, added to the scores; or torch's
            ``causal_upper_left(seqlen_q, seqlen_k)`` / ``causal_lower_right(...)``
            (``torch.nn.attention.bias``), which run the causal kernel top-left or bottom-right aligned.
        dropout_p: probability of zeroing an attention probability (survivors scaled by 1/(1-p)),
            drawn inside the kernel from torch's default generator (``torch.manual_seed`` repeats it).
        is_causal: top-left aligned causal mask (above); not together with attn_mask.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        enable_gqa: allow num_heads_k < num_heads (a divisor): query head h reads key/value head
            h // (num_heads // num_heads_k), as torch.
        softcap: not in torch's signature (keyword-only; 0 = off, torch's behaviour): logit soft-capping,
            scores ``softcap * tanh(scale * q.k / softcap)`` before the mask is added (Gemma 2, Team Gemma,
            2024; flash-attention's ``softcap``). On the PyTorch path it runs the plain reference.
        learnable_sink: not in torch's signature (keyword-only): ``(num_heads,)`` float logits, one per
            query head, that join each row's softmax normalizer and take no value (gpt-oss's attention
            sinks, ``s_aux`` in transformers; FlashAttention-3's ``learnable_sink``); differentiable.

    Returns:
        ``(..., num_heads, seqlen_q, head_dim_v)`` in query's dtype; differentiable in query, key, value
        and a float ``attn_mask`` (a learned bias such as T5's relative positions: its gradient is the
        score gradient dS, summed over the dims the mask broadcasts along, as FlexAttention gives and
        flash-attention does not).

    Raises:
        TypeError: non-tensors, unsupported or mixed dtypes, a mask that is neither bool nor float.
        ValueError: mismatched shapes, devices or head counts; a mask that does not broadcast; attn_mask
        together with is_causal; dropout_p outside [0, 1]; softcap < 0.
        Both are also ``RuntimeError`` (:class:`transformer_kernels.InputValueError`, :class:`transformer_kernels.InputTypeError`),
        as torch raises for the same input.

    float64 inputs run torch's SDPA (``transformer_kernels.last_path("attention") == "torch"``).

    DTensors split along the sequence (``Shard(2)`` on a 1-D mesh, as torch's ``context_parallel``
    passes them) run :mod:`transformer_kernels.context_parallel`'s ring over that mesh and return a
    ``Shard(2)`` DTensor (see :mod:`transformer_kernels.context_parallel.torch_interop`); other DTensor
    placements follow the sharding rules of ``transformer_kernels/_sharding.py``.

    Under ``torch.autocast``, query, key and value are cast to its dtype first, as torch's SDPA does.

    Where it runs: Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``); otherwise PyTorch. Two
    documented fallbacks to ``F.scaled_dot_product_attention``, with a warning and
    ``transformer_kernels.last_path("attention") == "torch"``: head_dim above 256 and a mask whose seqlen_q x
    seqlen_k plane spans 2^31 elements or more.
    """
    op = "scaled_dot_product_attention"
    query, key, value = autocast_to(query, key, value)
    if type(query).__name__ == "DTensor" and softcap == 0 and learnable_sink is None:
        from ..context_parallel.torch_interop import sdpa_on_sequence_shards, sequence_sharded

        if sequence_sharded(query):  # torch's context_parallel: our ring over its mesh
            return sdpa_on_sequence_shards(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    check_qkv(op, query, key, value, heads_dim=-3, gqa=bool(enable_gqa), names=("query", "key", "value"),
              float64=True)
    dropout_p = _check_dropout(op, dropout_p)
    if not isinstance(softcap, (int, float)) or not softcap >= 0:
        raise InputValueError(f"{op}: softcap must be a float >= 0 (0 = off), got {softcap!r}")
    check_sink(op, learnable_sink, query, query.shape[-3] if query.dim() >= 3 else 1)
    causal_bias, bottom_right = _causal_bias(attn_mask, query, key, is_causal)
    if causal_bias is not None:  # torch's CausalBias: the causal kernel, no mask materialized
        attn_mask, is_causal = None, True
    mask = _check_sdpa_mask(attn_mask, query, key, is_causal)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)

    fallback = None
    if dispatch.triton_available_for(query):
        if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
            fallback = f"head_dim {query.shape[-1]}/{value.shape[-1]} above the kernel's {MAX_HEAD_DIM}"
        elif mask is not None and _mask_row_extent(mask) >= 2**31:
            fallback = "an attn_mask whose (seqlen_q, seqlen_k) plane spans 2^31 elements or more"
        if fallback:
            warnings.warn(f"{op}: {fallback}; falling back to torch.nn.functional.scaled_dot_product_attention",
                          stacklevel=2)
    if fallback or not dispatch.triton_available_for(query):
        dispatch.record_path("attention", "torch")
        if softcap > 0 or learnable_sink is not None:  # torch has neither
            return attention_reference(query, key, value, scale=scale, causal=bool(is_causal),
                                       bottom_right=bottom_right, softcap=float(softcap), attn_mask=mask,
                                       dropout_p=dropout_p, sinks=learnable_sink)
        if causal_bias is not None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=causal_bias, dropout_p=dropout_p,
                                                  scale=scale, enable_gqa=bool(enable_gqa))
        if mask is None or fallback:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=bool(is_causal), scale=scale, enable_gqa=bool(enable_gqa))
        return attention_reference(query, key, value, scale=scale, attn_mask=mask, dropout_p=dropout_p)

    q4, k4, v4 = _as_4d(query), _as_4d(key), _as_4d(value)
    out, _, _ = attention_op(q4, k4, v4, scale=scale, window=(-1, 0) if is_causal else (-1, -1),
                             bottom_right=bottom_right, attn_mask=None if mask is None else _as_4d(mask),
                             dropout_p=dropout_p, softcap=float(softcap), sinks=learnable_sink)
    return out.reshape(*query.shape[:-1], value.shape[-1])
