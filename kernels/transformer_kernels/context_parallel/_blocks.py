"""Attention of one rank's queries against one block of keys, as a part of a longer sequence: which
parts of the block a band mask lets through (``plan``), and the forward and backward of those parts on
the Triton launchers (or the plain-PyTorch path) with the results merged by their logsumexp.

Global rule (flash-attention's): query i sees key j iff ``-left <= j - i - diag <= right`` with ``diag``
= seqlen_k - seqlen_q (bottom-right) or 0 (top-left); causal is ``right = 0``; -1 = unbounded. Within a
pair of chunks at global offsets (qo, ko) that is ``lo <= j - i <= hi`` in chunk coordinates, with
``lo = qo - ko + diag - left`` and ``hi = qo - ko + diag + right``. The kernels take bands with
``lo <= 0 <= hi``; any other band is moved there by dropping the keys before ``lo`` (lo > 0) or the
queries before ``-hi`` (hi < 0), which no query of the chunk could see anyway.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import dispatch
from ..attention import attention_backward, attention_forward, attention_reference

INF = math.inf


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one attention call computes, in global terms (shared by every rank)."""
    scale: float
    left: int  # -1 = unbounded
    right: int  # -1 = unbounded (causal: 0)
    softcap: float
    dropout_p: float
    seed: int
    seqlen_q: int  # global
    seqlen_k: int
    num_heads: int  # global query heads (the dropout stream's)
    bottom_right: bool

    @property
    def diag(self) -> int:
        return self.seqlen_k - self.seqlen_q if self.bottom_right else 0


@dataclasses.dataclass(frozen=True)
class Task:
    """Local query rows [q0, q1) against local key rows [k0, k1) of a block, with the kernel's window
    (top-left, -1 = unbounded) and the global position of the first query row and key."""
    q0: int
    q1: int
    k0: int
    k1: int
    left: int
    right: int
    row: int
    col: int

    @property
    def full(self) -> bool:
        return self.left < 0 and self.right < 0


def _pair(spec: Spec, qc: tuple[int, int, int], kc: tuple[int, int, int]) -> Task | None:
    """The task of a query chunk and a key chunk, each ``(global offset, local offset, length)``, or None
    when no query of the chunk sees a key of the other."""
    (qo, ql, cq), (ko, kl, ck) = qc, kc
    s = qo - ko + spec.diag
    lo = s - spec.left if spec.left >= 0 else -INF
    hi = s + spec.right if spec.right >= 0 else INF
    if lo > ck - 1 or hi < -(cq - 1):
        return None
    dq = dk = 0
    if lo > 0:  # keys [0, lo) are before every query's window
        dk, hi, lo = int(lo), hi - lo, 0
    if hi < 0:  # queries [0, -hi) are before every key
        dq, lo, hi = int(-hi), lo - hi, 0
    # A band that covers the whole (remaining) chunk pair needs no mask at all.
    left = -1 if lo <= -(cq - dq - 1) else int(-lo)
    right = -1 if hi >= ck - dk - 1 else int(hi)
    return Task(ql + dq, ql + cq, kl + dk, kl + ck, left, right, qo + dq, ko + dk)


def plan(spec: Spec, q_chunks, k_chunks, same_layout: bool) -> list[Task]:
    """The tasks of one rank's query chunks against one block's key chunks (chunks as in :func:`_pair`).

    Without dropout (whose counters need each task's rows and keys to be contiguous globally) tasks
    are merged: full tasks that share their rows and have adjacent keys (or share keys, adjacent rows)
    become one call; and a block against itself under a plain causal mask (or none), in an order-preserving
    layout, is one call over the whole local block (local order = global order there). So a zigzag
    causal ring step is always one kernel call of the same size on every rank."""
    if (same_layout and spec.dropout_p == 0 and spec.left < 0 and spec.right in (-1, 0) and spec.diag == 0
            and len(q_chunks) == len(k_chunks) and all(a[2] == b[2] for a, b in zip(q_chunks, k_chunks))):
        cq = sum(c[2] for c in q_chunks)
        return [Task(0, cq, 0, sum(c[2] for c in k_chunks), -1, spec.right, q_chunks[0][0], k_chunks[0][0])]
    tasks = [t for qc in q_chunks for kc in k_chunks if (t := _pair(spec, qc, kc)) is not None]
    if spec.dropout_p > 0:
        return tasks
    for same, a0, a1, b0, b1 in (("q", "q0", "q1", "k0", "k1"), ("k", "k0", "k1", "q0", "q1")):
        merged: list[Task] = []
        for t in tasks:
            prev = merged[-1] if merged else None
            if (prev is not None and prev.full and t.full and getattr(prev, a0) == getattr(t, a0)
                    and getattr(prev, a1) == getattr(t, a1) and getattr(prev, b1) == getattr(t, b0)):
                merged[-1] = dataclasses.replace(prev, **{b1: getattr(t, b1)})
            else:
                merged.append(t)
        tasks = merged
    return tasks


def _philox(spec: Spec, task: Task, head_offset: int = 0):
    """The dropout stream of the whole call, and where this task starts in it (launch._philox_scalars)."""
    offset = (head_offset * spec.seqlen_q + task.row) * spec.seqlen_k + task.col
    return (spec.seqlen_q, spec.seqlen_k, spec.num_heads, offset)


def _views(task: Task, q, k, v):
    return q[:, :, task.q0:task.q1], k[:, :, task.k0:task.k1], v[:, :, task.k0:task.k1]


def use_triton(q: torch.Tensor) -> bool:
    return dispatch.triton_available_for(q)


def block_forward(spec: Spec, task: Task, q, k, v, head_offset: int = 0):
    """``(out, logsumexp)`` of the task's rows (4-D ``(batch, heads, rows, dim)`` views)."""
    qs, ks, vs = _views(task, q, k, v)
    window = (task.left, task.right)
    if use_triton(q):
        return attention_forward(qs, ks, vs, scale=spec.scale, window=window, softcap=spec.softcap,
                                 dropout_p=spec.dropout_p, seed=spec.seed, philox=_philox(spec, task, head_offset))
    out, _, lse = attention_reference(qs, ks, vs, scale=spec.scale, window=window, softcap=spec.softcap,
                                      return_probs=True)
    return out, lse.float()


def merge(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fold a partial result into float32 accumulators in place: lse = log(e^lse_acc + e^lse), out the
    softmax-weighted mean of the two (rows that saw no key so far have lse -inf)."""
    new = torch.logaddexp(lse_acc, lse)
    safe = torch.where(new == -INF, 0.0, new)
    # in place, no float32 copy of the partial output (the accumulator is the only full-size fp32 tensor)
    out_acc.mul_(torch.exp(lse_acc - safe).unsqueeze(-1)).addcmul_(out, torch.exp(lse - safe).unsqueeze(-1))
    lse_acc.copy_(new)


def block_backward(spec: Spec, task: Task, do, q, k, v, out, lse, delta, head_offset: int = 0):
    """``(dq, dk, dv)`` of the task's rows and keys, given the global ``lse`` and ``delta`` rows."""
    qs, ks, vs = _views(task, q, k, v)
    rows = slice(task.q0, task.q1)
    dos, lses, deltas = do[:, :, rows], lse[:, :, rows], delta[:, :, rows]
    window = (task.left, task.right)
    if use_triton(q):
        return attention_backward(dos, qs, ks, vs, out[:, :, rows], lses, scale=spec.scale, window=window,
                                  softcap=spec.softcap, dropout_p=spec.dropout_p, seed=spec.seed, delta=deltas,
                                  philox=_philox(spec, task, head_offset))
    return _backward_torch(dos, qs, ks, vs, lses, deltas, spec.scale, window, spec.softcap)


def _backward_torch(do, q, k, v, lse, delta, scale, window, softcap):
    """The PyTorch path of :func:`block_backward` (materialized scores; the FlashAttention-2 backward,
    Dao 2023, Algorithm 2, with P rebuilt from the global logsumexp)."""
    group = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    raw = (q @ ke.transpose(-2, -1)) * scale
    t = torch.tanh(raw / softcap) if softcap > 0 else None
    s = softcap * t if softcap > 0 else raw
    rel = torch.arange(k.shape[2], device=q.device)[None, :] - torch.arange(q.shape[2], device=q.device)[:, None]
    visible = torch.ones_like(rel, dtype=torch.bool)
    if window[0] >= 0:
        visible &= rel >= -window[0]
    if window[1] >= 0:
        visible &= rel <= window[1]
    shift = torch.where(lse == -INF, INF, lse).to(s.dtype)
    p = torch.exp(s - shift.unsqueeze(-1)).masked_fill(~visible, 0.0)
    dv = p.transpose(-2, -1) @ do
    dp = do @ ve.transpose(-2, -1)
    ds = p * (dp - delta.to(s.dtype).unsqueeze(-1))
    if softcap > 0:
        ds = ds * (1 - t * t)
    dq = (ds @ ke) * scale
    dk = (ds.transpose(-2, -1) @ q) * scale
    b, hk = k.shape[0], k.shape[1]
    dk = dk.reshape(b, hk, group, *dk.shape[2:]).sum(2)
    dv = dv.reshape(b, hk, group, *dv.shape[2:]).sum(2)
    return dq, dk, dv
