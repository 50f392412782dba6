"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017): encoder-decoder and decoder-only.

Both models embed tokens with one shared matrix scaled by sqrt(d_model) (Sec. 3.4), add the sinusoidal
positional encoding (Sec. 3.5) and dropout (Sec. 5.4), run post-norm layers (Sec. 3.1), and project
back to the vocabulary with the same embedding matrix (tied output projection, Sec. 3.4). The output
is logits ``(batch, seqlen, vocab_size)``; the softmax belongs to the loss.

Not here yet: padding masks (every sequence in a batch has the same length; the Triton attention
takes no ``attn_mask`` yet), beam search, a KV cache.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TransformerConfig
from .layers import DecoderLayer, EncoderLayer, PositionalEncoding, set_backend


class Encoder(nn.Module):
    """``num_encoder_layers`` :class:`EncoderLayer` s (Sec. 3.1): ``(batch, seqlen_src, d_model)`` in and out."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_encoder_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Decoder(nn.Module):
    """``num_decoder_layers`` :class:`DecoderLayer` s (Sec. 3.1), each attending to the encoder output
    ``memory`` ``(batch, seqlen_src, d_model)``; ``x`` is ``(batch, seqlen_tgt, d_model)`` in and out."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, memory)
        return x


class _TransformerBase(nn.Module):
    """What both models share: the config, the tied embedding, the positional encoding and the backend switch."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.positional_encoding = PositionalEncoding(config.d_model, config.max_len)
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

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``Dropout(Embedding(tokens) * sqrt(d_model) + PE)`` (Sec. 3.4, 3.5, 5.4).

        ``tokens``: ``(batch, seqlen)`` int64 (or int32) ids in ``[0, vocab_size)``, ``seqlen <= max_len``.
        Returns ``(batch, seqlen, d_model)`` in the parameters' dtype. Raises ``TypeError`` for a
        non-integer tensor, ``ValueError`` for another shape or an id out of range (that check reads
        the ids' min and max, one device sync per call).
        """
        self._check_tokens(tokens)
        x = self.embedding(tokens) * math.sqrt(self.config.d_model)
        return self.dropout(self.positional_encoding(x))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``x @ embedding.weight^T``, ``(..., d_model) -> (..., vocab_size)``: the output
        projection shares the embedding matrix (Sec. 3.4), so it has no parameter of its own."""
        return F.linear(x, self.embedding.weight)

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
    ``embedding``, ``encoder.layers.*``, ``decoder.layers.*``; the output projection is ``embedding``.

    Args:
        config: sizes and options; ``config.backend`` picks the ops (switch later with :meth:`set_backend`).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.reset_parameters()

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """Source ids ``(batch, seqlen_src)`` -> encoder output ("memory") ``(batch, seqlen_src, d_model)``."""
        return self.encoder(self.embed(src))

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Target ids ``(batch, seqlen_tgt)`` and memory ``(batch, seqlen_src, d_model)`` -> logits
        ``(batch, seqlen_tgt, vocab_size)``."""
        return self.project(self.decoder(self.embed(tgt), memory))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, seqlen_tgt, vocab_size)`` for source ``src`` ``(batch, seqlen_src)`` and target
        input ``tgt`` ``(batch, seqlen_tgt)``; the lengths may differ, the batch sizes may not."""
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(f"src and tgt must have the same batch size, got {src.shape[0]} and {tgt.shape[0]}")
        return self.decode(tgt, self.encode(src))


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
        self.reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(batch, seqlen)`` -> logits ``(batch, seqlen, vocab_size)``."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, is_causal=True)
        return self.project(x)
