"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017): encoder-decoder and decoder-only.

Both models embed tokens with one shared matrix scaled by sqrt(d_model) (Sec. 3.4), add the positional
encoding (Sec. 3.5; or learned positions), apply dropout (Sec. 5.4), run post-norm (the paper) or
pre-norm layers (Sec. 3.1), and project back to the vocabulary with the same embedding matrix (tied
output projection, Sec. 3.4). The output is logits ``(batch, seqlen, vocab_size)``; the softmax
belongs to the loss.

Batches of different lengths: pass ``*_key_padding_mask`` (bool, True = a real token) or set
``config.pad_id`` and the masks are derived from the tokens. Incremental decoding: :meth:`init_cache`
allocates per-layer :class:`~transformer.layers.KVCache` s, after which each call with the cache
processes only the new tokens (one query row per generated token).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TransformerConfig
from .layers import DecoderLayer, EncoderLayer, KVCache, LayerNorm, PositionalEncoding, set_backend


def _key_mask(padding: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, seqlen_k) True-for-tokens -> (batch, 1, 1, seqlen_k), broadcast over heads and queries."""
    return None if padding is None else padding[:, None, None, :]


def _causal_mask(padding: torch.Tensor | None, seqlen: int) -> torch.Tensor | None:
    """Causal and key padding combined, (batch, 1, seqlen, seqlen); None (use is_causal) without padding."""
    if padding is None:
        return None
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=padding.device).tril()
    return causal[None, None] & padding[:, None, None, :]


class Encoder(nn.Module):
    """``num_encoder_layers`` :class:`EncoderLayer` s (Sec. 3.1) [+ a final LayerNorm when pre-norm]:
    ``(batch, seqlen_src, d_model)`` in and out."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_encoder_layers))
        self.final_norm = LayerNorm(config.d_model, config.layer_norm_eps, config.backend) if config.norm_first else None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask)
        return x if self.final_norm is None else self.final_norm(x)


class Decoder(nn.Module):
    """``num_decoder_layers`` :class:`DecoderLayer` s (Sec. 3.1) [+ a final LayerNorm when pre-norm], each
    attending to the encoder output ``memory`` ``(batch, seqlen_src, d_model)``; ``x`` is
    ``(batch, seqlen_tgt, d_model)`` in and out."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.final_norm = LayerNorm(config.d_model, config.layer_norm_eps, config.backend) if config.norm_first else None

    def forward(self, x, memory, *, self_mask=None, memory_mask=None, cache=None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, self_mask=self_mask, memory_mask=memory_mask,
                      cache=None if cache is None else cache[i])
        return x if self.final_norm is None else self.final_norm(x)


class _TransformerBase(nn.Module):
    """What both models share: the config, the tied embedding, the positional encoding and the backend switch."""

    context_parallel = None  # see transformer.parallel.enable_context_parallel

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.positional_encoding = PositionalEncoding(config.d_model, config.max_len, config.positional)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def backend(self) -> str:
        """``"triton"`` or ``"torch"``: what every attention, LayerNorm and FFN runs on; see :meth:`set_backend`."""
        return self.config.backend

    def set_backend(self, backend: str):
        """Run every op on ``backend`` (``"triton"`` or ``"torch"``) from now on; the weights stay as they are.

        Raises ``ValueError`` for an unknown backend. Returns the model.
        """
        set_backend(self, backend)
        self.config = dataclasses.replace(self.config, backend=backend)
        return self

    def reset_parameters(self) -> None:
        """Xavier-uniform projection weights (as ``nn.Transformer``) and zero biases; embedding entries
        drawn from N(0, 1/d_model), so that after the sqrt(d_model) scaling they have unit variance, like
        the positional encoding they are added to. LayerNorms start at weight 1, bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.embedding.weight, std=self.config.d_model ** -0.5)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``Dropout(Embedding(tokens) * sqrt(d_model) + PE)`` (Sec. 3.4, 3.5, 5.4).

        ``tokens``: ``(batch, seqlen)`` int64 (or int32) ids in ``[0, vocab_size)``. ``positions``: the
        tokens' positions ``(batch, seqlen)``, ``0..seqlen-1`` by default. Returns ``(batch, seqlen,
        d_model)`` in the parameters' dtype. Raises ``TypeError`` for a non-integer tensor, ``ValueError``
        for another shape, an id out of range or a position beyond ``max_len`` (one device sync).
        """
        self._check_tokens(tokens)
        x = self.embedding(tokens) * math.sqrt(self.config.d_model)
        return self.dropout(self.positional_encoding(x, positions))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``x @ embedding.weight^T``, ``(..., d_model) -> (..., vocab_size)``: the output
        projection shares the embedding matrix (Sec. 3.4), so it has no parameter of its own."""
        return F.linear(x, self.embedding.weight)

    def padding_mask(self, tokens: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor | None:
        """The (batch, seqlen) True-for-tokens mask: ``given``, else derived from ``config.pad_id``."""
        if given is not None:
            if given.dtype != torch.bool or given.shape != tokens.shape:
                raise ValueError(f"a key padding mask must be bool of the tokens' shape {tuple(tokens.shape)}, "
                                 f"got {given.dtype} {tuple(given.shape)}")
            return given
        return None if self.config.pad_id is None else tokens != self.config.pad_id

    # transformer_kernels.quantize_fp8(model, kv_cache=True) sets kv_cache_fp8: init_cache then allocates
    # e4m3 caches (KVCache.fp8), the decoding kernel reads half the bytes
    supports_fp8_kv_cache = True
    kv_cache_fp8 = False

    def _new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        c = self.config
        dtype = torch.float8_e4m3fn if self.kv_cache_fp8 else dtype or self.embedding.weight.dtype
        return KVCache.empty(batch, max_len, c.num_heads, c.d_model // c.num_heads,
                             device=device or self.embedding.weight.device, dtype=dtype)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an int64 or int32 tensor, got "
                            f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if tokens.dim() != 2:
            raise ValueError(f"token ids must have shape (batch, seqlen), got {tuple(tokens.shape)}")
        vocab_size = self.config.vocab_size
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got min {int(tokens.min())}, "
                             f"max {int(tokens.max())}")


class Transformer(_TransformerBase):
    """The encoder-decoder Transformer (Sec. 3, Figure 1) with one vocabulary shared by source and target.

    ``model(src, tgt)`` returns next-token logits ``(batch, seqlen_tgt, vocab_size)`` for every target
    position (teacher forcing: position i sees ``tgt[:, :i+1]`` and all of ``src``). Parameters:
    ``embedding``, ``encoder.layers.*``, ``decoder.layers.*`` (and ``*.final_norm`` when pre-norm); the
    output projection is ``embedding``.

    Args:
        config: sizes and options; ``config.backend`` picks the ops (switch later with :meth:`set_backend`).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.reset_parameters()

    def encode(self, src: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids ``(batch, seqlen_src)`` -> encoder output ("memory") ``(batch, seqlen_src, d_model)``."""
        padding = self.padding_mask(src, src_key_padding_mask)
        return self.encoder(self.embed(src), attn_mask=_key_mask(padding))

    def decode(self, tgt, memory, *, src_key_padding_mask=None, tgt_key_padding_mask=None, src=None,
               cache=None, positions=None) -> torch.Tensor:
        """Target ids ``(batch, seqlen_tgt)`` and memory ``(batch, seqlen_src, d_model)`` -> logits
        ``(batch, seqlen_tgt, vocab_size)``. ``src`` (the source ids) lets ``config.pad_id`` derive the
        source padding. With ``cache`` (from :meth:`init_cache`), ``tgt`` holds only the new tokens at
        ``positions`` (default: right after what the cache holds)."""
        memory_padding = src_key_padding_mask if src is None else self.padding_mask(src, src_key_padding_mask)
        if cache is not None:
            positions = _next_positions(cache[0][0], tgt.shape[1]) if positions is None else positions
            return self.project(self.decoder(self.embed(tgt, positions), memory, cache=cache))
        padding = self.padding_mask(tgt, tgt_key_padding_mask)
        x = self.decoder(self.embed(tgt), memory, self_mask=_causal_mask(padding, tgt.shape[1]),
                         memory_mask=_key_mask(memory_padding))
        return self.project(x)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None,
                tgt_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(batch, seqlen_tgt, vocab_size)`` for source ``src`` ``(batch, seqlen_src)`` and target
        input ``tgt`` ``(batch, seqlen_tgt)``; the lengths may differ, the batch sizes may not. The
        padding masks are bool ``(batch, seqlen)``, True for real tokens (or derived from ``config.pad_id``)."""
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(f"src and tgt must have the same batch size, got {src.shape[0]} and {tgt.shape[0]}")
        memory = self.encode(src, src_key_padding_mask)
        return self.decode(tgt, memory, src_key_padding_mask=src_key_padding_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask, src=src)

    def init_cache(self, memory: torch.Tensor, max_len: int, src_lengths: torch.Tensor | None = None):
        """Per decoder layer, a (self-attention, cross-attention) :class:`KVCache` pair for decoding up to
        ``max_len`` target tokens against ``memory`` ``(batch, seqlen_src, d_model)``; ``src_lengths``
        (int, per row) limits the source tokens attended (default: all)."""
        batch, seqlen_src = memory.shape[:2]
        lengths = torch.full((batch,), seqlen_src, dtype=torch.int32, device=memory.device) \
            if src_lengths is None else src_lengths.to(torch.int32)
        empty = memory.new_empty(0)
        return [(self._new_cache(batch, max_len), KVCache(empty, empty, lengths, static=True,
                                                          quantize_static=self.kv_cache_fp8))
                for _ in self.decoder.layers]


class TransformerLM(_TransformerBase):
    """Decoder-only language model: the decoder without encoder-decoder attention (Liu et al., 2018,
    "Generating Wikipedia by Summarizing Long Sequences"), built from the same blocks as :class:`Transformer`.

    ``model(tokens)`` returns next-token logits ``(batch, seqlen, vocab_size)``; position i sees
    ``tokens[:, :i+1]``. It has ``config.num_decoder_layers`` causal :class:`EncoderLayer` s under
    ``layers.*`` (named like ``nn.TransformerEncoderLayer``'s; see :mod:`transformer.layers`) and
    ignores ``config.num_encoder_layers``.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_decoder_layers))
        self.final_norm = LayerNorm(config.d_model, config.layer_norm_eps, config.backend) if config.norm_first else None
        self.reset_parameters()

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *, cache=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``(batch, seqlen)`` -> logits ``(batch, seqlen, vocab_size)``. With ``cache`` (from
        :meth:`init_cache`), ``tokens`` are only the new ones, at ``positions`` (default: right after
        what the cache holds). Under context parallelism (:func:`transformer.parallel.enable_context_parallel`)
        ``tokens`` are this rank's slice and ``positions`` default to their global positions."""
        if cache is not None:
            positions = _next_positions(cache[0], tokens.shape[1]) if positions is None else positions
            x = self.embed(tokens, positions)
            for layer, layer_cache in zip(self.layers, cache):
                x = layer(x, cache=layer_cache)
        else:
            padding = self.padding_mask(tokens, key_padding_mask)
            mask = _causal_mask(padding, tokens.shape[1])
            if positions is None and self.context_parallel is not None:  # this rank's slice of the sequence
                positions = self.context_parallel.positions(tokens.shape[1], tokens.device)
            x = self.embed(tokens, positions)
            for layer in self.layers:
                x = layer(x, is_causal=mask is None, attn_mask=mask)
        return self.project(x if self.final_norm is None else self.final_norm(x))

    def init_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """One self-attention :class:`KVCache` per layer, for decoding up to ``max_len`` tokens."""
        return [self._new_cache(batch, max_len) for _ in self.layers]


def _next_positions(cache: KVCache, new_tokens: int) -> torch.Tensor:
    """Positions ``(batch, new_tokens)`` of tokens appended to ``cache``."""
    return cache.lengths[:, None].long() + torch.arange(new_tokens, device=cache.lengths.device)
