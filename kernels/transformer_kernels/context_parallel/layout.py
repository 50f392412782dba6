"""Which tokens of a sequence each rank holds under context parallelism, and helpers that cut a batch's
tensors that way and put them back together.

Two layouts of a sequence of ``seqlen`` tokens over ``world`` ranks:

* ``"contiguous"``: rank r holds tokens ``[r * n, (r + 1) * n)`` with ``n = seqlen / world``. Causal
  attention is unbalanced: the last rank's queries see every key, the first rank's see ``1 / world``.
* ``"zigzag"`` (the default): the sequence is cut into ``2 * world`` chunks of ``c = seqlen / (2 world)``
  and rank r holds chunks ``r`` and ``2 world - 1 - r``, in that order, so every rank does the same
  causal work (the head-tail layout of Megatron-LM's context parallelism and of torch's
  ``context_parallel`` load balancer; zhuzilin/ring-flash-attention calls it "zigzag").

``seqlen`` must divide by ``world`` (``"contiguous"``) or ``2 * world`` (``"zigzag"``); anything else
raises :class:`~transformer_kernels.InputValueError`: pad the batch first (with positions and labels that
a loss ignores, e.g. label -100).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from .._triton_utils import InputTypeError, InputValueError

LAYOUTS = ("zigzag", "contiguous")


def check_layout(op: str, layout: str) -> str:
    if layout not in LAYOUTS:
        raise InputValueError(f"{op}: layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def num_chunks(world: int, layout: str) -> int:
    """Chunks the sequence is cut into: ``2 * world`` (zigzag) or ``world`` (contiguous)."""
    return 2 * world if layout == "zigzag" else world


def check_divisible(op: str, name: str, seqlen: int, world: int, layout: str) -> int:
    """The chunk length; raises when ``seqlen`` does not divide into the layout's chunks."""
    chunks = num_chunks(world, layout)
    if seqlen % chunks:
        raise InputValueError(
            f"{op}: {name} {seqlen} does not divide into {chunks} chunks ({layout} layout over {world} ranks); "
            f"pad the sequence to a multiple of {chunks}")
    return seqlen // chunks


def rank_chunks(rank: int, world: int, layout: str) -> tuple[int, ...]:
    """Indices of the chunks rank ``rank`` holds, in its local order."""
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


def positions(seqlen: int, rank: int, world: int, layout: str = "zigzag", device=None) -> torch.Tensor:
    """int64 ``(seqlen / world,)``: the global position of each local token of rank ``rank``."""
    check_layout("positions", layout)
    c = check_divisible("positions", "seqlen", seqlen, world, layout)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in rank_chunks(rank, world, layout)])


def gather_order(seqlen: int, world: int, layout: str, device=None) -> torch.Tensor:
    """int64 ``(seqlen,)``: ``order[p]`` is where global position p sits in the rank-ordered concatenation
    of every rank's local tokens (what an all-gather along the sequence returns)."""
    owner = torch.cat([positions(seqlen, r, world, layout, device) for r in range(world)])
    order = torch.empty_like(owner)
    order[owner] = torch.arange(seqlen, device=device)
    return order


def _group_geometry(group) -> tuple[int, int]:
    from .api import resolve_group  # (api imports this module)

    group = resolve_group(group)
    return dist.get_rank(group), dist.get_world_size(group)


def _map(op, tensors, fn):
    if isinstance(tensors, torch.Tensor):
        return fn(tensors)
    if isinstance(tensors, Mapping):
        return type(tensors)({k: fn(t) if isinstance(t, torch.Tensor) else t for k, t in tensors.items()})
    if isinstance(tensors, Sequence) and not isinstance(tensors, str):
        return type(tensors)(fn(t) if isinstance(t, torch.Tensor) else t for t in tensors)
    raise InputTypeError(f"{op}: expected a tensor, or a sequence or mapping of tensors, got {type(tensors).__name__}")


def shard(tensors, dim: int = 1, group=None, layout: str = "zigzag"):
    """This rank's slice of full-sequence tensors along ``dim`` (the sequence dim: 1 for ``(batch, seqlen,
    ...)`` tokens, labels, positions and flash-attention's layout; 2 for ``(batch, heads, seqlen, dim)``).

    Args:
        tensors: a tensor, or a list/tuple/dict of them (non-tensor entries pass through), each holding
            the whole sequence, the same on every rank.
        dim: the sequence dim of every tensor.
        group: ``None`` (the default group), a ``ProcessGroup``, a 1-D ``DeviceMesh``, or ``(mesh, dim)``.
        layout: ``"zigzag"`` or ``"contiguous"`` (module docstring).

    Returns: the same structure holding contiguous local slices of ``seqlen / world`` tokens.

    Raises: InputValueError when a sequence does not divide into the layout's chunks.
    """
    check_layout("shard", layout)
    rank, world = _group_geometry(group)

    def one(t):
        check_divisible("shard", f"dim {dim} of a {tuple(t.shape)} tensor", t.shape[dim], world, layout)
        return t.index_select(dim, positions(t.shape[dim], rank, world, layout, t.device)).contiguous()

    return _map("shard", tensors, one)


def unshard(tensors, dim: int = 1, group=None, layout: str = "zigzag"):
    """The inverse of :func:`shard`: all-gathers each local slice along ``dim`` and puts the tokens back
    in sequence order (a collective: every rank of ``group`` must call it). Not differentiable."""
    check_layout("unshard", layout)
    from .api import resolve_group

    pg = resolve_group(group)
    world = dist.get_world_size(pg)

    def one(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=pg)
        full = torch.cat(parts, dim)
        return full.index_select(dim, gather_order(full.shape[dim], world, layout, t.device))

    return _map("unshard", tensors, one)
