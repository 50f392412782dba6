"""Hyper-parameters of the Transformer (Vaswani et al., 2017), with the paper's base model as defaults."""

from __future__ import annotations

import dataclasses

BACKENDS = ("triton", "torch")
ACTIVATIONS = ("relu", "gelu")
POSITIONALS = ("sinusoidal", "learned")
BYTE_VOCAB_SIZE = 259  # 256 byte values + PAD, BOS, EOS (transformer/data.py)


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
        norm_first: pre-norm, ``x + Sublayer(LayerNorm(x))`` with a final LayerNorm per stack (Xiong et
            al., 2020), instead of the paper's post-norm ``LayerNorm(x + Sublayer(x))``.
        positional: ``"sinusoidal"`` (Sec. 3.5) or ``"learned"`` position embeddings (the paper's Table 3,
            row E, compares them).
        pad_id: token id of padding; when set, ``pad_id`` keys are masked out of every attention.

    Presets (:meth:`from_preset`): the paper's ``"base"`` and ``"big"`` (Table 3), and ``"small"`` and
    ``"tiny"``, which train on a CPU.
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
    norm_first: bool = False
    positional: str = "sinusoidal"
    pad_id: int | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TransformerConfig":
        """A preset's config with ``overrides`` (e.g. ``vocab_size=...``). Raises ``ValueError`` for an
        unknown name; the names are in :data:`PRESETS`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

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
        if self.positional not in POSITIONALS:
            raise ValueError(f"unknown positional {self.positional!r}; expected one of {POSITIONALS}")
        if self.pad_id is not None and not (isinstance(self.pad_id, int) and 0 <= self.pad_id < self.vocab_size):
            raise ValueError(f"pad_id must be None or an int in [0, {self.vocab_size}), got {self.pad_id!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // num_heads`` (64 in the base model)."""
        return self.d_model // self.num_heads


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# The paper's base and big models (Table 3; big: dropout 0.3 for EN-DE), with its 37000-token shared
# vocabulary; "small" and "tiny" are byte-level models that train on a CPU in minutes and seconds.
PRESETS: dict[str, dict] = {
    "base": dict(vocab_size=37000, d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6, num_decoder_layers=6,
                 dropout=0.1),
    "big": dict(vocab_size=37000, d_model=1024, num_heads=16, d_ff=4096, num_encoder_layers=6, num_decoder_layers=6,
                dropout=0.3),
    "small": dict(vocab_size=BYTE_VOCAB_SIZE, d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3,
                  num_decoder_layers=3, dropout=0.1, max_len=512),
    "tiny": dict(vocab_size=BYTE_VOCAB_SIZE, d_model=64, num_heads=2, d_ff=256, num_encoder_layers=2,
                 num_decoder_layers=2, dropout=0.0, max_len=256),
}


def from_preset(name: str, **overrides) -> TransformerConfig:
    """Shorthand for :meth:`TransformerConfig.from_preset`."""
    return TransformerConfig.from_preset(name, **overrides)
