"""Hugging Face ``transformers`` integration: our attention, norms, MLPs and rotary embedding in its models.

Three pieces, one module each: ``attention`` and ``architectures`` (both reversible with
:func:`transformer_kernels.unpatch`) and ``mapping`` (transformers' own kernel mechanism):

* **Attention** goes through transformers' own extension point (``transformers.AttentionInterface``,
  https://huggingface.co/docs/transformers/en/attention_interface): :func:`register` adds
  :func:`attention_forward` under the name ``"kernels_sdpa"``, together with transformers' SDPA mask
  builder under the same name (``transformers.masking_utils.AttentionMaskInterface``), so a model
  switched to it builds exactly the masks it builds for ``"sdpa"`` (boolean, True = attend, or None
  with ``is_causal``). :func:`attention_forward` mirrors transformers' ``sdpa_attention_forward``
  (integrations/sdpa_attention.py) with our kernel, using its ``enable_gqa`` instead of ``repeat_kv``.
  Load-time use: ``register()`` then ``from_pretrained(..., attn_implementation="kernels_sdpa")``.
  Models that transformers runs eagerly for what SDPA lacks (Gemma 2's soft-capping, gpt-oss's sinks)
  are switched too: our kernel has both. A second name, ``"kernels_flash_attention_2"``
  (:data:`FLASH_ATTENTION_NAME`, :func:`flash_attention_forward`, :func:`set_flash_attention`), serves
  transformers' flash-attention contract with our flash functions: padding-free and packed batches and
  continuous batching (``generate_batch``) over its paged KV cache.
* **Norms and MLPs** are swapped per instance, as :func:`transformer_kernels.patch` does (the class becomes a
  subclass whose forward runs our kernels; parameters and ``state_dict`` keys stay): ``LlamaRMSNorm``
  -> ``transformer_kernels.rms_norm``; ``LlamaMLP`` (gate/up/down) -> gated ``transformer_kernels.ffn``; ``GPT2MLP`` (Conv1D,
  ``gelu_new``) -> ``transformer_kernels.ffn`` on the transposed Conv1D weights; ``GPTNeoXMLP`` -> ``transformer_kernels.ffn``;
  ``Phi3MLP`` (one fused ``gate_up_proj``) -> gated ``transformer_kernels.ffn`` on its two row halves; ``CLIPMLP``
  (``quick_gelu``) -> ``transformer_kernels.ffn``; T5's ``T5LayerNorm`` -> ``transformer_kernels.rms_norm`` and
  ``T5DenseActDense`` / ``T5DenseGatedActDense`` -> ``transformer_kernels.ffn``; ``BertIntermediate`` +
  ``BertOutput`` -> one ``transformer_kernels.ffn`` (patched on ``BertLayer.feed_forward_chunk``); BERT's
  ``LayerNorm(dropout(h) + x)`` -> the fused Add & Norm ``transformer_kernels.add_layer_norm``; every
  ``nn.LayerNorm`` -> ``transformer_kernels.layer_norm``.

A module is recognized by *code*, not by name: its forward must be the very code of the reference
class above (same bytecode, constants, and the same objects behind the globals it reads), so
"Copied from" siblings (Mistral's and Qwen2's RMSNorm/MLP, RoBERTa's layers, Gemma's MLP) are patched
too, while a look-alike with different math is left alone and reported. Gemma's RMSNorm (``1 + weight``,
all in fp32; Gemma 1-3) has a rule of its own.

The entry points follow Liger-Kernel's ``apply_liger_kernel_to_llama`` etc. (github.com/linkedin/
Liger-Kernel), but patch the given model instance only, never transformers' classes.

* **transformers' kernel names** (``use_kernel_forward_from_hub("RMSNorm")``, ``"RMSNormZeroCentered"``,
  ``"rotary_pos_emb"``) map to our layers for Hugging Face's ``kernels.kernelize``:
  :data:`KERNEL_MAPPING`, :func:`kernelize` (one call), :func:`write_local_kernel` (a folder for
  ``KernelConfig(..., use_local_kernel=True)``); see :mod:`transformer_kernels.hf.mapping`. It reaches
  what transformers marks (norms, rotary), :func:`apply_kernels` the rest (MLPs, attention, nn.*).

The attention is registered (:func:`register`) as soon as both ``transformer_kernels`` and ``transformers`` are
imported, in either order (``import transformer_kernels`` does not import transformers: a hook registers right after
transformers' own import), so ``from_pretrained(..., attn_implementation="kernels_sdpa")`` needs no
call, and a pickled patched model finds it registered when it loads. ``import transformer_kernels.hf`` also works
without transformers; the functions then raise ``ImportError``.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn

from .. import patching
from .._import_hook import call_when_imported
from ..patching import Options, PatchReport, original_class
from ._common import _hf_module, _transformers, same_function
from .architectures import rules
from .attention import (ATTENTION_NAME, FLASH_ATTENTION_NAME, _switch_attention, attention_forward,
                        flash_attention_forward, register, set_flash_attention)
from .mapping import KERNEL_MAPPING, kernelize, write_local_kernel

__all__ = [
    "ATTENTION_NAME",
    "FLASH_ATTENTION_NAME",
    "register",
    "attention_forward",
    "flash_attention_forward",
    "set_flash_attention",
    "apply_kernels",
    "apply_kernels_to_gpt2",
    "apply_kernels_to_bert",
    "apply_kernels_to_llama",
    "KERNEL_MAPPING",
    "kernelize",
    "write_local_kernel",
]


def apply_kernels(model: nn.Module, *, attention: bool = True, layer_norm: bool = True,
                  ffn: bool = True) -> PatchReport:
    """Put our kernels into a transformers model, in place, wherever it provably computes the same.

    * attention (``attention=True``): a model on ``attn_implementation="sdpa"`` (transformers' default)
      is switched to :data:`ATTENTION_NAME`; models on other implementations are left alone.
    * norms (``layer_norm=True``): ``nn.LayerNorm`` -> ``transformer_kernels.layer_norm``; LlamaRMSNorm-code norms
      -> ``transformer_kernels.rms_norm``.
    * MLPs (``ffn=True``): LlamaMLP-, GPT2MLP- and BertLayer-code feed-forward blocks -> ``transformer_kernels.ffn``
      (gated for Llama); BERT's residual add goes into its LayerNorm (fused Add & Norm).

    Everything else (including the rules of :func:`transformer_kernels.patch` for torch.nn modules) is as in
    :func:`transformer_kernels.patch`: parameters and ``state_dict`` unchanged, call-time fallbacks where a kernel
    would differ (dropout in training, dtypes, hooks), and :func:`transformer_kernels.unpatch` undoes all of it,
    the attention implementation included.

    Args:
        model: a ``transformers.PreTrainedModel`` (any ``nn.Module`` works for norms and MLPs).

    Returns:
        A :class:`transformer_kernels.PatchReport` (the attention switch is the entry with path ``""`` and
        original ``"attn_implementation='sdpa'"``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``. ImportError: transformers is not installed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_kernels: model must be a torch.nn.Module, got {type(model).__name__}")
    _transformers()
    for name in ("activations", "pytorch_utils"):  # what patched forwards look up (see _hf_module)
        _hf_module(name)
    opts = Options(attention=attention, layer_norm=layer_norm, ffn=ffn)
    report = PatchReport(model, source="transformer_kernels.hf.apply_kernels")
    if attention:
        _switch_attention(model, report)
    return patching.apply_rules(model, rules(), opts, report)


def _check_model_type(fn: str, model, model_types: tuple[str, ...]) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in model_types:
        raise ValueError(f"{fn}: expected a model with config.model_type in {model_types}, got {model_type!r}; "
                         "transformer_kernels.hf.apply_kernels(model) takes any model")


def apply_kernels_to_gpt2(model: nn.Module, **options) -> PatchReport:
    """:func:`apply_kernels` for a GPT-2 model (``config.model_type == "gpt2"``; ValueError otherwise):
    attention, ``ln_1``/``ln_2``/``ln_f`` and every ``GPT2MLP`` (``gelu_new`` needs the kernels'
    ``"gelu_tanh"``). ``options``: ``attention``, ``layer_norm``, ``ffn``."""
    _check_model_type("apply_kernels_to_gpt2", model, ("gpt2",))
    return apply_kernels(model, **options)


def apply_kernels_to_bert(model: nn.Module, **options) -> PatchReport:
    """:func:`apply_kernels` for a BERT or RoBERTa model (ValueError otherwise): attention, every
    LayerNorm and each layer's intermediate + output feed-forward block."""
    _check_model_type("apply_kernels_to_bert", model, ("bert", "roberta"))
    return apply_kernels(model, **options)


def apply_kernels_to_llama(model: nn.Module, **options) -> PatchReport:
    """:func:`apply_kernels` for a Llama-style model (llama, mistral, qwen2; ValueError otherwise):
    attention (GQA through ``enable_gqa``), every RMSNorm and every gated MLP."""
    _check_model_type("apply_kernels_to_llama", model, ("llama", "mistral", "qwen2"))
    return apply_kernels(model, **options)


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` itself was patched by :func:`transformer_kernels.patch` or :func:`apply_kernels`."""
    return original_class(module) is not None


def _register_quietly() -> None:
    with contextlib.suppress(Exception):  # never break the import of transformer_kernels or transformers
        register()


# See the module docstring: registered once transformers is imported, in either order.
call_when_imported("transformers", _register_quietly)
