"""DTensor sharding rules for this library's torch.library custom ops, so a call on DTensors (tensor or
sequence parallelism with ``parallelize_module``, FSDP2 outside its gathered forward, ``distribute_tensor``)
runs each rank's shard through the kernel instead of failing in DTensor's dispatcher with "does not have
a sharding strategy registered" (``torch.distributed.tensor.experimental.register_sharding``).

What each op allows (anything else is redistributed by DTensor to one of these first):

* norms (``norm_forward`` / ``norm_backward``, 2-D rows x features): rows sharded (sequence parallelism's
  ``Shard(seq)`` becomes row sharding once flattened), weight and bias replicated; their gradients are
  ``Partial`` (each rank's sum over its rows);
* FFN (``ffn_forward`` / ``ffn_backward``): token rows sharded, weights replicated, weight gradients
  ``Partial``. Column/row-wise weight sharding (Megatron's MLP) is not a per-op rule (the second bias
  would be added once per rank): :class:`transformer.layers.FeedForward` splits that case explicitly;
* attention (``attention_forward`` / ``attention_backward``, 4-D ``(batch, heads, seqlen, head_dim)``
  views): batch or heads sharded (heads only when the query and key/value heads both divide by the mesh
  dim, so grouped-query pairs stay on one rank), and only without mask, ALiBi, packed or cached
  sequences or sinks; a sharded sequence needs :mod:`transformer_kernels.context_parallel`, so DTensor
  redistributes it to one of these;
* rotary (``rotate_half_embed``): any of the first three dims of the 4-D input, cos and sin alike.

Every op also accepts all-replicated inputs. A dropout seed is drawn per call on each rank (sharded
rows get independent masks; with replicated inputs, ranks seeded alike draw alike).
"""

from __future__ import annotations

import math

import torch

from ._import_hook import call_when_imported

_DTENSOR = "torch.distributed.tensor"


def _rep(n: int) -> list:
    return [Replicate()] * n


def _present(t, placement):
    """A tensor argument's placement, or None for an absent optional tensor."""
    return None if t is None else placement


def _norm_forward(x, residual, weight, bias, eps, is_rms, dropout_p):
    args = lambda p: [p, _present(residual, p), _present(weight, Replicate()), _present(bias, Replicate()),  # noqa: E731
                      None, None, None]
    out = lambda p: [p, p, p, p, Replicate()]  # noqa: E731 (y, z, mean, rstd, seed)
    return [(out(Replicate()), args(Replicate())), (out(Shard(0)), args(Shard(0)))]


def _norm_backward(dy, dz_out, z, weight, bias, mean, rstd, seed, is_rms, dropout_p):
    def args(p):
        return [p, _present(dz_out, p), p, _present(weight, Replicate()), _present(bias, Replicate()), p, p,
                Replicate(), None, None]

    return [(_rep(4), args(Replicate())), ([Shard(0), Shard(0), Partial(), Partial()], args(Shard(0)))]


def _ffn_forward(x, w1, b1, w2, b2, wg, bg, residual, activation, recompute, use_torch_gemm):
    def args(p):
        return [p, Replicate(), _present(b1, Replicate()), Replicate(), _present(b2, Replicate()),
                _present(wg, Replicate()), _present(bg, Replicate()), _present(residual, p), None, None, None]

    return [(_rep(3), args(Replicate())), ([Shard(0)] * 3, args(Shard(0)))]


def _ffn_backward(dy, x, w1, b1, w2, wg, bg, h, aux, activation, needs, use_torch_gemm):
    def args(p):
        return [p, p, Replicate(), _present(b1, Replicate()), Replicate(), _present(wg, Replicate()),
                _present(bg, Replicate()), p, p, None, None, None]

    return [(_rep(7), args(Replicate())), ([Shard(0)] + [Partial()] * 6, args(Shard(0)))]


def _attention_dims(q, k, extras) -> list[int]:
    """The dims of the 4-D views attention may be split on: batch always; heads when the query and the
    key/value head counts both divide by the mesh's size (an uneven split would pair query heads with
    another rank's key/value heads). None with a mask, ALiBi, packed or cached sequences or sinks."""
    if any(t is not None for t in extras):
        return []
    ranks = math.prod(q.mesh.shape)
    return [0, 1] if q.shape[1] % ranks == 0 and k.shape[1] % ranks == 0 else [0]


def _attention_forward(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx,
                       sinks, block_table, leftpad, max_seqlen_q, max_seqlen_k, scale, bottom_right, window_left,
                       window_right, softcap, dropout_p, num_splits, row_stats):
    extras = (attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx, sinks, block_table,
              leftpad)
    tail = [None] * 9 + [None] * 10
    options = [(_rep(4), _rep(3) + tail)]
    for d in _attention_dims(q, k, extras):
        stats = Shard(d + 1) if row_stats else Replicate()
        options.append(([Shard(d), Shard(d), Replicate(), stats], [Shard(d)] * 3 + tail))
    return options


def _attention_backward(dout, q, k, v, out, lse, seed, stats, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, scale, bottom_right, window_left, window_right, softcap,
                        dropout_p, mask_grad):
    extras = (attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k)
    tail = [None] * 4 + [None] * 9
    options = [(_rep(4), _rep(8) + tail)]
    for d in _attention_dims(q, k, extras):
        st = Shard(d + 1) if stats.ndim == 4 else Replicate()
        options.append(([Shard(d)] * 3 + [Replicate()], [Shard(d)] * 6 + [Replicate(), st] + tail))
    return options


def _rotate_half(x, cos, sin, conjugate):
    return [([Replicate()], _rep(3) + [None])] + [([Shard(d)], [Shard(d)] * 3 + [None]) for d in range(3)]


def register() -> bool:
    """Register every rule (idempotent: DTensor keeps the last one per op). False without DTensor."""
    global Partial, Replicate, Shard
    try:
        from torch.distributed.tensor import Partial, Replicate, Shard
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    ops = torch.ops.transformer_kernels
    for op, rule in ((ops.norm_forward, _norm_forward), (ops.norm_backward, _norm_backward),
                     (ops.ffn_forward, _ffn_forward), (ops.ffn_backward, _ffn_backward),
                     (ops.attention_forward, _attention_forward), (ops.attention_backward, _attention_backward),
                     (ops.rotate_half_embed, _rotate_half)):
        register_sharding(op.default)(rule)
    return True


def register_when_available() -> None:
    """Register now if DTensor is imported, else right after it is: DTensors cannot exist before, and
    ``import transformer_kernels`` does not pay for importing DTensor (~0.5 s)."""
    call_when_imported(_DTENSOR, register)
