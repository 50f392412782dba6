"""Ring attention: every rank keeps its queries; the key/value blocks travel around the ring of ranks
(rank r sends to r + 1, receives from r - 1), one step per rank, each transfer posted before the local
kernel runs on the block in hand so the two overlap. Partial outputs merge exactly through their
logsumexp in float32. The backward sends the blocks around again, with each block's dK/dV accumulator
(float32) travelling beside it, and a last hop brings every accumulator home. Sums run in ring order,
so the result is bitwise repeatable.

Source: Liu, Zaharia & Abbeel (2023), "Ring Attention with Blockwise Transformers for Near-Infinite
Context", Sec. 3 (blockwise attention, keys and values passed around a ring, overlapped with compute);
the merge of partial softmaxes is FlashAttention's online softmax (Dao et al., 2022; Milakov &
Gimelshein, 2018); the backward's delta = rowsum(dO * O) is FlashAttention-2's (Dao, 2023, Algorithm 2).
zhuzilin/ring-flash-attention (``ring_flash_attn_func``, ``zigzag_ring_flash_attn_func``) is the peer
this follows in layout and return values.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from . import _blocks
from .layout import rank_chunks


@dataclasses.dataclass(frozen=True)
class Ring:
    """The ranks and how the sequence sits on them. ``world == 1`` (no group) computes locally: the
    all-to-all strategy runs its full-sequence attention this way, with ``head_offset`` (the first
    local head's global index) keeping one device's dropout stream."""
    group: object
    rank: int
    world: int
    layout: str
    chunk_q: int
    chunk_k: int
    head_offset: int = 0

    def chunks(self, rank: int, size: int) -> list[tuple[int, int, int]]:
        """(global offset, local offset, length) of each chunk rank ``rank`` holds."""
        if self.world == 1:
            return [(0, 0, size)]
        return [(c * size, i * size, size) for i, c in enumerate(rank_chunks(rank, self.world, self.layout))]

    def tasks(self, spec: _blocks.Spec, src: int) -> list[_blocks.Task]:
        return _blocks.plan(spec, self.chunks(self.rank, self.chunk_q), self.chunks(src, self.chunk_k),
                            same_layout=src == self.rank)


def _dense(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``t`` as a contiguous tensor to send, without a copy when it is a (1, 2)-transposed view of one
    (flash-attention's (batch, seqlen, heads, dim) layout seen as (batch, heads, seqlen, dim))."""
    if t.is_contiguous():
        return t, False
    if t.transpose(1, 2).is_contiguous():
        return t.transpose(1, 2), True
    return t.contiguous(), False


class _Exchange:
    """Send ``tensors`` to the next rank and receive same-shaped ones from the previous, asynchronously."""

    def __init__(self, ring: Ring, tensors, tag: int):
        nxt, prv = (ring.rank + 1) % ring.world, (ring.rank - 1) % ring.world
        dense = [_dense(t) for t in tensors]
        self.sent = [t for t, _ in dense]  # kept alive until the sends complete
        self.transposed = [flag for _, flag in dense]
        self.received = [torch.empty_like(t) for t in self.sent]
        ops = [dist.P2POp(dist.isend, t, group=ring.group, group_peer=nxt, tag=tag + i) for i, t in enumerate(self.sent)]
        ops += [dist.P2POp(dist.irecv, t, group=ring.group, group_peer=prv, tag=tag + i)
                for i, t in enumerate(self.received)]
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self):
        for r in self.requests:
            r.wait()
        self.sent = None
        return [t.transpose(1, 2) if flag else t for t, flag in zip(self.received, self.transposed)]


_KV_TAG, _GRAD_TAG = 0, 2


class RingAttention(torch.autograd.Function):
    """Autograd of ring attention on 4-D ``(batch, heads, local seqlen, head_dim)`` views; returns
    ``(out, logsumexp)`` (the logsumexp is not differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, spec: _blocks.Spec, ring: Ring):
        out_acc = q.new_zeros((*q.shape[:3], v.shape[3]), dtype=torch.float32)
        lse_acc = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
        kb, vb = k, v
        for t in range(ring.world):
            src = (ring.rank - t) % ring.world
            nxt = _Exchange(ring, (kb, vb), _KV_TAG) if t + 1 < ring.world else None
            for task in ring.tasks(spec, src):
                o, lse = _blocks.block_forward(spec, task, q, kb, vb, ring.head_offset)
                rows = slice(task.q0, task.q1)
                _blocks.merge(out_acc[:, :, rows], lse_acc[:, :, rows], o, lse)
            if nxt is not None:
                kb, vb = nxt.wait()
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.spec, ctx.ring = spec, ring
        ctx.mark_non_differentiable(lse_acc)
        return out, lse_acc

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        spec, ring = ctx.spec, ctx.ring
        delta = (dout.float() * out.float()).sum(-1)  # laid out as lse: (batch, heads, seqlen) contiguous
        dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        kb, vb = k, v
        grads = None  # the accumulators in flight
        for t in range(ring.world):
            src = (ring.rank - t) % ring.world
            nxt = _Exchange(ring, (kb, vb), _KV_TAG) if t + 1 < ring.world else None
            parts = []
            for task in ring.tasks(spec, src):
                dq_t, dk_t, dv_t = _blocks.block_backward(spec, task, dout, q, kb, vb, out, lse, delta,
                                                          ring.head_offset)
                dq[:, :, task.q0:task.q1] += dq_t
                parts.append((task, dk_t, dv_t))
            # This block's float32 dK/dV from the ranks before (waited for only now, so the transfer
            # overlapped the kernels above), with this rank's share added in place: one accumulator
            # pair in flight per step, no second one.
            if grads is None:
                dk = torch.zeros(kb.shape, device=q.device, dtype=torch.float32)
                dv = torch.zeros(vb.shape, device=q.device, dtype=torch.float32)
            else:
                dk, dv = grads.wait()
            for task, dk_t, dv_t in parts:
                dk[:, :, task.k0:task.k1] += dk_t
                dv[:, :, task.k0:task.k1] += dv_t
            del parts
            if ring.world > 1:  # the last hop takes each block's finished gradient home
                grads = _Exchange(ring, (dk, dv), _GRAD_TAG)
                del dk, dv
            if nxt is not None:
                kb, vb = nxt.wait()
        if grads is not None:
            dk, dv = grads.wait()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None
