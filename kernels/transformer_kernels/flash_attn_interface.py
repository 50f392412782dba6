"""flash-attention's public functions, on this library's Triton kernels.

Same names, arguments, layouts and semantics as ``flash_attn`` 2.x (``flash_attn/flash_attn_interface.py``,
Dao-AILab/flash-attention), so ``from flash_attn import flash_attn_func`` becomes
``from transformer_kernels import flash_attn_func``. Layout ``(batch, seqlen, nheads, headdim)``; packed batches
``(total_tokens, nheads, headdim)`` with int32 ``cu_seqlens``. Differences, all documented per function:
fp32 is accepted too (flash-attention takes fp16/bf16 only); ``deterministic`` is accepted and always
holds (the backward never uses atomics); ``return_attn_probs`` returns exact probabilities (from a
plain-PyTorch recomputation, for testing, as flash-attention intends); any page size >= 1 for paged
KV caches (flash-attention 2: a multiple of 256); the rotary embedding of ``flash_attn_with_kvcache``
runs as one fused pre-pass per tensor rather than inside the attention kernel. Beyond flash-attention
2: ``return_softmax_lse`` on every function, ``learnable_sink``, and the FP8 forward's ``q_descale`` /
``k_descale`` / ``v_descale`` on float8_e4m3fn inputs (FlashAttention-3's names; ``transformer_kernels.attention.fp8``).

Causal masks are aligned to the bottom-right corner (what decoding with a KV cache needs); with
seqlen_q=2, seqlen_k=5 and seqlen_q=5, seqlen_k=2 (1 = attend)::

    1 1 1 1 0          0 0
    1 1 1 1 1          0 0
                       0 0
                       1 0
                       1 1

A row with no visible key outputs 0. A sliding window ``window_size=(left, right)`` lets query i see
keys ``[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]`` (-1: unbounded on that
side), the "restricted self-attention" of Vaswani et al. (2017, Table 1); key blocks outside it are
never visited.

On CPU tensors without ``TRITON_INTERPRET=1`` every function runs the plain-PyTorch reference
(``transformer_kernels.attention.attention_reference``), so code using it runs on a laptop.
"""

from __future__ import annotations

import math

import torch

from . import dispatch
from ._triton_utils import InputTypeError, InputValueError, autocast_to
from .attention import MAX_HEAD_DIM, attention_op, attention_reference, check_qkv, check_sink, dropout_keep_mask
from .attention import fp8 as _fp8
from .attention.ops import attention_fp8_op
from .rotary import rotary

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------
def _window(op: str, window_size, causal: bool) -> tuple[int, int]:
    """flash-attention's rule: causal sets the right side of the window to 0."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise InputTypeError(f"{op}: window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if left < -1 or right < -1:
        raise InputValueError(f"{op}: window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    return left, 0 if causal else right


def _check_options(op: str, q, dropout_p, softcap, alibi_slopes, batch: int, num_heads: int) -> float:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise InputValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p!r}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise InputValueError(f"{op}: softcap must be >= 0 (0 = off), got {softcap!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            raise InputTypeError(f"{op}: alibi_slopes must be a float32 tensor")
        if alibi_slopes.device != q.device:
            raise InputValueError(f"{op}: alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
        if tuple(alibi_slopes.shape) not in ((num_heads,), (batch, num_heads)):
            raise InputValueError(f"{op}: alibi_slopes must have shape ({num_heads},) or ({batch}, {num_heads}), "
                             f"got {tuple(alibi_slopes.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise InputValueError(f"{op}: head_dim {q.shape[-1]} is not supported; supported: 1..{MAX_HEAD_DIM}")
    return float(dropout_p)


def _scale(softmax_scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def _check_cu_seqlens(op: str, name: str, cu, total: int, max_seqlen: int, device) -> None:
    """cu_seqlens must be int32, 1-D, start at 0, never decrease, end within the tokens, and respect
    max_seqlen: a kernel trusting a bad one would read or write out of bounds (one host sync)."""
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise InputTypeError(f"{op}: {name} must be a 1-D torch.int32 tensor of batch_size + 1 offsets, got "
                        f"{cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__}")
    if cu.device != device:
        raise InputValueError(f"{op}: {name} is on {cu.device} but q is on {device}")
    values = cu.tolist()
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or any(n < 0 for n in lengths) or (total is not None and values[-1] > total):
        raise InputValueError(f"{op}: {name} must start at 0, never decrease and end at most at {total}, got {values}")
    if lengths and max(lengths) > max_seqlen:
        raise InputValueError(f"{op}: a sequence of {max(lengths)} tokens exceeds max_seqlen {max_seqlen} ({name})")


# --------------------------------------------------------------------------------------------------
# The PyTorch path, and the probabilities for return_attn_probs
# --------------------------------------------------------------------------------------------------
def _reference_bshd(q, k, v, **kw):
    """attention_reference on (batch, seqlen, heads, dim) tensors, bottom-right aligned; returns
    (out in the same layout, S_dmask (batch, heads, seqlen_q, seqlen_k), logsumexp (batch, heads, seqlen_q))."""
    out, probs, lse = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          bottom_right=True, return_probs=True, **kw)
    return out.transpose(1, 2), probs, lse.float()


def _kernel_probs(q, k, v, seed, dropout_p, **kw):
    """S_dmask for a Triton call: exact probabilities recomputed in PyTorch, with the kernel's dropout pattern."""
    keep = None
    if dropout_p > 0:
        keep = dropout_keep_mask(q.shape[0], q.shape[2], q.shape[1], k.shape[1], dropout_p, int(seed), q.device)
    _, probs, _ = _reference_bshd(q.detach(), k.detach(), v.detach(), dropout_p=dropout_p, dropout_keep=keep, **kw)
    return probs.to(q.dtype)


def _run(op, q, k, v, *, dropout_p, return_attn_probs, return_softmax_lse, **mods):
    """Dense (batch, seqlen, heads, dim) attention on the Triton path or the PyTorch path."""
    if not dispatch.triton_available_for(q):
        dispatch.record_path("attention", "torch")
        out, probs, lse = _reference_bshd(q, k, v, dropout_p=dropout_p, **mods)
        return _returns(out, lse, probs.to(q.dtype), return_attn_probs, return_softmax_lse)
    out, lse, seed = attention_op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bottom_right=True,
                                  dropout_p=dropout_p, **mods)
    out = out.transpose(1, 2)
    probs = _kernel_probs(q, k, v, seed, dropout_p, **mods) if return_attn_probs else None
    return _returns(out, lse, probs, return_attn_probs, return_softmax_lse)


def _returns(out, lse, probs, return_attn_probs, return_softmax_lse):
    """flash-attention's return forms: ``out``; ``(out, softmax_lse, S_dmask)`` with return_attn_probs;
    ``(out, softmax_lse)`` with return_softmax_lse (FlashAttention-3's form)."""
    if return_attn_probs:
        return out, lse, probs
    return (out, lse) if return_softmax_lse else out


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, return_softmax_lse=False,
                    learnable_sink=None, q_descale=None, k_descale=None, v_descale=None):
    """Attention in flash-attention's layout, with MQA/GQA (k/v may have fewer heads, a divisor of q's:
    query head h reads key/value head h // (nheads // nheads_k)).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, float16, bfloat16 (or float32), headdim <= 256, any strides.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)`` (v may have its own headdim).
        dropout_p: dropout on the attention probabilities (set 0.0 for evaluation); Philox in-kernel,
            seeded from torch's default generator, so ``torch.manual_seed`` repeats it.
        softmax_scale: default ``1 / sqrt(headdim)``.
        causal: bottom-right aligned causal mask (module docstring).
        window_size: ``(left, right)`` sliding window, -1 = unbounded.
        softcap: > 0 applies ``softcap * tanh(scores / softcap)`` to the scaled scores.
        alibi_slopes: float32 ``(nheads,)`` or ``(batch, nheads)``: adds ``-slope * |i + seqlen_k - seqlen_q - j|``.
        deterministic: accepted; the backward is always deterministic (no atomics).
        return_attn_probs: also return ``softmax_lse`` ``(batch, nheads, seqlen_q)`` float32 and
            ``S_dmask`` ``(batch, nheads, seqlen_q, seqlen_k)``, probabilities negated where dropped
            (recomputed in PyTorch: for testing).
        return_softmax_lse (keyword): also return ``softmax_lse`` alone (FlashAttention-3's form).
        learnable_sink (keyword): ``(nheads,)`` float logits, one per query head, that join each row's
            softmax normalizer and take no value (gpt-oss's attention sinks, FlashAttention-3's
            ``learnable_sink``); differentiable; the logsumexp includes them.
        q_descale, k_descale, v_descale (keyword): float32 ``(batch, nheads_k)`` descales of
            ``torch.float8_e4m3fn`` q, k, v (FlashAttention-3's FP8 forward; None = 1): inference only,
            the output is bfloat16 (``transformer_kernels.attention.fp8``).

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)``, ``(out, softmax_lse, S_dmask)`` or
        ``(out, softmax_lse)``. Differentiable in q, k, v and learnable_sink (not through softmax_lse).

    Raises:
        TypeError / ValueError for unsupported dtypes, shapes, head counts or options.
    """
    op = "flash_attn_func"
    if _fp8.requested((q, k, v), (q_descale, k_descale, v_descale)):
        return _fp8_dense(op, q, k, v, (q_descale, k_descale, v_descale), dropout_p=dropout_p,
                          return_attn_probs=return_attn_probs, return_softmax_lse=return_softmax_lse,
                          softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                          alibi_slopes=alibi_slopes, learnable_sink=learnable_sink)
    q, k, v = autocast_to(q, k, v)
    check_qkv(op, q, k, v, heads_dim=-2, gqa=True)
    if q.dim() != 4:
        raise InputValueError(f"{op}: q must be (batch, seqlen, nheads, headdim), got shape {tuple(q.shape)}")
    dropout_p = _check_options(op, q, dropout_p, softcap, alibi_slopes, q.shape[0], q.shape[2])
    check_sink(op, learnable_sink, q, q.shape[2])
    return _run(op, q, k, v, dropout_p=dropout_p, return_attn_probs=return_attn_probs,
                return_softmax_lse=return_softmax_lse, scale=_scale(softmax_scale, q.shape[-1]),
                window=_window(op, window_size, causal), softcap=float(softcap), alibi_slopes=alibi_slopes,
                sinks=learnable_sink)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              return_softmax_lse=False, learnable_sink=None):
    """:func:`flash_attn_func` on ``qkv`` of shape ``(batch, seqlen, 3, nheads, headdim)``."""
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, return_softmax_lse=return_softmax_lse,
                           learnable_sink=learnable_sink)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             return_softmax_lse=False, learnable_sink=None):
    """:func:`flash_attn_func` on ``q`` and ``kv`` of shape ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, return_softmax_lse=return_softmax_lse,
                           learnable_sink=learnable_sink)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *,
                           return_softmax_lse=False, learnable_sink=None, q_descale=None, k_descale=None,
                           v_descale=None):
    """Attention over a packed batch of sequences of different lengths: no padding, no padding FLOPs.

    Sequence b owns tokens ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``
    of k and v; causal masks and windows are aligned per sequence (bottom-right), as in flash-attention.

    Args:
        q: ``(total_q, nheads, headdim)``; k, v: ``(total_k, nheads_k, headdim)``.
        cu_seqlens_q, cu_seqlens_k: ``(batch + 1,)`` int32 offsets, starting at 0, non-decreasing.
        max_seqlen_q, max_seqlen_k: the longest sequence (an upper bound is fine).
        block_table: int32 ``(batch, max_pages)``: k and v are then paged caches ``(num_pages, page_size,
            nheads_k, headdim)``, any page_size >= 1, and key j of sequence b sits at slot ``j % page_size``
            of page ``block_table[b, j // page_size]`` (cu_seqlens_k gives the lengths only). Inference
            reads the pages in the kernel; with gradients the pages are first gathered into packed keys,
            and dK/dV reach the page pools (flash-attention's backward ignores the block table).
        Other arguments as :func:`flash_attn_func` (``return_softmax_lse``, ``learnable_sink`` and the FP8
        descales included: one per sequence and KV head, ``(batch, nheads_k)``).

    Returns:
        ``out`` ``(total_q, nheads, headdim_v)``, or ``(out, softmax_lse (nheads, total_q), S_dmask
        (batch, nheads, max_seqlen_q, max_seqlen_k))`` with ``return_attn_probs``, or ``(out,
        softmax_lse)`` with ``return_softmax_lse``.

    Raises:
        TypeError: cu_seqlens or block_table not int32. ValueError: cu_seqlens that do not start at 0,
        decrease, overrun the tokens or exceed max_seqlen; a block_table of the wrong shape, with page
        indices out of range or too few pages for a sequence; other mismatches. (The cu_seqlens and
        block_table values are checked on the host: one device sync per call.)
    """
    op = "flash_attn_varlen_func"
    fp8_descale = None
    if _fp8.requested((q, k, v), (q_descale, k_descale, v_descale)):
        batch = cu_seqlens_q.numel() - 1 if isinstance(cu_seqlens_q, torch.Tensor) else 0
        fp8_descale = _fp8.check(op, q, k, v, q_descale, k_descale, v_descale, batch=batch, heads_k=k.shape[-2],
                                 dropout_p=dropout_p, return_attn_probs=return_attn_probs)
    else:
        q, k, v = autocast_to(q, k, v)
    if block_table is not None:  # k and v are page pools: check dtypes, heads and dims against one page
        check_qkv(op, q[None], k[:1], v[:1], heads_dim=-2, gqa=True, fp8=fp8_descale is not None)
    else:
        check_qkv(op, q, k, v, heads_dim=-2, gqa=True, fp8=fp8_descale is not None)
    if q.dim() != 3:
        raise InputValueError(f"{op}: q must be (total_tokens, nheads, headdim), got shape {tuple(q.shape)}")
    _check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], int(max_seqlen_q), q.device)
    total_k = k.shape[0] if block_table is None else None
    _check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, total_k, int(max_seqlen_k), q.device)
    if block_table is not None:
        _check_block_table(op, block_table, cu_seqlens_k.numel() - 1, k, v, q.device)
        _check_pages(op, block_table, cu_seqlens_k[1:] - cu_seqlens_k[:-1], k.shape[0], k.shape[1])
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise InputValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must describe the same batch, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()} offsets")
    batch = cu_seqlens_q.numel() - 1
    dropout_p = _check_options(op, q, dropout_p, softcap, alibi_slopes, batch, q.shape[1])
    check_sink(op, learnable_sink, q, q.shape[1])
    mods = dict(scale=_scale(softmax_scale, q.shape[-1]), window=_window(op, window_size, causal),
                softcap=float(softcap), alibi_slopes=alibi_slopes, sinks=learnable_sink)
    if fp8_descale is not None:
        return _fp8_varlen(q, k, v, fp8_descale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           block_table, return_softmax_lse, mods)
    if block_table is not None:  # the packed keys of each sequence, gathered from its pages
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if training or return_attn_probs or not dispatch.triton_available_for(q):
            # Training gathers the pages into packed keys: the backward then runs on them and autograd
            # scatters dK and dV back into the page pools (pages no sequence uses get 0).
            k, v = (_unpage(t, block_table, cu_seqlens_k) for t in (k, v))
        else:
            return _varlen_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                 block_table, return_softmax_lse, **mods)
    if not dispatch.triton_available_for(q):
        return _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                 dropout_p, return_attn_probs, return_softmax_lse, **mods)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out, lse, seed = attention_op(q4, k4, v4, bottom_right=True, dropout_p=dropout_p, cu_seqlens_q=cu_seqlens_q,
                                  cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                  **mods)
    out, lse = out[0].transpose(0, 1), lse[0]
    if not return_attn_probs:
        return (out, lse) if return_softmax_lse else out
    keep = dropout_keep_mask(batch, q.shape[1], int(max_seqlen_q), int(max_seqlen_k), dropout_p, int(seed),
                             q.device) if dropout_p > 0 else None
    return out, lse, _varlen_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                   dropout_p, keep, **mods)


def _fp8_dense(op, q, k, v, descales, *, dropout_p, return_attn_probs, return_softmax_lse, softmax_scale, causal,
               window_size, softcap, alibi_slopes, learnable_sink):
    """:func:`flash_attn_func` on float8_e4m3fn inputs (``transformer_kernels.attention.fp8``)."""
    heads_k = k.shape[2] if isinstance(k, torch.Tensor) and k.dim() == 4 else 0
    batch = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() else 0
    descale = _fp8.check(op, q, k, v, *descales, batch=batch, heads_k=heads_k, dropout_p=dropout_p,
                         return_attn_probs=return_attn_probs)
    check_qkv(op, q, k, v, heads_dim=-2, gqa=True, fp8=True)
    if q.dim() != 4:
        raise InputValueError(f"{op}: q must be (batch, seqlen, nheads, headdim), got shape {tuple(q.shape)}")
    _check_options(op, q, 0.0, softcap, alibi_slopes, q.shape[0], q.shape[2])
    check_sink(op, learnable_sink, q, q.shape[2])
    if not _fp8.on_triton(q):  # the reference: dequantized inputs on the PyTorch path, the output in bf16
        deq = [_fp8.dequantize(t, d, heads_dim=-2) for t, d in zip((q, k, v), descale)]
        out, lse = flash_attn_func(*deq, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                   softcap=softcap, alibi_slopes=alibi_slopes, return_softmax_lse=True,
                                   learnable_sink=learnable_sink)
        return (out.bfloat16(), lse) if return_softmax_lse else out.bfloat16()
    out, lse = attention_fp8_op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), descale,
                                scale=_scale(softmax_scale, q.shape[-1]), window=_window(op, window_size, causal),
                                softcap=float(softcap), alibi_slopes=alibi_slopes, sinks=learnable_sink)
    out = out.transpose(1, 2)
    return (out, lse) if return_softmax_lse else out


def _fp8_varlen(q, k, v, descale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                return_softmax_lse, mods):
    """:func:`flash_attn_varlen_func` on float8_e4m3fn inputs (packed, or paged k and v)."""
    if not _fp8.on_triton(q):  # the reference: dequantized inputs on the PyTorch path, the output in bf16
        seq_q = _token_sequences(cu_seqlens_q, q.shape[0])
        if block_table is None:
            seq_k = _token_sequences(cu_seqlens_k, k.shape[0])
            k, v = (_fp8.dequantize(t, d, heads_dim=-2, batch_of=seq_k) for t, d in zip((k, v), descale[1:]))
        else:  # each page takes the descales of the sequence whose table names it
            owner = _page_owners(block_table, (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist(), *k.shape[:2])
            k, v = (_fp8.dequantize(t, d, heads_dim=-2, batch_of=owner) for t, d in zip((k, v), descale[1:]))
        q = _fp8.dequantize(q, descale[0], heads_dim=-2, batch_of=seq_q)
        out, lse = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          softmax_scale=mods["scale"], window_size=mods["window"],
                                          softcap=mods["softcap"], alibi_slopes=mods["alibi_slopes"],
                                          block_table=block_table, return_softmax_lse=True,
                                          learnable_sink=mods["sinks"])
        return (out.bfloat16(), lse) if return_softmax_lse else out.bfloat16()
    q4 = q.transpose(0, 1).unsqueeze(0)
    k4, v4 = (t.transpose(1, 2) if block_table is not None else t.transpose(0, 1).unsqueeze(0) for t in (k, v))
    out, lse = attention_fp8_op(q4, k4, v4, descale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, block_table=block_table, **mods)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_softmax_lse else out


def _page_owners(block_table, lengths, num_pages: int, page_size: int) -> torch.Tensor:
    """The sequence that holds each page of a pool (int64; 0 for pages none holds), from the pages each
    sequence's length needs: a table's padding may name any page."""
    owner = torch.zeros(num_pages, dtype=torch.long, device=block_table.device)
    for b, n in enumerate(lengths):
        owner[block_table[b, :-(-n // page_size)].long()] = b
    return owner


def _token_sequences(cu_seqlens, total: int) -> torch.Tensor:
    """The sequence of each of ``total`` packed tokens (int64); tokens past the last sequence count as its."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    return torch.cat([seq, seq.new_full((total - seq.numel(),), max(lengths.numel() - 1, 0))])


def _sequences(cu_seqlens_q, cu_seqlens_k):
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(b, slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1]))
            for b in range(len(bounds_q) - 1)]


def _slopes_of(alibi_slopes, b):
    return alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]


def _varlen_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, block_table,
                  return_softmax_lse, **mods):
    """The Triton path of a packed batch over paged K/V: k, v ``(num_pages, page_size, heads_k, dim)``."""
    q4 = q.transpose(0, 1).unsqueeze(0)
    out, lse, _ = attention_op(q4, k.transpose(1, 2), v.transpose(1, 2), bottom_right=True, dropout_p=dropout_p,
                               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                               max_seqlen_k=max_seqlen_k, block_table=block_table, **mods)
    out, lse = out[0].transpose(0, 1), lse[0]
    return (out, lse) if return_softmax_lse else out


def _unpage(cache, block_table, cu_seqlens_k):
    """The keys (or values) of a paged cache as one packed (total_k, heads, dim) tensor, sequence after
    sequence as cu_seqlens_k lays them out (the PyTorch path and return_attn_probs)."""
    bounds = cu_seqlens_k.tolist()
    rows = [cache[block_table[b].long()].flatten(0, 1)[:bounds[b + 1] - bounds[b]] for b in range(len(bounds) - 1)]
    return torch.cat(rows) if rows else cache.new_zeros((0, *cache.shape[2:]))


def _check_block_table(op, block_table, batch, k_cache, v_cache, device):
    """An int32 (batch, max_pages) table over page pools (num_pages, page_size, nheads_k, headdim)."""
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32:
        got = block_table.dtype if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        raise InputTypeError(f"{op}: block_table must be an int32 tensor of shape (batch, max_pages), got {got}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise InputValueError(f"{op}: block_table must have shape (batch={batch}, max_pages >= 1), got "
                              f"{tuple(block_table.shape)}")
    if block_table.device != device:
        raise InputValueError(f"{op}: block_table is on {block_table.device} but q is on {device}")
    if k_cache.dim() != 4 or v_cache.dim() != 4 or k_cache.shape[:2] != v_cache.shape[:2]:
        raise InputValueError(f"{op}: with block_table, k and v caches must be (num_pages, page_size, nheads_k, "
                              f"headdim) with the same pages, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")


def _check_pages(op, block_table, rows, num_pages, page_size):
    """The table entries of the pages holding rows [0, rows[b]) of each sequence lie in [0, num_pages)
    (one host sync); the others may hold anything (vLLM and transformers mark them -1): never read."""
    pages_used = (rows.long() + page_size - 1) // page_size
    if pages_used.numel() and int(pages_used.max()) > block_table.shape[1]:
        raise InputValueError(f"{op}: a sequence of {int(rows.max())} rows needs more than the block_table's "
                              f"{block_table.shape[1]} pages of {page_size}")
    used = block_table[torch.arange(block_table.shape[1], device=block_table.device)[None, :] < pages_used[:, None]]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_pages):
        raise InputValueError(f"{op}: block_table holds page indices outside [0, {num_pages}) where the sequences "
                              f"have rows: {int(used.min())}..{int(used.max())}")


def _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, return_attn_probs,
                      return_softmax_lse, *, alibi_slopes, **mods):
    """The PyTorch path of flash_attn_varlen_func: one reference call per sequence."""
    dispatch.record_path("attention", "torch")
    out = q.new_zeros((*q.shape[:2], v.shape[-1]))
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    probs = q.new_zeros((len(cu_seqlens_q) - 1, q.shape[1], max_seqlen_q, max_seqlen_k))
    for b, sq, sk in _sequences(cu_seqlens_q, cu_seqlens_k):
        o, p, l = _reference_bshd(q[None, sq], k[None, sk], v[None, sk], dropout_p=dropout_p,
                                  alibi_slopes=_slopes_of(alibi_slopes, b), **mods)
        out[sq], lse[:, sq] = o[0], l[0]
        probs[b, :, :p.shape[2], :p.shape[3]] = p[0]
    return _returns(out, lse, probs, return_attn_probs, return_softmax_lse)


def _varlen_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, keep, *,
                  alibi_slopes, **mods):
    probs = q.new_zeros((len(cu_seqlens_q) - 1, q.shape[1], max_seqlen_q, max_seqlen_k))
    for b, sq, sk in _sequences(cu_seqlens_q, cu_seqlens_k):
        nq, nk = sq.stop - sq.start, sk.stop - sk.start
        _, p, _ = _reference_bshd(q[None, sq].detach(), k[None, sk].detach(), v[None, sk].detach(),
                                  dropout_p=dropout_p, dropout_keep=None if keep is None else keep[b, :, :nq, :nk],
                                  alibi_slopes=_slopes_of(alibi_slopes, b), **mods)
        probs[b, :, :nq, :nk] = p[0]
    return probs


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """:func:`flash_attn_varlen_func` on ``qkv`` of shape ``(total, 3, nheads, headdim)``."""
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_varlen_func` on ``q`` and ``kv`` of shape ``(total_k, 2, nheads_k, headdim)``."""
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            learnable_sink=None, q_descale=None, k_descale=None, v_descale=None):
    """Attention of a few new query tokens against a KV cache, for incremental decoding (forward only).

    If ``k`` and ``v`` are given they are first written into ``k_cache``/``v_cache`` *in place* at
    rows ``cache_seqlens[b] ..`` (through the pages with ``block_table``), and attention runs over the
    cached keys ``cache_leftpad[b] .. cache_seqlens[b] + seqlen_new``. Causal masks are bottom-right
    aligned over those keys, so new token t sees the cache and new tokens <= t. The keys are split
    across programs (flash-decoding) so a batch of one still fills the GPU.

    With ``rotary_cos``/``rotary_sin`` (only with new ``k``, as flash-attention), the new keys are
    rotated at positions ``cache_seqlens[b] - cache_leftpad[b] + t`` before they are written; the
    queries at the same positions if causal or windowed, else all at ``cache_seqlens[b] -
    cache_leftpad[b]`` (flash-attention's rule). One fused rotary kernel per tensor (``transformer_kernels.rotary``).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, seqlen_q usually 1..16.
        k_cache, v_cache: ``(batch_cache, seqlen_cache, nheads_k, headdim)``, or with ``block_table``
            ``(num_pages, page_size, nheads_k, headdim)`` (a paged cache; any page_size >= 1).
        k, v: optional ``(batch, seqlen_new, nheads_k, headdim)`` to append.
        rotary_cos, rotary_sin: optional ``(seqlen_ro, rotary_dim / 2)``, rotary_dim <= headdim.
        cache_seqlens: int, or int32 ``(batch,)``: the cache row after each sequence's last token (its
            length, plus its left padding); None = the whole cache.
        cache_batch_idx: optional int32 ``(batch,)``: which cache row each batch entry uses (not with
            ``block_table``).
        cache_leftpad: optional int32 ``(batch,)``: the cache row where each sequence starts.
        block_table: optional int32 ``(batch, max_pages)``: row r of sequence b is slot ``r % page_size``
            of page ``block_table[b, r // page_size]``.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as :func:`flash_attn_func`.
        rotary_interleaved: rotate dims (0, 1), (2, 3), ... (GPT-J) instead of (i, i + rotary_dim / 2).
        num_splits: key slices per query block; 0 = a heuristic, 1 = no split.
        return_softmax_lse: also return the logsumexp ``(batch, nheads, seqlen_q)``.
        learnable_sink (keyword): ``(nheads,)`` sink logits, as :func:`flash_attn_func`.
        q_descale, k_descale, v_descale (keyword): an FP8 cache (``torch.float8_e4m3fn`` k_cache and
            v_cache, contiguous or paged): float32 descales that broadcast to ``(batch, nheads_k)``, per
            tensor ``(1, 1)``, per KV head ``(nheads_k,)`` or per batch entry and KV head (None = 1);
            the real value of a cached element is ``x.float() * descale``. New ``k``/``v`` in another
            dtype are quantized as they are written (``k / k_descale``, rounded to nearest, saturated to
            +-448). A bf16/fp16 ``q`` is quantized per call (one descale per batch entry and KV head,
            its largest magnitude at 448); an fp8 ``q`` takes ``q_descale``. The output is bfloat16
            (``transformer_kernels.attention.fp8``).

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)``, or ``(out, softmax_lse)``. No backward.

    Raises:
        TypeError, ValueError naming the argument, before anything is written (e.g. a cache or page
        table too short for the appended tokens, page indices out of range, rotary tables too short,
        a sink of the wrong shape; checked on the host: one device sync when cache_seqlens is a tensor).
    """
    op = "flash_attn_with_kvcache"
    descale = None
    if _fp8.requested((k_cache, v_cache), (q_descale, k_descale, v_descale)):
        descale = _fp8_cache_query(op, q, k_cache, v_cache, q_descale, k_descale, v_descale, k, v)
    check_qkv(op, q[:1], k_cache[:1], v_cache[:1], heads_dim=-2, gqa=True, names=("q", "k_cache", "v_cache"),
              fp8=descale is not None)
    if q.dim() != 4:
        raise InputValueError(f"{op}: q must be (batch, seqlen, nheads, headdim), got shape {tuple(q.shape)}")
    batch = q.shape[0]
    if block_table is not None:
        if cache_batch_idx is not None:
            raise InputValueError(f"{op}: cache_batch_idx and block_table cannot be combined (the block table "
                                  "already says where each sequence lives)")
        _check_block_table(op, block_table, batch, k_cache, v_cache, q.device)
        capacity = block_table.shape[1] * k_cache.shape[1]
        cache_idx = None
    else:
        capacity = k_cache.shape[1]
        cache_idx = _cache_batch_idx(op, cache_batch_idx, batch, k_cache.shape[0], q.device)
    lengths = _cache_seqlens(op, cache_seqlens, batch, capacity, q.device)
    leftpad = _cache_leftpad(op, cache_leftpad, batch, lengths, capacity, q.device)
    if (k is None) != (v is None):
        raise InputValueError(f"{op}: pass both k and v to append, or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise InputValueError(f"{op}: pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None and k is None:
        raise InputValueError(f"{op}: rotary_cos/rotary_sin rotate the new k: pass k and v with them")
    if k is not None:
        check_qkv(op, k_cache[:1], k[:1], v[:1], heads_dim=-2, gqa=False, names=("k_cache", "k", "v"),
                  fp8=descale is not None)
        if k.shape[0] != batch or v.shape[0] != batch or v.shape[-1] != v_cache.shape[-1]:
            raise InputValueError(f"{op}: k and v must be (batch={batch}, seqlen_new, nheads_k, headdim), got "
                                  f"{tuple(k.shape)} and {tuple(v.shape)}")
        if lengths is None:
            raise InputValueError(f"{op}: appending k and v needs cache_seqlens (where to write them)")
        if batch and int((lengths + k.shape[1]).max()) > capacity:
            raise InputValueError(f"{op}: cache of {capacity} positions is too short to append {k.shape[1]} tokens "
                                  f"after cache_seqlens {lengths.tolist()}")
    if block_table is not None:
        rows = lengths if lengths is not None else torch.full((batch,), capacity, device=q.device)
        _check_pages(op, block_table, rows + (0 if k is None else k.shape[1]), k_cache.shape[0], k_cache.shape[1])
    _check_options(op, q, 0.0, softcap, alibi_slopes, batch, q.shape[2])
    check_sink(op, learnable_sink, q, q.shape[2])
    window = _window(op, window_size, causal)
    if rotary_cos is not None:  # checked (tables long enough) before anything is written
        offsets = (lengths - (0 if leftpad is None else leftpad)).to(torch.int32)
        q = _rotate_queries(q, rotary_cos, rotary_sin, offsets, rotary_interleaved, window != (-1, -1))
        k = rotary(k, rotary_cos, rotary_sin, interleaved=rotary_interleaved, seqlen_offsets=offsets)
    if k is not None:
        if descale is not None:  # quantized as written: each batch entry and KV head by its own descale
            k, v = (_fp8_store(t, d) for t, d in ((k, descale[1]), (v, descale[2])))
        _append(k_cache, v_cache, k, v, lengths, cache_idx, block_table)
        lengths = lengths + k.shape[1]
    mods = dict(scale=_scale(softmax_scale, q.shape[-1]), window=window, softcap=float(softcap),
                alibi_slopes=alibi_slopes, sinks=learnable_sink)
    if descale is not None:
        return _fp8_kvcache(q, k_cache, v_cache, descale, lengths, leftpad, cache_idx, block_table, capacity,
                            cache_batch_idx is not None, int(num_splits), return_softmax_lse, mods)
    if not dispatch.triton_available_for(q):
        out, lse = _kvcache_reference(q, k_cache, v_cache, lengths, leftpad, cache_idx, block_table, capacity, mods)
    else:
        if lengths is None and block_table is not None:
            lengths = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)
        out, lse, _ = attention_op(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                   bottom_right=True, seqused_k=lengths,
                                   kv_batch_idx=None if cache_batch_idx is None else cache_idx,
                                   num_splits=int(num_splits), block_table=block_table, leftpad=leftpad, **mods)
        out = out.transpose(1, 2)
    return (out, lse) if return_softmax_lse else out


def _fp8_cache_query(op, q, k_cache, v_cache, q_descale, k_descale, v_descale, k, v):
    """An FP8 cache's checks; returns the stacked descales (q's row is replaced where q is quantized later)."""
    batch = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    heads_k = k_cache.shape[-2] if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 else 0
    descale = _fp8.check(op, q, k_cache, v_cache, q_descale, k_descale, v_descale, batch=batch, heads_k=heads_k,
                         quantize_q=True)
    for name, t in (("k", k), ("v", v)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype not in (
                _fp8.FP8_DTYPE, torch.float16, torch.bfloat16, torch.float32)):
            raise InputTypeError(f"{op}: new {name} for an FP8 cache must be float8_e4m3fn (written as is) or "
                                 f"float16/bfloat16/float32 (quantized by its descale), got "
                                 f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    return descale


def _fp8_store(t, descale):
    """New (batch, seqlen_new, nheads_k, headdim) keys or values as e4m3 in the cache's units."""
    return t if t.dtype == _fp8.FP8_DTYPE else _fp8.to_e4m3(t, descale[:, None, :, None])


def _fp8_kvcache(q, k_cache, v_cache, descale, lengths, leftpad, cache_idx, block_table, capacity, has_idx,
                 num_splits, return_softmax_lse, mods):
    """Decoding from an FP8 cache: the Triton kernel, or the dequantized PyTorch path."""
    batch = q.shape[0]
    if q.dtype != _fp8.FP8_DTYPE:  # after the rotary embedding: one descale per batch entry and KV head
        q, q_descale = _fp8.quantize(q, group=q.shape[2] // k_cache.shape[2])
        descale = torch.stack([q_descale, descale[1], descale[2]])
    if not _fp8.on_triton(q):  # dequantize the cache rows (pages) each batch entry reads by its descales
        if block_table is None:
            owner = torch.zeros(k_cache.shape[0], dtype=torch.long, device=q.device)
            owner[cache_idx.long()] = torch.arange(batch, device=q.device)
        else:
            rows = [capacity] * batch if lengths is None else lengths.tolist()
            owner = _page_owners(block_table, rows, *k_cache.shape[:2])
        k_deq, v_deq = (_fp8.dequantize(c, d, heads_dim=-2, batch_of=owner)
                        for c, d in ((k_cache, descale[1]), (v_cache, descale[2])))
        q_deq = _fp8.dequantize(q, descale[0], heads_dim=-2)
        out, lse = _kvcache_reference(q_deq, k_deq, v_deq, lengths, leftpad, cache_idx, block_table, capacity, mods)
        out = out.bfloat16()
    else:
        if lengths is None and block_table is not None:
            lengths = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)
        out, lse = attention_fp8_op(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), descale,
                                    seqused_k=lengths, kv_batch_idx=cache_idx if has_idx else None,
                                    num_splits=num_splits, block_table=block_table, leftpad=leftpad, **mods)
        out = out.transpose(1, 2)
    return (out, lse) if return_softmax_lse else out


def _rotate_queries(q, cos, sin, offsets, interleaved, causal_or_local):
    """flash-attention's rule: query t at position offset + t when causal or windowed, else every query
    of a sequence at the offset."""
    if causal_or_local:
        return rotary(q, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    batch, seqlen = q.shape[:2]
    flat = q.reshape(batch * seqlen, 1, *q.shape[2:])
    return rotary(flat, cos, sin, interleaved=interleaved,
                  seqlen_offsets=offsets.repeat_interleave(seqlen)).reshape(q.shape)


def _append(k_cache, v_cache, k, v, lengths, cache_idx, block_table):
    """Write the new keys and values at rows lengths[b] + t of each sequence, in place."""
    positions = lengths[:, None].long() + torch.arange(k.shape[1], device=k.device)
    if block_table is None:
        rows = cache_idx[:, None].long().expand_as(positions)
        k_cache[rows, positions] = k
        v_cache[rows, positions] = v
        return
    page_size = k_cache.shape[1]
    pages = torch.gather(block_table.long(), 1, positions // page_size)
    k_cache[pages, positions % page_size] = k
    v_cache[pages, positions % page_size] = v


def _kvcache_reference(q, k_cache, v_cache, lengths, leftpad, cache_idx, block_table, capacity, mods):
    """The PyTorch path of flash_attn_with_kvcache: one reference call per sequence."""
    dispatch.record_path("attention", "torch")
    outs, lses = [], []
    for b in range(q.shape[0]):
        if block_table is None:
            keys, values = k_cache[int(cache_idx[b])], v_cache[int(cache_idx[b])]
        else:
            keys, values = (c[block_table[b].long()].flatten(0, 1) for c in (k_cache, v_cache))
        first = 0 if leftpad is None else int(leftpad[b])
        last = capacity if lengths is None else int(lengths[b])
        o, _, l = _reference_bshd(q[b:b + 1], keys[None, first:last], values[None, first:last], dropout_p=0.0,
                                  **{**mods, "alibi_slopes": _slopes_of(mods["alibi_slopes"], b)})
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def _cache_leftpad(op, cache_leftpad, batch, lengths, capacity, device):
    """cache_leftpad as an int32 (batch,) tensor within [0, cache_seqlens], or None."""
    if cache_leftpad is None:
        return None
    if not isinstance(cache_leftpad, torch.Tensor) or cache_leftpad.dtype != torch.int32 or \
            tuple(cache_leftpad.shape) != (batch,):
        raise InputTypeError(f"{op}: cache_leftpad must be an int32 tensor of shape ({batch},)")
    if cache_leftpad.device != device:
        raise InputValueError(f"{op}: cache_leftpad is on {cache_leftpad.device} but q is on {device}")
    ends = lengths if lengths is not None else torch.full_like(cache_leftpad, capacity)
    if batch and (int(cache_leftpad.min()) < 0 or bool((cache_leftpad > ends).any())):
        raise InputValueError(f"{op}: cache_leftpad must lie in [0, cache_seqlens], got {cache_leftpad.tolist()}")
    return cache_leftpad


def _cache_seqlens(op, cache_seqlens, batch, seqlen_cache, device):
    """cache_seqlens as an int32 (batch,) tensor on q's device, or None for 'the whole cache'."""
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or \
            tuple(cache_seqlens.shape) != (batch,):
        raise InputTypeError(f"{op}: cache_seqlens must be an int or an int32 tensor of shape ({batch},)")
    if cache_seqlens.device != device:
        raise InputValueError(f"{op}: cache_seqlens is on {cache_seqlens.device} but q is on {device}")
    if batch and (int(cache_seqlens.min()) < 0 or int(cache_seqlens.max()) > seqlen_cache):
        raise InputValueError(f"{op}: cache_seqlens must lie in [0, {seqlen_cache}], got {cache_seqlens.tolist()}")
    return cache_seqlens


def _cache_batch_idx(op, cache_batch_idx, batch, batch_cache, device):
    if cache_batch_idx is None:
        if batch_cache < batch:
            raise InputValueError(f"{op}: k_cache holds {batch_cache} sequences for a batch of {batch}")
        return torch.arange(batch, dtype=torch.int32, device=device)
    if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.dtype != torch.int32 or \
            tuple(cache_batch_idx.shape) != (batch,):
        raise InputTypeError(f"{op}: cache_batch_idx must be an int32 tensor of shape ({batch},)")
    if batch and (int(cache_batch_idx.min()) < 0 or int(cache_batch_idx.max()) >= batch_cache):
        raise InputValueError(f"{op}: cache_batch_idx must lie in [0, {batch_cache}), got {cache_batch_idx.tolist()}")
    return cache_batch_idx
