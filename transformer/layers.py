"""The Transformer's building blocks (Vaswani et al., 2017, Sec. 3), each runnable on two backends.

Every module that computes attention, LayerNorm or the FFN has a ``backend`` attribute, read at each
forward: ``"triton"`` calls the fused kernels of ``kernels/``, ``"torch"`` calls ``torch.nn.functional``.
Both backends use the same parameters, so :func:`set_backend` can switch a built model either way.

Shapes: activations are ``(batch, seqlen, d_model)``; attention heads are ``(batch, num_heads, seqlen,
head_dim)``. Any float dtype the kernels support works (float32, float16, bfloat16). Masks are bool,
True = may attend, broadcastable to ``(batch, num_heads, seqlen_q, seqlen_k)``.

Parameter names follow ``torch.nn.Transformer*`` where the structure allows (``self_attn``,
``out_proj``, ``linear1``/``linear2``, ``norm1``/``norm2``/``norm3``); the differences are separate
``q_proj``/``k_proj``/``v_proj`` instead of a packed ``in_proj_weight``, the FFN under ``ffn.``, and the
cross-attention called ``cross_attn`` (torch: ``multihead_attn``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import transformer_kernels as tk
from transformer_kernels.attention import fp8

from .config import TransformerConfig, check_backend

_TORCH_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclasses.dataclass
class KVCache:
    """Keys and values of one attention module during incremental decoding.

    Self-attention: ``k``/``v`` are ``(batch, max_len, num_heads, head_dim)`` buffers filled up to
    ``lengths`` (int32, per batch row); each step appends its new tokens (flash-attention's
    ``flash_attn_with_kvcache`` layout, so the Triton backend runs the split-key decoding kernel).
    Cross-attention: ``k``/``v`` hold the projected encoder output, computed on the first step
    (``static=True``), with ``lengths`` the source lengths.
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    static: bool = False
    k_descale: torch.Tensor | None = None
    v_descale: torch.Tensor | None = None
    quantize_static: bool = False  # cross-attention: store the encoder's keys in e4m3 when first filled

    @classmethod
    def empty(cls, batch: int, max_len: int, num_heads: int, head_dim: int, *, device=None, dtype=None) -> "KVCache":
        shape = (batch, max_len, num_heads, head_dim)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype),
                   torch.zeros(batch, dtype=torch.int32, device=device))

    @property
    def fp8(self) -> bool:
        """An e4m3 cache (``transformer_kernels.quantize_fp8(model, kv_cache=True)``): a real value is
        ``k.float() * k_descale[batch, head]``. The descales are set on the first append, per sequence and
        head, from the prompt's amax with 2x headroom (``amax / 224``; vLLM's ``calculate_kv_scales``
        likewise derives its scales from the first batch), and kept for the tokens that follow; a cross-
        attention cache quantizes the encoder's keys exactly (``amax / 448``)."""
        return self.k.dtype == torch.float8_e4m3fn

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search), in place."""
        self.k, self.v, self.lengths = self.k.index_select(0, index), self.v.index_select(0, index), \
            self.lengths.index_select(0, index)
        if self.k_descale is not None:
            self.k_descale, self.v_descale = self.k_descale.index_select(0, index), self.v_descale.index_select(0, index)


def _fp8_quantize(x: torch.Tensor, target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in e4m3, descale (batch, heads)) for ``x`` (batch, seqlen, heads, head_dim): each (sequence,
    head)'s amax mapped to ``target`` (448: exact; less: headroom for values still to come)."""
    amax = x.detach().float().abs().amax(dim=(1, 3))
    descale = (amax / target).clamp_min(torch.finfo(torch.float32).tiny)
    return fp8.to_e4m3(x, descale[:, None, :, None]), descale


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state_dict) on ``transformer_kernels.layer_norm`` or ``F.layer_norm``.

    Input and output ``(..., d_model)``. ``forward(x, residual, dropout_p)`` is the sub-layer connection
    ``LayerNorm(residual + Dropout(x))`` (Sec. 3.1, 5.4), one fused kernel on the triton backend; with
    ``prenorm=True`` it returns ``(LayerNorm(s), s)`` for ``s = residual + Dropout(x)``.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, backend: str = "triton"):
        super().__init__(d_model, eps=eps)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, dropout_p: float = 0.0,
                prenorm: bool = False):
        if self.backend == "triton":
            if residual is None and dropout_p == 0 and not prenorm:
                return tk.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            residual = torch.zeros_like(x) if residual is None else residual
            return tk.add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                                          dropout_p=dropout_p, prenorm=prenorm)
        x = F.dropout(x, dropout_p) if dropout_p > 0 else x
        x = x if residual is None else residual + x
        y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return (y, x) if prenorm else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class FeedForward(tk.FFN):
    """Position-wise feed-forward network ``act(x W1^T + b1) W2^T + b2`` (Sec. 3.3, eq. 2).

    Parameters ``linear1`` (d_model -> d_ff) and ``linear2`` (d_ff -> d_model), as ``transformer_kernels.FFN`` and
    ``nn.TransformerEncoderLayer``. Input and output ``(..., d_model)``; ``residual`` (optional) is added
    to the output (in the last product's epilogue on the triton backend). No dropout inside: the paper
    drops the sub-layer's output only (Sec. 5.4), which the enclosing layer does.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", backend: str = "triton"):
        super().__init__(d_model, d_ff, activation=activation)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.backend == "triton" or input_scale is not None:
            if _is_dtensor(self.linear1.weight):  # tensor parallel (transformer.parallel.apply_tensor_parallel)
                return _tensor_parallel_ffn(self, x, residual)
            return super().forward(x, residual, input_scale)  # transformer_kernels.ffn
        out = self.linear2(_TORCH_ACTIVATIONS[self.activation](self.linear1(x)))
        return out if residual is None else out + residual

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _tensor_parallel_ffn(ffn: "FeedForward", x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The fused FFN kernel on this rank's shards, split explicitly (Megatron-LM's MLP, Shoeybi et al.,
    2019, Sec. 3): ``linear1`` column-wise (rows of W1, entries of b1) and ``linear2`` row-wise (columns of
    W2), so ``act(x W1_r^T + b1_r) W2_r^T`` is this rank's share of the output; the shares are summed (an
    all-reduce), then b2 and the residual are added once. The kernel sees plain tensors: DTensor has no
    sharding rule for a fused MLP whose bias must be added once, so the module does the split. ``x``'s
    gradient is summed over the ranks the same way (Partial -> Replicate)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    w1, b1, w2, b2 = ffn.linear1.weight, ffn.linear1.bias, ffn.linear2.weight, ffn.linear2.bias
    mesh = w1.device_mesh
    x_local = DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
    part = tk.ffn(x_local, w1.to_local(), b1.to_local(), w2.to_local(), None, ffn.activation, recompute=ffn.recompute)
    out = DTensor.from_local(part, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()
    out = out + (b2.to_local() if _is_dtensor(b2) else b2)
    return out if residual is None else out + residual


class MultiHeadAttention(nn.Module):
    """Multi-head attention, ``Concat(head_1..head_h) W^O`` with ``head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)``
    (Sec. 3.2.2), on scaled dot-product attention (Sec. 3.2.1).

    Parameters ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``: ``nn.Linear(d_model, d_model)``, the
    projections of all heads side by side. No dropout on the attention weights (the paper has none;
    Sec. 5.4), so the Triton backend needs no attention dropout.
   
    ``context_parallel`` (None, or a :class:`transformer.parallel.ContextParallel`, set by
    :func:`transformer.parallel.enable_context_parallel`): x and memory hold this rank's slice of the
    sequence and attention runs over the whole sequence across the group (no ``attn_mask`` then).
    Under tensor parallelism the projections hold this rank's heads; the head count is read from their
    output width.
    """

    context_parallel = None

    def __init__(self, d_model: int, num_heads: int, backend: str = "triton"):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.backend = check_backend(backend)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, *, is_causal: bool = False,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Attend from ``x`` to ``memory`` (to ``x`` itself when ``memory`` is None: self-attention).

        Args:
            x: queries' source, ``(batch, seqlen_q, d_model)``.
            memory: keys' and values' source, ``(batch, seqlen_k, d_model)``; the encoder output in the
                decoder's encoder-decoder attention (Sec. 3.2.3).
            is_causal: query i attends to keys j <= i only (masked decoder self-attention, Sec. 3.2.3),
                top-left aligned like torch's ``is_causal``.
            attn_mask: bool, True = may attend, broadcastable to ``(batch, num_heads, seqlen_q, seqlen_k)``
                (key padding: ``(batch, 1, 1, seqlen_k)``); not together with ``is_causal``.
            cache: incremental decoding (:class:`KVCache`). Self-attention: ``x`` holds the new tokens,
                which see the cached ones and, causally, each other; they are appended. Cross-attention
                (``cache.static``): keys/values come from the cache (filled from ``memory`` on the first call).

        Returns:
            ``(batch, seqlen_q, d_model)``, x's dtype.
        """
        if cache is not None:
            return self._forward_cached(x, memory, cache)
        memory = x if memory is None else memory
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(memory))
        v = self._split_heads(self.v_proj(memory))
        if self.context_parallel is not None:
            if attn_mask is not None:
                raise ValueError("MultiHeadAttention: attn_mask (key padding) is not supported under context "
                                 "parallelism; pack or pad sequences so every token is scored, and use is_causal")
            out = self.context_parallel.attention(q, k, v, is_causal=is_causal)
        else:
            sdpa = tk.scaled_dot_product_attention if self.backend == "triton" else F.scaled_dot_product_attention
            out = sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        # out: (batch, num_heads, seqlen_q, head_dim) -> (batch, seqlen_q, d_model), heads concatenated
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _forward_cached(self, x, memory, cache: KVCache) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (-1, self.head_dim))  # (batch, t, heads, head_dim)
        if cache.static:  # cross-attention: fixed keys, every source token visible up to its length
            if memory is not None and cache.k.numel() == 0:
                cache.k = self.k_proj(memory).unflatten(-1, (-1, self.head_dim))
                cache.v = self.v_proj(memory).unflatten(-1, (-1, self.head_dim))
                if cache.quantize_static:  # quantized exactly: the encoder's keys never grow
                    (cache.k, cache.k_descale), (cache.v, cache.v_descale) = (_fp8_quantize(t, 448.0)
                                                                              for t in (cache.k, cache.v))
            out = self._attend_cache(q, cache, new_k=None, new_v=None, causal=False)
        else:
            k = self.k_proj(x).unflatten(-1, (-1, self.head_dim))
            v = self.v_proj(x).unflatten(-1, (-1, self.head_dim))
            out = self._attend_cache(q, cache, new_k=k, new_v=v, causal=True)
            cache.lengths = cache.lengths + x.shape[1]
        return self.out_proj(out.flatten(2))

    def _attend_cache(self, q, cache: KVCache, *, new_k, new_v, causal: bool) -> torch.Tensor:
        """(batch, t, heads, head_dim) attention of ``q`` over the cache (plus the appended new keys)."""
        if cache.fp8:  # transformer_kernels' FP8 decoding (on a CPU without the interpreter: its PyTorch path)
            if cache.k_descale is None:
                cache.k_descale, cache.v_descale = (_fp8_quantize(t, 224.0)[1] for t in (new_k, new_v))
            return tk.flash_attn_with_kvcache(q, cache.k, cache.v, new_k, new_v, cache_seqlens=cache.lengths,
                                              causal=causal, k_descale=cache.k_descale, v_descale=cache.v_descale)
        if self.backend == "triton":
            return tk.flash_attn_with_kvcache(q, cache.k, cache.v, new_k, new_v, cache_seqlens=cache.lengths,
                                                   causal=causal)
        t = q.shape[1]
        if new_k is not None:  # append, then attend bottom-right causally over lengths + t keys
            positions = cache.lengths[:, None].long() + torch.arange(t, device=q.device)
            rows = torch.arange(q.shape[0], device=q.device)[:, None]
            cache.k[rows, positions], cache.v[rows, positions] = new_k, new_v
        used = cache.lengths + (t if new_k is not None else 0)
        n = int(used.max())
        j = torch.arange(n, device=q.device)
        visible = j[None, None, :] < used[:, None, None]  # (batch, 1, n)
        if causal:
            i = torch.arange(t, device=q.device)
            visible = visible & (j[None, None, :] <= (used[:, None, None] - t + i[None, :, None]))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k[:, :n].transpose(1, 2),
                                             cache.v[:, :n].transpose(1, 2), attn_mask=visible[:, None])
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen, d_model) -> (batch, num_heads, seqlen, head_dim), a view (this rank's heads
        under tensor parallelism)."""
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)


class PositionalEncoding(nn.Module):
    """Adds position information to ``(batch, seqlen, d_model)`` embeddings.

    ``"sinusoidal"`` (Sec. 3.5): ``PE[pos, 2i] = sin(pos / 10000^(2i/d_model))``, ``PE[pos, 2i+1] =
    cos(pos / 10000^(2i/d_model))``, the non-persistent float32 buffer ``pe`` ``(max_len, d_model)``, not
    in the state_dict. ``"learned"``: an ``nn.Embedding(max_len, d_model)`` under ``embedding``.
    ``positions`` (int, ``(batch, seqlen)``) are the tokens' positions, ``0..seqlen-1`` by default (set
    them when decoding incrementally). Raises ``ValueError`` for a position >= ``max_len``.
    """

    def __init__(self, d_model: int, max_len: int, kind: str = "sinusoidal"):
        super().__init__()
        self.kind, self.max_len = kind, max_len
        if kind == "learned":
            self.embedding = nn.Embedding(max_len, d_model)
            nn.init.normal_(self.embedding.weight, std=d_model ** -0.5)
            return
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * inv_freq)
        pe[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            if x.shape[1] > self.max_len:
                raise ValueError(f"sequence length {x.shape[1]} exceeds max_len {self.max_len} of the positional encoding")
            positions = torch.arange(x.shape[1], device=x.device)[None]
        elif positions.numel() and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds max_len {self.max_len} of the positional encoding")
        table = self.embedding.weight if self.kind == "learned" else self.pe
        return x + table[positions].to(x.dtype)


class EncoderLayer(nn.Module):
    """Encoder layer (Sec. 3.1): self-attention, then the FFN, each as ``LayerNorm(x + Dropout(Sublayer(x)))``
    (post-norm: the add, dropout and norm are one fused kernel on the triton backend), or with
    ``norm_first`` as ``x + Dropout(Sublayer(LayerNorm(x)))`` (pre-norm).

    With ``is_causal=True`` it is also the block of the decoder-only :class:`~transformer.TransformerLM`
    (a decoder layer without encoder-decoder attention). Input and output ``(batch, seqlen, d_model)``.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.norm_first = c.norm_first
        self.self_attn = MultiHeadAttention(c.d_model, c.num_heads, c.backend)
        self.ffn = FeedForward(c.d_model, c.d_ff, c.activation, c.backend)
        self.norm1 = LayerNorm(c.d_model, c.layer_norm_eps, c.backend)
        self.norm2 = LayerNorm(c.d_model, c.layer_norm_eps, c.backend)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, *, is_causal: bool = False, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        p = self.dropout.p if self.training else 0.0
        attend = lambda h: self.self_attn(h, is_causal=is_causal, attn_mask=attn_mask, cache=cache)  # noqa: E731
        if not self.norm_first:
            x = self.norm1(attend(x), residual=x, dropout_p=p)
            return self.norm2(self.ffn(x), residual=x, dropout_p=p)
        return _prenorm_ffn(self.norm2, self.ffn, attend(self.norm1(x)), x, p, self.dropout)


class DecoderLayer(nn.Module):
    """Decoder layer (Sec. 3.1): masked self-attention, encoder-decoder attention over ``memory``, then
    the FFN, each as ``LayerNorm(x + Dropout(Sublayer(x)))`` (or pre-norm with ``norm_first``).

    ``x`` is ``(batch, seqlen_tgt, d_model)``, ``memory`` (the encoder output) ``(batch, seqlen_src, d_model)``;
    returns ``(batch, seqlen_tgt, d_model)``. ``self_mask`` replaces the causal mask when given (causal
    and padding combined); ``memory_mask`` masks source padding; ``cache`` is ``(self, cross)`` caches.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.norm_first = c.norm_first
        self.self_attn = MultiHeadAttention(c.d_model, c.num_heads, c.backend)
        self.cross_attn = MultiHeadAttention(c.d_model, c.num_heads, c.backend)
        self.ffn = FeedForward(c.d_model, c.d_ff, c.activation, c.backend)
        self.norm1 = LayerNorm(c.d_model, c.layer_norm_eps, c.backend)
        self.norm2 = LayerNorm(c.d_model, c.layer_norm_eps, c.backend)
        self.norm3 = LayerNorm(c.d_model, c.layer_norm_eps, c.backend)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, *, self_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: tuple[KVCache, KVCache] | None = None) -> torch.Tensor:
        p = self.dropout.p if self.training else 0.0
        self_cache, cross_cache = cache if cache is not None else (None, None)
        attend_self = lambda h: self.self_attn(h, is_causal=self_mask is None and cache is None,  # noqa: E731
                                               attn_mask=self_mask, cache=self_cache)
        attend_memory = lambda h: self.cross_attn(h, memory, attn_mask=memory_mask, cache=cross_cache)  # noqa: E731
        if not self.norm_first:
            x = self.norm1(attend_self(x), residual=x, dropout_p=p)
            x = self.norm2(attend_memory(x), residual=x, dropout_p=p)
            return self.norm3(self.ffn(x), residual=x, dropout_p=p)
        h, x = self.norm2(attend_self(self.norm1(x)), residual=x, dropout_p=p, prenorm=True)
        return _prenorm_ffn(self.norm3, self.ffn, attend_memory(h), x, p, self.dropout)


def _add_sublayer(ffn: FeedForward, h: torch.Tensor, x: torch.Tensor, dropout: nn.Dropout) -> torch.Tensor:
    """``x + Dropout(FFN(h))``; without dropout the add rides in the FFN's last epilogue."""
    if dropout.p > 0 and dropout.training:
        return x + dropout(ffn(h))
    return ffn(h, residual=x)


def _prenorm_ffn(norm: LayerNorm, ffn: FeedForward, sublayer_out: torch.Tensor, x: torch.Tensor, p: float,
                 dropout: nn.Dropout) -> torch.Tensor:
    """The pre-norm block's tail ``s + Dropout(FFN(LayerNorm(s)))``, ``s = x + Dropout(sublayer_out)``.
    With FP8 FFN weights (``transformer_kernels.quantize_fp8``) in inference, the norm writes its output
    in e4m3 with per-token scales (``transformer_kernels.norm_fp8``): the FFN's input is quantized inside
    the norm, and its first GEMM runs at the FP8 rate."""
    if (isinstance(ffn.linear1, tk.FP8Linear) and norm.backend == "triton" and p == 0
            and not (dropout.p > 0 and dropout.training)):
        h, h_scale, x = tk.norm_fp8(sublayer_out, norm.normalized_shape, norm.weight, norm.bias, norm.eps,
                                    residual=x)
        return ffn(h, residual=x, input_scale=h_scale)
    h, x = norm(sublayer_out, residual=x, dropout_p=p, prenorm=True)
    return _add_sublayer(ffn, h, x, dropout)


BACKEND_MODULES = (LayerNorm, FeedForward, MultiHeadAttention)


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    """Switch every attention, LayerNorm and FFN inside ``module`` to ``backend`` (``"triton"`` or ``"torch"``).

    Parameters are untouched, so the same weights give the same outputs, within rounding, either way.
    Raises ``ValueError`` for an unknown backend. Returns ``module``. For a module built from these
    layers; on a ``Transformer``/``TransformerLM`` call ``model.set_backend``, which also updates ``model.config``.
    """
    check_backend(backend)
    for m in module.modules():
        if isinstance(m, BACKEND_MODULES):
            m.backend = backend
    return module
