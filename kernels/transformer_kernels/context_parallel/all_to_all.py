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


def _exchange(x: torch.Tensor, group, world: int, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """All-to-all on a 4-D tensor: cut ``scatter_dim`` into ``world`` parts, part p to rank p, and
    concatenate what arrives along ``gather_dim`` in rank order."""
    parts = x.chunk(world, scatter_dim)
    send = torch.stack(parts).contiguous()  # (world, ...): part p goes to rank p
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), gather_dim)


class AllToAll(torch.autograd.Function):
    """Differentiable all-to-all: scatter ``scatter_dim``, gather ``gather_dim``; its gradient is the
    reverse exchange."""

    @staticmethod
    def forward(ctx, x, group, world: int, scatter_dim: int, gather_dim: int):
        ctx.args = (group, world, gather_dim, scatter_dim)
        return _exchange(x, group, world, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, *ctx.args), None, None, None, None


def seq_to_heads(x: torch.Tensor, group, world: int, layout: str) -> torch.Tensor:
    """``(batch, heads, local seqlen, dim)`` -> ``(batch, heads / world, seqlen, dim)`` in sequence order."""
    full = AllToAll.apply(x, group, world, 1, 2)
    order = gather_order(full.shape[2], world, layout, x.device)
    return full.index_select(2, order)


def heads_to_seq(x: torch.Tensor, group, world: int, layout: str) -> torch.Tensor:
    """The inverse of :func:`seq_to_heads`."""
    owner = torch.cat([positions(x.shape[2], r, world, layout, x.device) for r in range(world)])
    return AllToAll.apply(x.index_select(2, owner), group, world, 2, 1)
