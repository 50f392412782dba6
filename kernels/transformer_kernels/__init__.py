"""Fused Triton kernels for the Transformer's hot spots: attention, layer norm and the feed-forward network.

See README.md, "Where each call runs", for when the Triton kernels run and when the PyTorch path does;
:func:`last_path` tells which one the last call of an op took.
"""
__version__ = "0.2.0"

from .attention import scaled_dot_product_attention
from ._triton_utils import InputTypeError, InputValueError
from .dispatch import last_path, launch_count, launch_counts
from .ffn import FFN, GatedFFN, ffn
from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from .layer_norm import LayerNorm, RMSNorm, add_layer_norm, add_rms_norm, layer_norm, norm_fp8, rms_norm
from .patching import PatchEntry, PatchReport, override_sdpa, patch, unpatch
from .quantize import FP8Linear, QuantizeReport, quantize_fp8
from .rotary import apply_rotary_emb, apply_rotary_pos_emb
from . import context_parallel  # noqa: E402
from . import _sharding  # noqa: E402

_sharding.register_when_available()  # DTensor sharding rules of the custom ops above
from . import hf  # noqa: E402 (transformer_kernels.hf imports transformers only when its functions are called)

__all__ = [
    "__version__",
    "scaled_dot_product_attention",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "apply_rotary_emb",
    "apply_rotary_pos_emb",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "norm_fp8",
    "LayerNorm",
    "RMSNorm",
    "ffn",
    "FFN",
    "GatedFFN",
    "quantize_fp8",
    "FP8Linear",
    "QuantizeReport",
    "patch",
    "unpatch",
    "override_sdpa",
    "PatchReport",
    "PatchEntry",
    "hf",
    "context_parallel",
    "last_path",
    "launch_count",
    "launch_counts",
    "InputValueError",
    "InputTypeError",
]
