"""The Transformer's building blocks (Vaswani et al., 2017, Sec. 3), each runnable on two backends.

Every module that computes attention, LayerNorm or the FFN has a ``backend`` attribute, read at each
forward: ``"triton"`` calls the fused kernels of ``kernels/``, ``"torch"`` calls ``torch.nn.functional``.
Both backends use the same parameters, so :func:`set_backend` can switch a built model either way.

Shapes: activations are ``(batch, seqlen, d_model)``; attention heads are ``(batch, num_heads, seqlen,
head_dim)``. Any float dtype the kernels support works (float32, float16, bfloat16).

Parameter names follow ``torch.nn.Transformer*`` where the structure allows (``self_attn``,
``out_proj``, ``linear1``/``linear2``, ``norm1``/``norm2``/``norm3``); the differences are separate
``q_proj``/``k_proj``/``v_proj`` instead of a packed ``in_proj_weight``, the FFN under ``ffn.``, and the
cross-attention called ``cross_attn`` (torch: ``multihead_attn``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .config import TransformerConfig, check_backend

_TORCH_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state_dict) on ``kernels.layer_norm`` or ``F.layer_norm``.

    Input and output ``(..., d_model)``. The normalization of every residual connection (Sec. 3.1).
    """

    def __init__(self, d_model: int, eps: float = 1e-5, backend: str = "triton"):
        super().__init__(d_model, eps=eps)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        """``LayerNorm(x)``, or with ``residual`` the sub-layer connection ``LayerNorm(residual + Dropout(x))``
        (Sec. 3.1, 5.4), one fused kernel on the triton backend."""
        if self.backend == "triton":
            if residual is None and dropout_p == 0:
                return kernels.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            residual = torch.zeros_like(x) if residual is None else residual
            return kernels.add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                                          dropout_p=dropout_p)
        x = F.dropout(x, dropout_p) if dropout_p > 0 else x
        x = x if residual is None else residual + x
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class FeedForward(kernels.FFN):
    """Position-wise feed-forward network ``act(x W1^T + b1) W2^T + b2`` (Sec. 3.3, eq. 2).

    Parameters ``linear1`` (d_model -> d_ff) and ``linear2`` (d_ff -> d_model), as ``kernels.FFN`` and
    ``nn.TransformerEncoderLayer``. Input and output ``(..., d_model)``. No dropout inside: the paper
    drops the sub-layer's output only (Sec. 5.4), which the enclosing layer does.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", backend: str = "triton"):
        super().__init__(d_model, d_ff, activation=activation)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            return super().forward(x)  # kernels.ffn
        return self.linear2(_TORCH_ACTIVATIONS[self.activation](self.linear1(x)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class MultiHeadAttention(nn.Module):
    """Multi-head attention, ``Concat(head_1..head_h) W^O`` with ``head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)``
    (Sec. 3.2.2), on scaled dot-product attention (Sec. 3.2.1).

    Parameters ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``: ``nn.Linear(d_model, d_model)``, the
    projections of all heads side by side. No dropout on the attention weights (the paper has none;
    Sec. 5.4), so the Triton backend needs no attention dropout.
    """

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

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Attend from ``x`` to ``memory`` (to ``x`` itself when ``memory`` is None: self-attention).

        Args:
            x: queries' source, ``(batch, seqlen_q, d_model)``.
            memory: keys' and values' source, ``(batch, seqlen_k, d_model)``; the encoder output in the
                decoder's encoder-decoder attention (Sec. 3.2.3).
            is_causal: query i attends to keys j <= i only (masked decoder self-attention, Sec. 3.2.3);
                top-left aligned like torch's ``is_causal``, meant for self-attention.

        Returns:
            ``(batch, seqlen_q, d_model)``, x's dtype.
        """
        memory = x if memory is None else memory
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(memory))
        v = self._split_heads(self.v_proj(memory))
        if self.backend == "triton":
            out = kernels.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        # out: (batch, num_heads, seqlen_q, head_dim) -> (batch, seqlen_q, d_model), heads concatenated
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen, d_model) -> (batch, num_heads, seqlen, head_dim), a view."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)


class PositionalEncoding(nn.Module):
    """Adds the sinusoidal positional encoding (Sec. 3.5) to ``(batch, seqlen, d_model)`` embeddings.

    ``PE[pos, 2i] = sin(pos / 10000^(2i/d_model))``, ``PE[pos, 2i+1] = cos(pos / 10000^(2i/d_model))``,
    kept as the non-persistent float32 buffer ``pe`` of shape ``(max_len, d_model)``: no parameters and
    nothing in the state_dict. Raises ``ValueError`` for ``seqlen > max_len``.
    """

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * inv_freq)
        pe[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seqlen, max_len = x.shape[1], self.pe.shape[0]
        if seqlen > max_len:
            raise ValueError(f"sequence length {seqlen} exceeds max_len {max_len} of the positional encoding")
        return x + self.pe[:seqlen].to(x.dtype)


class EncoderLayer(nn.Module):
    """Encoder layer (Sec. 3.1): self-attention, then the FFN, each as ``LayerNorm(x + Dropout(Sublayer(x)))``
    (the add, dropout and norm are one fused kernel on the triton backend).

    With ``is_causal=True`` it is also the block of the decoder-only :class:`~transformer.TransformerLM`
    (a decoder layer without encoder-decoder attention). Input and output ``(batch, seqlen, d_model)``.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.self_attn = MultiHeadAttention(c.d_model, c.num_heads, c.backend)
        self.ffn = FeedForward(c.d_model, c.d_ff, c.activation, c.backend)
        self.norm1 = LayerNorm(c.d_model, c.layer_norm_eps, c.backend)
        self.norm2 = LayerNorm(c.d_model, c.layer_norm_eps, c.backend)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        p = self.dropout.p if self.training else 0.0
        x = self.norm1(self.self_attn(x, is_causal=is_causal), residual=x, dropout_p=p)
        return self.norm2(self.ffn(x), residual=x, dropout_p=p)


class DecoderLayer(nn.Module):
    """Decoder layer (Sec. 3.1): masked self-attention, encoder-decoder attention over ``memory``, then
    the FFN, each as ``LayerNorm(x + Dropout(Sublayer(x)))``.

    ``x`` is ``(batch, seqlen_tgt, d_model)``, ``memory`` (the encoder output) ``(batch, seqlen_src, d_model)``;
    returns ``(batch, seqlen_tgt, d_model)``.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.self_attn = MultiHeadAttention(c.d_model, c.num_heads, c.backend)
        self.cross_attn = MultiHeadAttention(c.d_model, c.num_heads, c.backend)
        self.ffn = FeedForward(c.d_model, c.d_ff, c.activation, c.backend)
        self.norm1 = LayerNorm(c.d_model, c.layer_norm_eps, c.backend)
        self.norm2 = LayerNorm(c.d_model, c.layer_norm_eps, c.backend)
        self.norm3 = LayerNorm(c.d_model, c.layer_norm_eps, c.backend)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        p = self.dropout.p if self.training else 0.0
        x = self.norm1(self.self_attn(x, is_causal=True), residual=x, dropout_p=p)
        x = self.norm2(self.cross_attn(x, memory), residual=x, dropout_p=p)
        return self.norm3(self.ffn(x), residual=x, dropout_p=p)


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
