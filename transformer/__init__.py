"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017) built on the kernels of ``kernels/``.

``Transformer`` (encoder-decoder) and ``TransformerLM`` (decoder-only) run every attention, LayerNorm
and FFN either on the fused Triton kernels (``backend="triton"``) or on ``torch.nn.functional``
(``backend="torch"``), with the same parameters: ``model.set_backend("torch")`` switches a built model.

    cfg = TransformerConfig(vocab_size=32000)           # the paper's base model
    model = Transformer(cfg)
    logits = model(src, tgt)                             # (batch, seqlen_tgt, vocab_size)
"""

from .config import BACKENDS, PRESETS, TransformerConfig, from_preset
from .layers import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    KVCache,
    LayerNorm,
    MultiHeadAttention,
    PositionalEncoding,
    set_backend,
)
from .model import Decoder, Encoder, Transformer, TransformerLM
from .training import compute_loss, copy_task_batch, make_optimizer, noam_lr, noam_scheduler, train_step

__all__ = [
    "BACKENDS",
    "PRESETS",
    "TransformerConfig",
    "from_preset",
    "KVCache",
    "Transformer",
    "TransformerLM",
    "Encoder",
    "Decoder",
    "EncoderLayer",
    "DecoderLayer",
    "MultiHeadAttention",
    "FeedForward",
    "LayerNorm",
    "PositionalEncoding",
    "set_backend",
    "greedy",
    "beam_search",
    "sample",
    "Generation",
    "noam_lr",
    "noam_scheduler",
    "make_optimizer",
    "compute_loss",
    "train_step",
    "copy_task_batch",
]


_GENERATION = ("Generation", "beam_search", "greedy", "sample")


def __getattr__(name):
    # transformer.generate is imported on first use, so `python -m transformer.generate` does not find
    # it already imported (runpy warns then).
    if name in _GENERATION:
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'transformer' has no attribute {name!r}")
