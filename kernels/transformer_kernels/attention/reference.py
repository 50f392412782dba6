"""The plain PyTorch definition of attention with every feature of the kernels: the tests compare
against it in float64, and the CPU path runs it."""

from __future__ import annotations

import math

import torch


def attention_reference(q, k, v, *, scale=None, causal=False, bottom_right=False, window=(-1, -1), softcap=0.0,
                        alibi_slopes=None, attn_mask=None, dropout_p=0.0, dropout_keep=None, return_probs=False,
                        sinks=None):
    """Plain PyTorch attention over ``(..., heads, seqlen, head_dim)`` with every feature of the kernels;
    materializes the score matrix. The tests run it in float64; the CPU path runs it in the input dtype.

    ``causal`` is ``window=(left, 0)``; ``bottom_right`` aligns the diagonal at seqlen_k - seqlen_q.
    ``dropout_keep`` (bool, broadcastable to the scores) fixes the dropout pattern; without it and with
    ``dropout_p`` > 0, one is drawn from torch's generator. Rows with no visible key give 0.
    ``sinks`` ``(heads,)``: learnable sink logits that join each row's softmax and take no value (the
    logsumexp includes them).
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
    if sinks is not None:  # a per-head logit in the normalizer with no value (gpt-oss): a column, then dropped
        sink = sinks.to(s.dtype).reshape(-1, 1, 1).expand(*s.shape[:-1], 1)
        probs = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
        s = torch.cat([s, sink], dim=-1)  # for the logsumexp below
    else:
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
