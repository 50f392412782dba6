"""FP8 inference in one call: :func:`quantize_fp8` turns a model's feed-forward weights into e4m3.

What it does to each FFN it finds (this library's :class:`~transformer_kernels.FFN` and
:class:`~transformer_kernels.GatedFFN`, and every MLP or Transformer layer that
:func:`transformer_kernels.patch` / :func:`transformer_kernels.hf.patch` fused): each ``nn.Linear`` of the
block becomes an :class:`FP8Linear` in place -- its ``weight`` an e4m3 tensor, a float32
``weight_scale`` buffer per output channel beside it, the same module object, hooks and bias. The
fused forward then passes the scales to :func:`transformer_kernels.ffn`, which runs both products on FP8
tensor cores (:mod:`transformer_kernels.ffn_fp8`); where a patched block runs its original code instead
(hooks, training-mode dropout), each ``FP8Linear`` runs its own FP8 GEMM, so every path stays FP8.
The state_dict keys are those of vLLM's and compressed-tensors' per-channel FP8 checkpoints
(``weight`` e4m3, ``weight_scale``), with ``weight_scale`` of shape (out,).

What it leaves alone, and says so in the report: GPT-2's ``Conv1D`` MLPs (weights stored transposed),
attention projections, embeddings and heads. KV caches (``kv_cache=True``): this repository's models
allocate e4m3 caches; :func:`transformer_kernels.flash_attn_with_kvcache` decodes from any e4m3 cache
(``k_descale`` / ``v_descale``), but a Hugging Face model's ``Cache`` object is transformers' own.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .attention.fp8 import FP8_DTYPE
from .ffn_fp8 import linear_fp8, quantize_rows


class FP8Linear(nn.Linear):
    """``nn.Linear`` with an e4m3 ``weight`` (out, in), requires_grad False, and a float32 ``weight_scale``
    buffer (out,): ``W = weight.float() * weight_scale[:, None]``. ``forward`` is
    :func:`transformer_kernels.ffn_fp8.linear_fp8` (per-token dynamic activation quantization, FP8
    tensor cores). Made by :meth:`quantize_` from an ``nn.Linear``, in place. Inference only."""

    weight_scale: torch.Tensor

    @classmethod
    def quantize_(cls, linear: nn.Linear) -> "FP8Linear":
        """``linear`` itself, its class set to FP8Linear and its weight quantized per output channel
        (:func:`transformer_kernels.ffn_fp8.quantize_rows`); its bias stays (frozen, requires_grad
        False). Raises ``TypeError`` for anything but a plain ``nn.Linear`` with a floating weight."""
        if type(linear) is cls:
            return linear
        if type(linear) is not nn.Linear or not linear.weight.is_floating_point() or linear.weight.dtype == FP8_DTYPE:
            raise TypeError(f"FP8Linear.quantize_: expected a plain nn.Linear with a floating weight, got "
                            f"{type(linear).__name__}")
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.register_buffer("weight_scale", scale)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        linear.__class__ = cls
        return linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.bias is None or self.bias.dtype == input.dtype else self.bias.to(input.dtype)
        return linear_fp8(input, self.weight, self.weight_scale, bias)


def fp8_scale(linear) -> torch.Tensor | None:
    """The per-output-channel scale of an :class:`FP8Linear`, None for any other module."""
    return linear.weight_scale if isinstance(linear, FP8Linear) else None


@dataclasses.dataclass
class QuantizeReport:
    """What :func:`quantize_fp8` did: ``quantized`` the FFN blocks whose Linears are now FP8 (module
    paths), ``skipped`` the blocks it recognized but left alone, with why, ``kv_cache_models`` the models
    that now decode from e4m3 caches."""
    quantized: list[str]
    skipped: dict[str, str]
    kv_cache_models: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"FP8: {len(self.quantized)} feed-forward blocks quantized"]
        lines += [f"  {p}" for p in self.quantized]
        lines += [f"  left alone {p}: {why}" for p, why in self.skipped.items()]
        lines += [f"FP8 KV cache: {p}" for p in self.kv_cache_models]
        return "\n".join(lines)


def quantize_fp8(model: nn.Module, *, kv_cache: bool = False) -> QuantizeReport:
    """Quantize, in place, the weights of every feed-forward block of ``model`` that runs on
    :func:`transformer_kernels.ffn` to e4m3 with per-output-channel scales (module docstring).

    Call it after :func:`transformer_kernels.patch` (or ``transformer_kernels.hf.patch``) on a model in
    the dtype it will run in (bfloat16 or float16); the model is for inference from then on (run it
    under ``torch.no_grad()`` / ``torch.inference_mode()``; the quantized weights cannot train).
    Accuracy: README, "FP8 feed-forward".

    ``kv_cache=True``: models that declare ``supports_fp8_kv_cache`` (this repository's ``Transformer``
    and ``TransformerLM``) allocate their decoding caches in e4m3 from then on, read by
    :func:`transformer_kernels.flash_attn_with_kvcache`'s FP8 path (``transformer.layers.KVCache.fp8``
    says how their descales are chosen). Other models' caches are their own (a Hugging Face ``Cache``
    object): ``kv_cache_models`` stays empty for them.

    Returns a :class:`QuantizeReport`. Raises ``TypeError`` if ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_fp8: model must be a torch.nn.Module, got {type(model).__name__}")
    report = QuantizeReport([], {}, [])
    for path, module in model.named_modules():
        if kv_cache and getattr(type(module), "supports_fp8_kv_cache", False):
            module.kv_cache_fp8 = True
            report.kv_cache_models.append(path or "(model)")
        find = getattr(module, "_fp8_linears", None)
        if find is None:
            continue
        linears = find()
        if linears is None:
            report.skipped[path or "(model)"] = getattr(module, "_fp8_skip_reason", "not a fused Linear block")
            continue
        for linear in linears:
            FP8Linear.quantize_(linear)
        report.quantized.append(path or "(model)")
    return report
