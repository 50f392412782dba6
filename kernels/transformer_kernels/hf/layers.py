"""The kernel layers that :mod:`transformer_kernels.hf.kernelize` maps transformers' kernel names to.

transformers marks its layers for kernel replacement with ``use_kernel_forward_from_hub(name)``;
Hugging Face's ``kernels.kernelize`` swaps the forward of every marked module for the ``forward`` of the
layer class that a kernel mapping gives for ``name``, bound to the original module. The classes here
are such layers, in the form ``kernels`` requires (``kernels/_internals/layer/layer.py``,
``_validate_layer``): stateless (no ``__init__``, no members beyond ``nn.Module``'s, ``has_backward`` and
``can_torch_compile``), each ``forward`` with the replaced forward's parameters.

A name says little about the code behind it, so each forward first proves that the module's class
runs the code our kernel reproduces (:func:`transformer_kernels.hf._common.same_function` against
transformers' reference; the answer is cached per class and is a constant to ``torch.compile``) and
runs the original otherwise, as it does for calls the kernel cannot take (mixed dtypes, float64, ...).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..rotary import apply_checked, rotary_pos_emb_problem
from ._common import _forward_is, _hf_module, same_function
from .architectures import _is_gemma_norm, gemma_rms_norm, llama_rms_norm

_RECOGNIZED: dict[tuple[type, str], bool] = {}


def _original_function(cls: type):
    """The function that ``use_kernel_forward_from_hub`` wrapped into module class ``cls`` (its ``Func``
    class keeps it in ``forward``'s closure as ``func``), or None when ``cls`` wraps no function."""
    forward = getattr(cls, "forward", None)
    cells = dict(zip(getattr(getattr(forward, "__code__", None), "co_freevars", ()), getattr(forward, "__closure__", None) or ()))
    return cells["func"].cell_contents if "func" in cells else None


def _is_llama_rotary(cls: type) -> bool:
    func, ref = _original_function(cls), _original_function(type(_hf_module("models.llama.modeling_llama").apply_rotary_pos_emb))
    return func is not None and ref is not None and same_function(func, ref)


_RECOGNIZERS = {
    "llama_rms_norm": lambda cls: _forward_is(cls, "llama", "LlamaRMSNorm"),
    "gemma_rms_norm": _is_gemma_norm,
    "llama_rotary": _is_llama_rotary,
}


@torch.compiler.assume_constant_result
def recognized(cls: type, kind: str) -> bool:
    """Whether module class ``cls`` runs the code of ``kind`` ("llama_rms_norm", "gemma_rms_norm",
    "llama_rotary"). Cached per class; ``torch.compile`` takes the answer as a constant (no graph break)."""
    key = (cls, kind)
    answer = _RECOGNIZED.get(key)
    if answer is None:
        try:
            answer = bool(_RECOGNIZERS[kind](cls))
        except (ImportError, AttributeError):  # a transformers without the reference model
            answer = False
        _RECOGNIZED[key] = answer
    return answer


class LlamaRMSNorm(nn.Module):
    """Kernel layer for transformers' ``"RMSNorm"`` (LlamaRMSNorm's code: 133 classes in transformers 5.25):
    ``transformer_kernels.rms_norm`` with the module's ``weight`` and ``variance_epsilon``
    (:func:`~transformer_kernels.hf.architectures.llama_rms_norm`); other code runs its own forward."""

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states):
        if recognized(type(self), "llama_rms_norm"):
            y = llama_rms_norm(self, hidden_states)
            if y is not None:
                return y
        return type(self).forward(self, hidden_states)


class GemmaRMSNorm(nn.Module):
    """Kernel layer for transformers' ``"RMSNormZeroCentered"`` (GemmaRMSNorm's code, ``x * (1 + w)`` in
    fp32: Qwen3.5's norms in transformers 5.25): ``transformer_kernels.rms_norm`` with the fp32 weight
    ``1 + weight`` (:func:`~transformer_kernels.hf.architectures.gemma_rms_norm`); other code runs its
    own forward."""

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states):
        if recognized(type(self), "gemma_rms_norm"):
            y = gemma_rms_norm(self, hidden_states)
            if y is not None:
                return y
        return type(self).forward(self, hidden_states)


class RotaryPosEmb(nn.Module):
    """Kernel layer for transformers' ``"rotary_pos_emb"`` (the function ``apply_rotary_pos_emb(q, k, cos,
    sin, unsqueeze_dim=1)`` with Llama's code: 111 modeling files in transformers 5.25, partial-rotary
    models such as Phi included, which pass the rotary slice of q and k):
    :func:`transformer_kernels.rotary.apply_rotary_pos_emb`, one fused kernel per tensor. Other code,
    and calls the kernel cannot take (cos/sin that require grad, odd head_dim, ...), run the original."""

    has_backward = True
    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        if recognized(type(self), "llama_rotary") and rotary_pos_emb_problem(q, k, cos, sin, unsqueeze_dim) is None:
            return apply_checked(q, k, cos, sin, unsqueeze_dim)  # checked on the line above
        func = _original_function(type(self))
        if func is None:  # a module class marked "rotary_pos_emb", not a wrapped function
            return type(self).forward(self, q, k, cos, sin, unsqueeze_dim)
        return func(q, k, cos, sin, unsqueeze_dim)
