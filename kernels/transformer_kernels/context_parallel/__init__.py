"""Context-parallel attention: one attention call split over the ranks of a process group, each rank
holding a slice of the sequence, on torch.distributed (NCCL on GPUs, gloo on CPUs).

Two strategies, one result (that of one device attending over the whole sequence):

* ``"ring"`` (:mod:`.ring`; Liu et al., 2023): key/value blocks travel around the ring, overlapped with
  the local kernel; partial outputs merge through their logsumexp in float32. Any head count.
* ``"all_to_all"`` (:mod:`.all_to_all`; DeepSpeed Ulysses, Jacobs et al., 2023): two all-to-alls swap
  the sequence split for a head split around one full-sequence kernel call. Heads divisible by the
  group size.

And two layouts of the sequence (:mod:`.layout`): ``"zigzag"`` (rank r holds chunks r and 2W-1-r of
2W: every rank does the same causal work) and ``"contiguous"``. :func:`shard` / :func:`unshard` cut and
rebuild a batch's tensors (tokens, positions, labels) that way; :func:`positions` gives each local
token's global position.

Entry points: :func:`attn_func` (flash-attention's signature and layout) and
:func:`scaled_dot_product_attention` (torch's), each with ``group=``, ``strategy=``, ``layout=``.
Supported across chunks: causal masks (bottom-right for ``attn_func``, top-left for the torch form),
sliding windows, soft-capping, GQA/MQA, dropout (the Philox mask one device draws), seqlen_q !=
seqlen_k. Not supported (a clear error naming the argument): ``alibi_slopes``, ``attn_mask``.
The work is an ``autograd.Function`` around the Triton launchers (or the PyTorch path on CPUs without
the interpreter); ``torch.compile`` graph-breaks around it (collectives inside).
:func:`communication_volume` counts what each strategy sends.
"""

from .api import STRATEGIES, attn_func, resolve_group, scaled_dot_product_attention
from .layout import LAYOUTS, gather_order, positions, shard, unshard
from .volume import communication_volume

__all__ = ["attn_func", "scaled_dot_product_attention", "shard", "unshard", "positions", "gather_order",
           "resolve_group", "communication_volume", "STRATEGIES", "LAYOUTS"]
