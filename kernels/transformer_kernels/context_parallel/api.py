"""Public context-parallel attention: flash-attention's and torch's signatures plus ``group``,
``strategy`` and ``layout``; the argument checks, including one small all-gather that makes sure every
rank of the group asked for the same attention before any block moves."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import dispatch
from .._triton_utils import InputTypeError, InputValueError, autocast_to
from ..attention import MAX_HEAD_DIM, check_qkv
from ..flash_attn_interface import _window
from . import _blocks
from .all_to_all import heads_to_seq, seq_to_heads
from .layout import LAYOUTS, check_divisible, check_layout
from .ring import Ring, RingAttention

STRATEGIES = ("ring", "all_to_all")


def resolve_group(group):
    """A ``ProcessGroup`` from ``None`` (the default group), a ``ProcessGroup``, a 1-D ``DeviceMesh``, or
    ``(mesh, mesh_dim)`` (a dim's index or name). Raises when torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        raise InputValueError("context parallelism needs an initialized process group "
                              "(torch.distributed.init_process_group, e.g. under torchrun)")
    from torch.distributed.device_mesh import DeviceMesh

    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise InputValueError(f"group: a {group.ndim}-D DeviceMesh needs its dim: pass (mesh, mesh_dim)")
        return group.get_group()
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], DeviceMesh):
        return group[0].get_group(group[1])
    raise InputTypeError("group must be None, a ProcessGroup, a 1-D DeviceMesh or (DeviceMesh, mesh_dim), got "
                         f"{type(group).__name__}")


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FIELDS = ("batch", "num_heads", "num_heads_k", "seqlen_q (local)", "seqlen_k (local)", "head_dim", "head_dim_v",
           "dtype", "strategy", "layout", "window left", "window right", "softcap", "dropout_p", "scale",
           "causal alignment")


def _check_same_everywhere(op: str, pg, q, k, v, values: tuple) -> None:
    """All-gather each rank's shapes and options; raise on every rank if any rank differs (before any
    block is sent, so a mismatch is an error rather than a hang or a wrong answer)."""
    mine = torch.tensor([float(x) for x in values], dtype=torch.float64, device=q.device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(table, mine, group=pg)
    table = torch.stack(table).cpu()
    bad = [(f, table[:, i].tolist()) for i, f in enumerate(_FIELDS) if not (table[:, i] == table[0, i]).all()]
    if bad:
        detail = "; ".join(f"{name}: {vals}" for name, vals in bad)
        raise InputValueError(f"{op}: the ranks of the group disagree (values per rank) on {detail}")


def _seed(pg, device, dropout_p: float) -> int:
    """The dropout seed: drawn from torch's default generator as one device draws it, then rank 0's
    broadcast, so every rank (and one device seeded the same) uses the same stream."""
    if dropout_p == 0:
        return 0
    seed = torch.randint(0, 2**62, (), dtype=torch.int64).to(device)
    dist.broadcast(seed, group=pg, group_src=0)
    return int(seed)


def context_parallel_attention(op: str, q, k, v, *, scale: float, window: tuple[int, int], softcap: float,
                               dropout_p: float, bottom_right: bool, group, strategy: str, layout: str):
    """The core on 4-D ``(batch, heads, local seqlen, head_dim)`` views; returns ``(out, logsumexp)``
    with out ``(batch, heads, local seqlen_q, head_dim_v)`` and logsumexp float32 ``(batch, heads, local
    seqlen_q)``."""
    if strategy not in STRATEGIES:
        raise InputValueError(f"{op}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_layout(op, layout)
    pg = resolve_group(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    batch, num_heads, lq, head_dim = q.shape
    num_heads_k, lk = k.shape[1], k.shape[2]
    _check_same_everywhere(op, pg, q, k, v, (
        batch, num_heads, num_heads_k, lq, lk, head_dim, v.shape[3], _DTYPES.index(q.dtype),
        STRATEGIES.index(strategy), LAYOUTS.index(layout), window[0], window[1], softcap, dropout_p, scale,
        bottom_right))
    seqlen_q, seqlen_k = lq * world, lk * world
    chunk_q = check_divisible(op, "seqlen_q", seqlen_q, world, layout)
    chunk_k = check_divisible(op, "seqlen_k", seqlen_k, world, layout)
    triton = _blocks.use_triton(q)
    if dropout_p > 0 and not triton:
        raise InputValueError(f"{op}: dropout_p > 0 needs the Triton kernels (CUDA tensors, or CPU under "
                              "TRITON_INTERPRET=1): its mask is the kernels' Philox stream")
    dispatch.record_path("attention", "triton" if triton else "torch")
    spec = _blocks.Spec(scale=scale, left=window[0], right=window[1], softcap=softcap, dropout_p=dropout_p,
                        seed=_seed(pg, q.device, dropout_p), seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                        num_heads=num_heads, bottom_right=bottom_right)
    if strategy == "ring":
        return RingAttention.apply(q, k, v, spec, Ring(pg, rank, world, layout, chunk_q, chunk_k))
    if num_heads % world:
        raise InputValueError(f"{op}: strategy='all_to_all' needs num_heads ({num_heads}) divisible by the group "
                              f"size ({world}); use strategy='ring'")
    if num_heads_k % world:
        if world % num_heads_k:
            raise InputValueError(f"{op}: strategy='all_to_all' needs num_heads_k ({num_heads_k}) divisible by the "
                                  f"group size ({world}) or dividing it; use strategy='ring'")
        # Fewer key/value heads than ranks: each is repeated so every rank gets its query heads' one.
        k, v = k.repeat_interleave(world // num_heads_k, 1), v.repeat_interleave(world // num_heads_k, 1)
    qf, kf, vf = (seq_to_heads(t, pg, world, layout) for t in (q, k, v))
    local = Ring(None, 0, 1, layout, seqlen_q, seqlen_k, head_offset=rank * (num_heads // world))
    out, lse = RingAttention.apply(qf, kf, vf, spec, local)
    out = heads_to_seq(out, pg, world, layout)
    lse = heads_to_seq(lse.unsqueeze(-1), pg, world, layout).squeeze(-1)
    return out, lse


def _check_common(op: str, q, dropout_p, softcap, alibi_slopes) -> None:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise InputValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise InputValueError(f"{op}: softcap must be >= 0 (0 = off), got {softcap!r}")
    if alibi_slopes is not None:
        raise InputValueError(f"{op}: alibi_slopes is not supported by context-parallel attention (its bias "
                              "depends on absolute distances across chunks); supported: causal, window_size, "
                              "softcap, dropout_p, GQA")
    if q.dim() != 4:
        raise InputValueError(f"{op}: q must be 4-D, got shape {tuple(q.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise InputValueError(f"{op}: head_dim {q.shape[-1]} is not supported; supported: 1..{MAX_HEAD_DIM}")


def attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, deterministic=False, return_attn_probs=False, *, group=None, strategy="ring",
              layout="zigzag"):
    """Context-parallel :func:`transformer_kernels.flash_attn_func`: each rank of ``group`` passes its
    slice of the sequence and gets its slice of the output, equal to one device attending over the
    whole sequence (zhuzilin/ring-flash-attention's ``ring_flash_attn_func`` / ``zigzag_ring_flash_attn_func``
    signature, with the strategy and layout as arguments). A collective: every rank calls it with the
    same shapes and options.

    Args:
        q: ``(batch, seqlen_q / world, nheads, headdim)`` this rank's queries in ``layout`` (see
            :func:`shard`); float16, bfloat16, float32 (float64: PyTorch path), headdim <= 256.
        k, v: ``(batch, seqlen_k / world, nheads_k, headdim)``, nheads_k dividing nheads (GQA/MQA).
        dropout_p, softmax_scale, causal, window_size, softcap: as :func:`flash_attn_func`, in global
            positions (causal and windows bottom-right aligned, flash-attention's rule). Dropout draws
            the Philox mask one device draws for the whole sequence (same ``torch.manual_seed``: rank 0's
            seed is broadcast).
        alibi_slopes: not supported (InputValueError).
        deterministic: accepted; the result is always bitwise repeatable (sums run in ring order).
        return_attn_probs: also return the logsumexp ``(batch, nheads, seqlen_q / world)`` float32 and
            ``None`` in place of the probabilities (no rank holds them), as ring-flash-attention does.
        group: ``None`` (default group), a ``ProcessGroup``, a 1-D ``DeviceMesh`` or ``(mesh, mesh_dim)``.
        strategy: ``"ring"`` (K/V blocks around the ring; any head count) or ``"all_to_all"`` (DeepSpeed
            Ulysses: heads must divide by the group size; README "Context parallelism" says when each wins).
        layout: ``"zigzag"`` (causal load balance) or ``"contiguous"`` (see :mod:`.layout`).

    Returns:
        ``out`` ``(batch, seqlen_q / world, nheads, headdim_v)`` in q's dtype, or ``(out, lse, None)``.

    Raises:
        InputTypeError / InputValueError (on every rank, before anything is sent) for unsupported dtypes,
        options, a group whose ranks disagree on shapes or options, or a sequence that does not divide
        into the layout's chunks (2 * world for zigzag, world for contiguous); without an initialized
        process group.
    """
    op = "context_parallel.attn_func"
    q, k, v = autocast_to(q, k, v)
    check_qkv(op, q, k, v, heads_dim=-2, gqa=True, float64=True)
    _check_common(op, q, dropout_p, softcap, alibi_slopes)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, lse = context_parallel_attention(
        op, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
        window=_window(op, window_size, causal), softcap=float(softcap), dropout_p=float(dropout_p),
        bottom_right=True, group=group, strategy=strategy, layout=layout)
    out = out.transpose(1, 2)
    return (out, lse, None) if return_attn_probs else out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, group=None, strategy="ring", layout="zigzag"):
    """Context-parallel :func:`torch.nn.functional.scaled_dot_product_attention`: ``(batch, heads,
    seqlen / world, head_dim)`` local slices in ``layout``; ``is_causal`` is top-left aligned in global
    positions (torch's rule). ``attn_mask`` is not supported (InputValueError: a dense mask has no
    per-chunk form here; use ``is_causal``). ``enable_gqa`` as torch (key/value heads dividing the query
    heads). Other arguments, returns and errors as :func:`attn_func`."""
    op = "context_parallel.scaled_dot_product_attention"
    query, key, value = autocast_to(query, key, value)
    check_qkv(op, query, key, value, heads_dim=-3, gqa=enable_gqa, names=("query", "key", "value"), float64=True)
    if attn_mask is not None:
        raise InputValueError(f"{op}: attn_mask is not supported under context parallelism; supported: is_causal")
    _check_common(op, query, dropout_p, 0.0, None)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    out, _ = context_parallel_attention(op, query, key, value, scale=scale, window=(-1, 0 if is_causal else -1),
                                        softcap=0.0, dropout_p=float(dropout_p), bottom_right=False, group=group,
                                        strategy=strategy, layout=layout)
    return out
