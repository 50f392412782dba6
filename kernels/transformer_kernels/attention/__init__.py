"""Fused scaled-dot-product attention, forward and backward, in Triton.

Algorithm: FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention with Better Parallelism
and Work Partitioning", Algorithms 1 and 2) on the online softmax of Milakov & Gimelshein (2018,
"Online normalizer calculation for softmax"). Each program owns a block of query rows, walks the key
blocks it can see once, keeping a running max and sum, and never stores the seqlen_q x seqlen_k score
matrix; the row logsumexp is saved so the backward can rebuild the probabilities block by block. The
program layout follows the Triton tutorial "Fused Attention" (python/tutorials/06-fused-attention.py).

One kernel family serves every entry point. What a query row i sees of key j:

* bounds and per-sequence lengths (dense, packed variable-length ``cu_seqlens``, or a KV cache's
  ``seqused_k``), and grouped-query attention (query head h reads key/value head h // group_size);
* a band ``-window_left <= j - i - diag <= window_right`` (either side may be unbounded), where
  ``diag`` is 0 (top-left alignment, torch) or seqlen_k - seqlen_q (bottom-right, flash-attention);
  causal attention is the band with ``window_right = 0``. Key blocks outside the band are skipped,
  not masked, so a window of r keys costs O(r n d) (Vaswani et al., 2017, Table 1, "restricted");
* optional score modifiers: tanh soft-capping (Gemma 2), ALiBi biases (Press et al., 2022), and a
  boolean or additive ``attn_mask`` of any broadcast strides (torch's SDPA);
* optional dropout on the probabilities, drawn from a Philox counter (Salmon et al., 2011) keyed by
  (seed, batch*head, row, column), so the backward regenerates exactly the forward's mask.

Rows that see no key output 0, logsumexp -inf, and get 0 gradient (never NaN).

The backward runs two kernels rather than one with atomics: one walks query blocks (over all query
heads of a group) to build dK and dV for a key block, the other walks key blocks to build dQ. That
recomputes Q K^T once more but needs no atomics, so gradients are bitwise deterministic always.
Decoding (few query rows, long KV cache) splits the keys across programs (flash-decoding, Dao et al.
2023) and merges the partial results by their logsumexp in ``_attn_combine_kernel``.

Layers, from the metal up: ``@triton.jit`` kernels -> ``attention_forward`` / ``attention_backward``
(launchers on 4-D views) -> the ``transformer_kernels::attention_forward`` / ``transformer_kernels::attention_backward``
torch.library custom ops with their autograd and fake (meta) implementations, so ``torch.compile``
traces through them without a graph break -> ``scaled_dot_product_attention`` (torch's signature; the
flash-attention signatures live in ``kernels/transformer_kernels/flash_attn_interface.py``). ``attention_reference`` is
the plain PyTorch definition of all of it, used by the tests and by the CPU path.

Where each part lives in this package (one file per layer, from the metal up):

* ``_kernels.py``: every ``@triton.jit`` function (score helpers, block walk, the kernels) and the
  constexpr globals ``LOG2E`` / ``LN2``;
* ``configs.py``: block sizes and launch shapes (``_config``, ``_bwd_configs``) and the key split of
  decoding (``_num_splits``);
* ``launch.py``: the launchers ``attention_forward``, ``attention_backward``, ``dropout_keep_mask``;
* ``ops.py``: the torch.library custom ops, their fake and autograd registrations, ``attention_op``;
* ``api.py``: ``scaled_dot_product_attention``, the shared input checks (``check_qkv``), ``MAX_HEAD_DIM``;
* ``reference.py``: ``attention_reference``.
"""

from ._kernels import LN2, LOG2E, _key_range, _query_range, _walk
from .api import MAX_HEAD_DIM, check_qkv, check_sink, scaled_dot_product_attention
from .launch import attention_backward, attention_forward, dropout_keep_mask
from .ops import attention_op
from .reference import attention_reference
