"""Our kernels inside torch's own context parallelism (``torch.distributed.tensor.experimental.context_parallel``).

torch's ``context_parallel(mesh, buffers=...)`` shards the buffers along the sequence and wraps
``F.scaled_dot_product_attention`` so its q, k, v arrive as DTensors ``Shard(2)`` on the CP mesh; torch's
own handlers then run a ring over aten's flash / efficient / cuDNN kernels. With
:func:`transformer_kernels.override_sdpa` entered *outside* it (so torch wraps our function), our
``scaled_dot_product_attention`` receives those DTensors and runs :mod:`transformer_kernels.context_parallel`'s
ring on their local shards over the same mesh, with the layout torch sharded the buffers in: head-tail
(= our ``"zigzag"``) when torch's load balancing is on (its default), else ``"contiguous"``. Code written
for torch's context parallelism thus runs our kernel unchanged. ``Shard(2)`` DTensors met outside torch's
context_parallel (e.g. from ``distribute_tensor``) hold contiguous chunks, DTensor's meaning, and run the
ring in the ``"contiguous"`` layout.

Private torch API, behind a check: torch keeps its load-balance switch in
``torch.distributed.tensor.experimental._context_parallel._attention._cp_options.enable_load_balance``
(torch >= 2.7). Where that is not importable the layout cannot be known and the call raises rather than
guess. The wrong nesting (``override_sdpa`` entered inside ``context_parallel``, which would replace torch's
wrapper and attend within each shard only) is refused by ``override_sdpa`` (:func:`torch_cp_active`).
"""

from __future__ import annotations

import torch

from .._triton_utils import InputValueError

# torch's context parallelism keeps its load-balance switch in _context_parallel._attention._cp_options
# from 2.7 on (checked with 2.13, tests/test_context_parallel.py::test_torch_context_parallel_runs_our_kernel).
_TORCH_CP_SINCE = (2, 7)


def sequence_sharded(t) -> bool:
    """Whether ``t`` is a DTensor split along dim 2 (the sequence of ``(batch, heads, seqlen, head_dim)``)
    on a 1-D mesh, as torch's context_parallel passes attention's inputs."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(t, DTensor) or t.device_mesh.ndim != 1 or t.dim() != 4:
        return False
    (p,) = t.placements
    return isinstance(p, Shard) and p.dim % 4 == 2


def layout_of(t) -> str:
    """How the sequence of ``Shard(2)`` DTensor ``t`` lies on the ranks. Inside torch's context_parallel
    (its wrapper is installed): as torch sharded the buffers, ``"zigzag"`` (its head-tail load balancer,
    used when load balancing is on and the sequence divides into 2 x world chunks) or ``"contiguous"``.
    Anywhere else: ``"contiguous"``, what ``Shard(2)`` means to DTensor. Raises InputValueError inside
    torch's context_parallel where its switch cannot be read."""
    if not torch_cp_active():
        return "contiguous"
    try:
        if tuple(int(x) for x in torch.__version__.split(".")[:2]) < _TORCH_CP_SINCE:
            raise ImportError
        from torch.distributed.tensor.experimental._context_parallel._attention import _cp_options
        balanced = bool(_cp_options.enable_load_balance)
    except (ImportError, AttributeError, ValueError):
        raise InputValueError(
            f"scaled_dot_product_attention: cannot read torch {torch.__version__}'s context-parallel layout "
            "(torch.distributed.tensor.experimental._context_parallel._attention._cp_options); call "
            "transformer_kernels.context_parallel.scaled_dot_product_attention on the local shards with layout= "
            "instead") from None
    world = t.device_mesh.size()
    return "zigzag" if balanced and t.shape[2] % (2 * world) == 0 else "contiguous"


def torch_cp_active() -> bool:
    """Whether ``F.scaled_dot_product_attention`` is now torch's context-parallel wrapper (one of the
    private ``_replaced_functions``; False where that cannot be read)."""
    import torch.nn.functional as F

    try:
        from torch.distributed.tensor.experimental._context_parallel import _attention
    except ImportError:
        return False
    return F.scaled_dot_product_attention in getattr(_attention, "_replaced_functions", {})


def sdpa_on_sequence_shards(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False):
    """torch's SDPA semantics on ``Shard(2)`` DTensors: our context-parallel attention over their mesh,
    returning a ``Shard(2)`` DTensor (differentiable through ``to_local`` / ``from_local``)."""
    from torch.distributed.tensor import DTensor, Shard

    from .api import scaled_dot_product_attention

    mesh = query.device_mesh
    for name, t in (("key", key), ("value", value)):
        if not sequence_sharded(t) or t.device_mesh != mesh:
            raise InputValueError(f"scaled_dot_product_attention: query is a DTensor split along the sequence; "
                                  f"{name} must be one too, on the same mesh")
    if attn_mask is not None:
        raise InputValueError("scaled_dot_product_attention: attn_mask is not supported on sequence-sharded "
                              "DTensors (context parallelism); use is_causal")
    out = scaled_dot_product_attention(query.to_local(), key.to_local(), value.to_local(), dropout_p=dropout_p,
                                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, group=mesh,
                                       layout=layout_of(query))
    return DTensor.from_local(out, mesh, [Shard(2)], run_check=False)
