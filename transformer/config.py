"""Hyper-parameters of the Transformer (Vaswani et al., 2017), with the paper's base model as defaults."""

from __future__ import annotations

import dataclasses

BACKENDS = ("triton", "torch")
ACTIVATIONS = ("relu", "gelu")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise ``ValueError``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of :class:`~transformer.Transformer` and :class:`~transformer.TransformerLM`.

    The defaults are the base model of the paper (Table 3): d_model 512, 8 heads, d_ff 2048, 6 + 6
    layers, dropout 0.1 (Sec. 5.4). Invalid values raise ``ValueError`` when the config is built.
    Frozen: derive a variant with ``dataclasses.replace(config, d_model=256)``.

    Attributes:
        vocab_size: size of the shared source/target vocabulary (Sec. 3.4); token ids are ``0..vocab_size-1``.
        d_model: width of every sub-layer's input and output; must be divisible by ``num_heads``.
        num_heads: attention heads; each has ``head_dim = d_model // num_heads`` (Sec. 3.2.2).
        d_ff: inner width of the position-wise feed-forward network (Sec. 3.3).
        num_encoder_layers, num_decoder_layers: stack depths (Sec. 3.1). ``TransformerLM`` uses
            ``num_decoder_layers`` and ignores ``num_encoder_layers``.
        dropout: residual and embedding dropout rate (Sec. 5.4), in [0, 1).
        max_len: longest sequence the sinusoidal positional encoding covers (Sec. 3.5).
        activation: FFN activation, ``"relu"`` (the paper) or ``"gelu"``.
        backend: ``"triton"`` (the fused kernels of ``kernels/``) or ``"torch"`` (``torch.nn.functional``).
        layer_norm_eps: the ``eps`` of every LayerNorm.
    """

    vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout: float = 0.1
    max_len: int = 1024
    activation: str = "relu"
    backend: str = "triton"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("num_encoder_layers", "num_decoder_layers"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        check_backend(self.backend)
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // num_heads`` (64 in the base model)."""
        return self.d_model // self.num_heads


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
