"""All-to-all (Ulysses) context parallelism: one all-to-all turns "my slice of the sequence, every head"
into "the whole sequence, my slice of the heads"; attention then runs as on one device (the local
kernel over the whole sequence, heads / world of them); a second all-to-all turns the output back.
The backward is the same two exchanges, transposed. It needs heads (and key/value heads, repeated up to
the group size if there are fewer) divisible by the group size.

Source: Jacobs et al. (2023), "DeepSpeed Ulysses: System Optimizations for Enabling Training of
Extreme Long Sequence Transformer Models", Sec. 3 (sequence-to-head all-to-all before attention,
head-to-sequence after).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import gather_order, positions


def seq_to_heads(x: torch.Tensor, group, world: int, layout: str) -> torch.Tensor:
    """``(batch, heads, local seqlen, dim)`` -> ``(batch, heads / world, seqlen, dim)`` in sequence order
    (a view; differentiable)."""
    return _AllToAll.apply(x, group, world, layout, True)


def heads_to_seq(x: torch.Tensor, group, world: int, layout: str) -> torch.Tensor:
    """The inverse of :func:`seq_to_heads` (differentiable)."""
    return _AllToAll.apply(x, group, world, layout, False)


def _to_heads(x, group, world: int, layout: str) -> torch.Tensor:
    """The exchange of :func:`seq_to_heads`. On the wire, part p is ``(local seqlen, batch, heads / world,
    dim)``: one copy to send, one to receive, one gather into sequence order (no concatenation)."""
    b, h, n, d = x.shape
    send = x.permute(2, 0, 1, 3).reshape(n, b, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    order = gather_order(world * n, world, layout, x.device)
    return recv.view(world * n, b, h // world, d)[order].permute(1, 2, 0, 3)


def _to_seq(x, group, world: int, layout: str) -> torch.Tensor:
    """The exchange of :func:`heads_to_seq`: each rank's tokens gathered in one copy, sent, and the
    received head groups laid side by side in one more."""
    b, hl, s, d = x.shape
    n = s // world
    owner = torch.cat([positions(s, r, world, layout, x.device) for r in range(world)])
    send = x.permute(2, 0, 1, 3)[owner]  # (seqlen in rank order, batch, heads / world, dim), contiguous
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.view(world, n, b, hl, d).permute(2, 0, 3, 1, 4).reshape(b, world * hl, n, d)


class _AllToAll(torch.autograd.Function):
    """One of the two exchanges; its gradient is the other."""

    @staticmethod
    def forward(ctx, x, group, world, layout, to_heads: bool):
        ctx.args, ctx.to_heads = (group, world, layout), to_heads
        return (_to_heads if to_heads else _to_seq)(x, group, world, layout)

    @staticmethod
    def backward(ctx, grad):
        return (_to_seq if ctx.to_heads else _to_heads)(grad, *ctx.args), None, None, None, None
