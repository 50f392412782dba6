"""Drop the kernels into models you already have: :func:`patch`, :func:`unpatch` and :func:`override_sdpa`.

``patch(model)`` walks any ``nn.Module`` and, for each module it can prove equivalent, swaps the
module's *class* for a subclass whose ``forward`` runs our kernels:

=====================================  ==========================================================
original                               runs
=====================================  ==========================================================
``nn.LayerNorm`` (any config)           :func:`transformer_kernels.layer_norm` (the class becomes a
                                        :class:`transformer_kernels.LayerNorm` subclass)
``nn.RMSNorm``                          ``transformer_kernels.rms_norm``
``nn.Sequential(Linear, act,            :func:`transformer_kernels.ffn`, both products and the activation
[Dropout], Linear)``                    fused (act: ReLU, GELU, SiLU as the kernels support them)
``nn.MultiheadAttention``               torch's own ``F.multi_head_attention_forward`` with its
                                        scaled-dot-product step routed to
                                        :func:`transformer_kernels.scaled_dot_product_attention`
``nn.TransformerEncoderLayer`` /        the layer's non-fast path (so the patched children run)
``nn.TransformerDecoderLayer``          with its feed-forward block fused by :func:`transformer_kernels.ffn`
=====================================  ==========================================================

Swapping ``__class__`` keeps the instance's ``__dict__`` -- parameters, buffers, hooks, attributes --
untouched, so ``state_dict`` keys and tensors are identical after ``patch`` and after ``unpatch``,
optimizers keep their parameter references, and ``isinstance(m, nn.LayerNorm)`` still holds.
``unpatch`` sets each patched module's class back to the recorded original.

What "equivalent" means here, precisely: the patched forward computes the same function of the same
parameters, up to floating-point rounding (a fused kernel sums in a different order). Whatever a
kernel cannot reproduce exactly runs the original forward *at call time*, decided per call:

* dropout that would draw random numbers (``p > 0`` in training mode): our kernels would draw other
  numbers than torch, so the original forward runs and a patched model reproduces the unpatched
  model's outputs for the same seed, in training too;
* ``nn.MultiheadAttention(..., need_weights=True)`` (its default!): the weights come from torch;
* dtypes the kernels do not take (float64), nested tensors, children replaced or hooked after
  patching (a fused op would silently skip their hooks), tensors on different devices;
* under ``torch.autocast`` the kernels get their inputs cast exactly as autocast would cast them for
  the op they replace (the policy is read off torch itself, per device).

Modules the rules do not recognize, subclasses that override ``forward``, TorchScript modules and
unsupported activations are left alone, and the :class:`PatchReport` says why. One difference is
deliberate: attention rows whose keys are all masked give 0 where some torch backends give NaN.

``override_sdpa()`` is the lighter tool: inside it ``torch.nn.functional.scaled_dot_product_attention``
is ours, for any code that looks the function up on ``torch.nn.functional`` at call time.

The idea of patching an existing model's modules in place, keeping its weights, comes from
Liger-Kernel's ``apply_liger_kernel_to_*`` (github.com/linkedin/Liger-Kernel); unlike Liger we patch
instances, never library classes, and every patch can be undone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import sys
import threading
import types
from typing import Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import scaled_dot_product_attention
from .ffn import ACTIVATIONS as FFN_ACTIVATIONS
from .ffn import ffn
from .quantize import FP8Linear, fp8_scale
from .layer_norm import LayerNorm, RMSNorm, add_layer_norm, layer_norm, rms_norm

__all__ = ["PatchEntry", "PatchReport", "patch", "unpatch", "override_sdpa"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NO_KERNEL = "no kernel replaces this module type"

# torch's own SDPA, whatever ``torch.nn.functional.scaled_dot_product_attention`` is bound to later.
_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


# --------------------------------------------------------------------------------------------------
# Autocast: give a kernel the dtypes autocast would have given the op it replaces
# --------------------------------------------------------------------------------------------------
_POLICY_PROBES: dict[str, Callable[[torch.dtype, str], torch.Tensor]] = {
    "linear": lambda dt, dev: F.linear(torch.ones(1, 1, dtype=dt, device=dev), torch.ones(1, 1, dtype=dt, device=dev)),
    "layer_norm": lambda dt, dev: F.layer_norm(torch.ones(1, 2, dtype=dt, device=dev), (2,)),
    "rms_norm": lambda dt, dev: F.rms_norm(torch.ones(1, 2, dtype=dt, device=dev), (2,)),
    "sdpa": lambda dt, dev: _TORCH_SDPA(*(torch.ones(1, 1, 1, 2, dtype=dt, device=dev),) * 3),
}


@functools.lru_cache(maxsize=None)
def _autocast_policy(op: str, device_type: str, lower: torch.dtype) -> torch.dtype | None:
    """The dtype autocast (lower precision ``lower``) runs ``op`` in on ``device_type``, or None when
    autocast leaves ``op`` in its input's dtype. Read off torch by running the op once on a 1-element
    tensor, so it follows torch's per-device lists (layer_norm is an fp32 op on CUDA, not on CPU)."""
    with torch.no_grad():
        from_fp32 = _POLICY_PROBES[op](torch.float32, device_type).dtype
        from_lower = _POLICY_PROBES[op](lower, device_type).dtype
    if from_fp32 == lower:
        return lower
    if from_lower == torch.float32:
        return torch.float32
    return None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return False


def cast_like_autocast(op: str, device_type: str, *tensors):
    """``tensors`` cast as ``torch.autocast`` would cast the arguments of ``op`` ("linear", "layer_norm",
    "rms_norm", "sdpa"); unchanged outside autocast. Like autocast, casts only fp16/bf16/fp32 tensors."""
    if not _autocast_on(device_type):
        return tensors
    target = _autocast_policy(op, device_type, torch.get_autocast_dtype(device_type))
    if target is None:
        return tensors
    return tuple(t.to(target) if isinstance(t, torch.Tensor) and t.dtype in KERNEL_DTYPES else t for t in tensors)


def autocast_off(device_type: str):
    """A context that disables autocast on ``device_type`` around a kernel call (inputs already cast)."""
    return torch.autocast(device_type, enabled=False) if _autocast_on(device_type) else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Call-time guards shared by every patched forward
# --------------------------------------------------------------------------------------------------
def kernel_can_take(*tensors) -> bool:
    """True when the (non-None) tensors are all plain (not nested) tensors of one kernel dtype
    (fp16/bf16/fp32) on one device. When False, patched modules run their original forward."""
    present = [t for t in tensors if t is not None]
    if not present:
        return False
    first = present[0]
    return all(
        isinstance(t, torch.Tensor) and not t.is_nested and t.dtype == first.dtype and t.device == first.device
        for t in present
    ) and first.dtype in KERNEL_DTYPES


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward/backward (pre-)hooks, which a fused kernel would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def global_hooks() -> bool:
    """Whether module hooks are registered globally (``nn.modules.module.register_module_forward_hook``)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or getattr(m, "_global_backward_pre_hooks", None))


def plain_linear(module) -> bool:
    """An ``nn.Linear`` whose forward is ``nn.Linear.forward`` (parametrized weights are fine: they are
    read through ``.weight``), which has no hooks and whose weight is not a DTensor (tensor parallelism's
    sharded Linears keep their own forward)."""
    return (isinstance(module, nn.Linear) and type(module).forward in (nn.Linear.forward, FP8Linear.forward)
            and not has_hooks(module) and type(module.weight).__name__ != "DTensor")


def dropout_draws(module) -> bool:
    """Whether an ``nn.Dropout`` would draw random numbers now (training mode and p > 0)."""
    return module is not None and module.training and module.p > 0


# --------------------------------------------------------------------------------------------------
# Activations: which callables are which transformer_kernels.ffn activation
# --------------------------------------------------------------------------------------------------
# Extra recognizers (callable -> name or None); transformer_kernels.hf adds transformers' activation classes.
ACTIVATION_RECOGNIZERS: list[Callable[[object], Union[str, None]]] = []


def activation_name(act) -> str | None:
    """The ``transformer_kernels.ffn`` activation that computes exactly what ``act`` computes, or None.

    Recognizes ``F.relu``/``torch.relu``/``nn.ReLU`` ("relu"), ``F.gelu``/``nn.GELU()`` ("gelu", erf
    form), ``nn.GELU(approximate="tanh")``/``functools.partial(F.gelu, approximate="tanh")``
    ("gelu_tanh"), ``F.silu``/``nn.SiLU`` ("silu"), plus what :data:`ACTIVATION_RECOGNIZERS` adds.
    A module activation with hooks is not recognized (a fused kernel would skip them). Whether the
    ``transformer_kernels.ffn`` supports the name is a separate question (``transformer_kernels.ffn.ACTIVATIONS``).
    """
    if act is F.relu or act is torch.relu:
        return "relu"
    if act is F.gelu:
        return "gelu"
    if act is F.silu:
        return "silu"
    if isinstance(act, functools.partial) and act.func is F.gelu and not act.args:
        if set(act.keywords) <= {"approximate"}:
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.keywords.get("approximate", "none"))
        return None
    if isinstance(act, nn.Module):
        if has_hooks(act):
            return None
        forward = type(act).forward
        if forward is nn.ReLU.forward:
            return "relu"
        if forward is nn.SiLU.forward:
            return "silu"
        if forward is nn.GELU.forward:
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    for recognize in ACTIVATION_RECOGNIZERS:
        name = recognize(act)
        if name is not None:
            return name
    return None


def _describe_activation(act) -> str:
    if isinstance(act, nn.Module):
        return type(act).__name__
    return getattr(act, "__qualname__", None) or type(act).__name__


GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}


def fused_ffn(x, weight1, bias1, act, weight2, bias2, *, dropout=None, weight_gate=None, bias_gate=None,
              gated: bool = False, scales=(None, None, None)):
    """``act(x W1^T + b1) W2^T + b2`` (dropout between, if given) through :func:`transformer_kernels.ffn`, or None
    when that cannot reproduce the original exactly right now (the caller then runs its own code).

    Gated (``gated=True``, Llama's MLP): ``(act(x Wg^T + bg) * (x W1^T + b1)) W2^T + b2`` with
    ``weight_gate``/``bias_gate``. Weights are in ``nn.Linear`` layout (out, in), any strides (GPT-2's
    Conv1D passes ``weight.t()``). None is returned for: an activation the installed kernels lack,
    dropout that would draw random numbers, global module hooks, dtypes/devices the kernel does not
    take. The caller checks that the modules it fuses are plain and hook-free.

    ``scales``: ``(weight1_scale, weight2_scale, weight_gate_scale)`` of FP8 weights
    (:func:`transformer_kernels.quantize_fp8`): the call is then :func:`transformer_kernels.ffn`'s FP8 one,
    with x cast as autocast would and the biases in x's dtype.
    """
    name = activation_name(act)
    if gated and name is not None:
        name = GATED.get(name)
    if name is None or name not in FFN_ACTIVATIONS or dropout_draws(dropout) or global_hooks():
        return None
    if dropout is not None and has_hooks(dropout):
        return None
    extra_tensors = (weight_gate, bias_gate) if gated else ()
    if scales[0] is not None:  # FP8 weights
        (x,) = cast_like_autocast("linear", x.device.type, x)
        if x.dtype not in KERNEL_DTYPES or x.is_nested:
            return None
        bias1, bias2, bias_gate = (b if b is None else b.to(x.dtype) for b in (bias1, bias2, bias_gate))
        extra = {"weight_gate": weight_gate, "bias_gate": bias_gate, "weight_gate_scale": scales[2]} if gated else {}
        with autocast_off(x.device.type):
            return ffn(x, weight1, bias1, weight2, bias2, activation=name, weight1_scale=scales[0],
                       weight2_scale=scales[1], **extra)
    tensors = cast_like_autocast("linear", x.device.type, x, weight1, bias1, weight2, bias2, *extra_tensors)
    if not kernel_can_take(*tensors) or tensors[0].dim() < 1:
        return None
    extra = {"weight_gate": tensors[5], "bias_gate": tensors[6]} if gated else {}
    with autocast_off(x.device.type):
        return ffn(*tensors[:5], activation=name, **extra)


def fused_linear_ffn(x, linear1, act, linear2, dropout=None):
    """:func:`fused_ffn` for two ``nn.Linear`` (None unless both are plain and hook-free)."""
    if not (plain_linear(linear1) and plain_linear(linear2)):
        return None
    return fused_ffn(x, linear1.weight, linear1.bias, act, linear2.weight, linear2.bias, dropout=dropout,
                     scales=(fp8_scale(linear1), fp8_scale(linear2), None))


# --------------------------------------------------------------------------------------------------
# Scaled dot-product attention routed to ours, and the context manager
# --------------------------------------------------------------------------------------------------
def routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention``'s signature and semantics, running
    :func:`transformer_kernels.scaled_dot_product_attention` where that reproduces torch exactly.

    Runs torch's own SDPA instead when ``dropout_p > 0`` (the kernel would draw other random numbers
    than torch), for dtypes the kernel does not take (float64), nested tensors, and when query, key
    and value have different leading (batch) dims (torch broadcasts them; the kernel requires equal
    ones). Under ``torch.autocast`` the inputs are cast as autocast casts SDPA's. Fully-masked query
    rows give 0 (some torch backends: NaN).
    """
    device_type = query.device.type
    if type(query).__name__ == "DTensor" and dropout_p == 0:
        from .context_parallel.torch_interop import sequence_sharded

        if sequence_sharded(query):  # inside torch's context_parallel: our ring (with dropout: torch's ring)
            return scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                                scale=scale, enable_gqa=enable_gqa)
    q, k, v, mask = cast_like_autocast("sdpa", device_type, query, key, value, attn_mask)
    if dropout_p > 0 or not kernel_can_take(q, k, v) or not (q.shape[:-3] == k.shape[:-3] == v.shape[:-3]):
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    with autocast_off(device_type):
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                            scale=scale, enable_gqa=enable_gqa)


@functools.wraps(F.scaled_dot_product_attention)
def _routed_sdpa_named(*args, **kwargs):
    """:func:`routed_sdpa` under torch's name: wrappers that re-install a function by its ``__name__``
    (torch's ``context_parallel``) then put theirs back at ``F.scaled_dot_product_attention``."""
    return routed_sdpa(*args, **kwargs)


_override_lock = threading.Lock()
_override_depth = 0
_override_saved = None


@contextlib.contextmanager
def override_sdpa():
    """Inside this context, ``torch.nn.functional.scaled_dot_product_attention`` runs our kernel.

    Example::

        with transformer_kernels.override_sdpa():
            out = model(x)          # every F.scaled_dot_product_attention call inside runs ours

    Replaces the attribute on ``torch.nn.functional`` and restores the previous binding on exit, also
    when the body raises. Nestable (only the outermost exit restores) and usable as a decorator
    (``@transformer_kernels.override_sdpa()``). The replacement is :func:`routed_sdpa`: torch's semantics, torch's
    own SDPA where ours would differ (dropout_p > 0, nested tensors, broadcast batch dims).

    Scope: the binding is process-wide while the context is open (other threads see it too), and it
    reaches code that looks the function up at call time (``F.scaled_dot_product_attention(...)``,
    transformers' "sdpa" attention), not code that imported the function object earlier
    (``from torch.nn.functional import scaled_dot_product_attention`` at module import).
    """
    global _override_depth, _override_saved
    from .context_parallel.torch_interop import torch_cp_active

    if _override_depth == 0 and torch_cp_active():
        raise RuntimeError("override_sdpa: torch's context_parallel() is already active; enter "
                           "transformer_kernels.override_sdpa() first (outside it), so that torch wraps our attention, "
                           "else each rank would attend within its own shard only")
    with _override_lock:
        if _override_depth == 0:
            _override_saved = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _routed_sdpa_named
        _override_depth += 1
    try:
        yield
    finally:
        with _override_lock:
            _override_depth -= 1
            if _override_depth == 0:
                F.scaled_dot_product_attention = _override_saved
                _override_saved = None


def _check_key_padding_mask(key_padding_mask, src_len, bsz) -> None:
    """torch's ``F._check_key_padding_mask`` (same AssertionError and message) without the message
    closures over a tensor that ``torch.compile(fullgraph=True)`` cannot trace."""
    rows, cols = key_padding_mask.shape[0], key_padding_mask.shape[1]
    if rows != bsz:
        raise AssertionError(f"Expected key_padded_mask.shape[0] to be {bsz}, but got {rows}")
    if cols != src_len:
        raise AssertionError(f"Expected key_padded_mask.shape[1] to be {src_len}, but got {cols}")


def _with_sdpa_routed(fn):
    """A copy of torch function ``fn`` whose global ``scaled_dot_product_attention`` is :func:`routed_sdpa`
    (same code, defaults and other globals), or None if ``fn`` does not call it by that global name.
    This leaves ``torch.nn.functional`` itself untouched, so it is thread-safe.

    The copy's globals are those of a module registered as ``transformer_kernels._routed_<module>`` in
    ``sys.modules`` (torch.compile guards on a function's globals through its module's name)."""
    if "scaled_dot_product_attention" not in fn.__code__.co_names:
        return None
    name = f"{__package__}._routed_{fn.__module__.replace('.', '_')}"
    module = sys.modules.get(name) or types.ModuleType(name)
    module.__dict__.update({k: v for k, v in fn.__globals__.items() if not k.startswith("__")})
    module.__dict__["__builtins__"] = fn.__globals__["__builtins__"]
    module.__dict__["scaled_dot_product_attention"] = routed_sdpa
    if "_check_key_padding_mask" in module.__dict__:
        module.__dict__["_check_key_padding_mask"] = _check_key_padding_mask
    sys.modules[name] = module
    clone = types.FunctionType(fn.__code__, module.__dict__, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    return clone


_MHA_FORWARD = _with_sdpa_routed(F.multi_head_attention_forward)


# --------------------------------------------------------------------------------------------------
# The patched forwards (mixins; the patched class is ``type(name, (mixin, original), ...)``)
# --------------------------------------------------------------------------------------------------
class _LayerNormMixin(LayerNorm):
    """``nn.LayerNorm`` on :func:`transformer_kernels.layer_norm`; a :class:`transformer_kernels.LayerNorm` subclass, so its extra
    arguments (fused Add & Norm: ``residual``, ``dropout_p``, ``prenorm``) work as on transformer_kernels.LayerNorm."""

    def forward(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:  # the transformer_kernels.LayerNorm extensions; an nn.LayerNorm is never called with them
            return LayerNorm.forward(self, input, *args, **kwargs)
        x, weight, bias = cast_like_autocast("layer_norm", input.device.type, input, self.weight, self.bias)
        # weight and bias may have another float dtype than the input (as F.layer_norm's mixed types)
        if not (kernel_can_take(x) and all(t is None or (t.device == x.device and t.dtype in KERNEL_DTYPES)
                                           for t in (weight, bias))):
            return self._kernels_original_class.forward(self, input)
        with autocast_off(x.device.type):
            return layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def add_and_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``norm(x + residual)``: one fused Add & Norm kernel (``transformer_kernels.add_layer_norm``) when ``norm`` is a
    LayerNorm patched by :func:`patch` without hooks, ``x`` and ``residual`` have one shape and kernel
    dtype, and autocast is off; otherwise exactly that expression. (The kernel adds in fp32 before
    normalizing; torch rounds the sum to the input dtype first: equal in fp32, up to rounding in half.)"""
    params_ok = all(t is None or (t.device == x.device and t.dtype in KERNEL_DTYPES) for t in (norm.weight, norm.bias))
    if (not isinstance(norm, _LayerNormMixin) or has_hooks(norm) or global_hooks() or not params_ok
            or _autocast_on(x.device.type) or x.shape != residual.shape or not kernel_can_take(x, residual)):
        return norm(x + residual)
    return add_layer_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class _RMSNormMixin:
    """``nn.RMSNorm`` on ``transformer_kernels.rms_norm`` (same weight and eps, eps=None meaning finfo.eps); extra
    arguments go to ``transformer_kernels.RMSNorm.forward`` (fused Add & Norm), as for the LayerNorm."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            return super().forward(x, *args, **kwargs)
        x2, weight = cast_like_autocast("rms_norm", x.device.type, x, self.weight)
        if not kernel_can_take(x2, weight):
            return self._kernels_original_class.forward(self, x)
        with autocast_off(x.device.type):
            return rms_norm(x2, self.normalized_shape, weight, self.eps)


class _KernelsRMSNormMixin(_RMSNormMixin, RMSNorm):
    """A patched ``nn.RMSNorm`` is also a :class:`transformer_kernels.RMSNorm`."""


def _canonical_masks(key_padding_mask, attn_mask, dtype, names):
    """Both masks as torch's MultiheadAttention and TransformerEncoderLayer convert them (bool to an
    additive float mask of ``dtype``, the pair checked for matching types), named in errors by ``names``."""
    padding_name, mask_name = names
    # Under torch.compile, torch's deprecation warning for a bool/float pair is skipped: dynamo cannot
    # trace warnings.warn (the conversion is the same).
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name=padding_name, other_type=F._none_or_dtype(attn_mask),
        other_name=mask_name, target_type=dtype, check_other=not torch.compiler.is_compiling())
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name=mask_name, other_type=None, other_name="", target_type=dtype, check_other=False)
    return key_padding_mask, attn_mask


class _MultiheadAttentionMixin:
    """``nn.MultiheadAttention`` whose attention step runs :func:`routed_sdpa`.

    Restates the non-fast path of ``nn.MultiheadAttention.forward`` (mask canonicalization, the
    batch_first transposes that keep ``query is key`` identities) and calls torch's own
    ``F.multi_head_attention_forward`` with only its SDPA call rerouted, so every option torch supports
    (kdim/vdim, add_bias_kv, add_zero_attn, key_padding_mask, 2-D/3-D masks, the is_causal hint,
    unbatched input) is handled by torch's code. Runs the original forward for ``need_weights=True``,
    for dropout in training mode and for nested tensors.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if (need_weights or (self.training and self.dropout > 0)
                or query.is_nested or key.is_nested or value.is_nested):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        is_batched = query.dim() == 3
        key_padding_mask, attn_mask = _canonical_masks(key_padding_mask, attn_mask, query.dtype,
                                                       ("key_padding_mask", "attn_mask"))
        if self.batch_first and is_batched:  # as torch: keep `query is key is value` for the packed projection
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, _ = _MHA_FORWARD(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=False, attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim, q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(1, 0) if self.batch_first and is_batched else out), None


class _FeedForwardBlockMixin:
    """``_ff_block`` of ``nn.TransformerEncoderLayer``/``DecoderLayer`` (``linear1 -> activation ->
    dropout -> linear2``, then the layer's last dropout) with the first four fused by transformer_kernels.ffn."""

    _kernels_fuse_ffn = True
    _kernels_ff_dropout = "dropout2"  # the dropout after the block: dropout2 (encoder), dropout3 (decoder)

    def _fp8_linears(self):  # transformer_kernels.quantize_fp8
        return (self.linear1, self.linear2) if self._kernels_fuse_ffn else None

    def _ff_block(self, x):
        y = None
        if self._kernels_fuse_ffn:
            y = fused_linear_ffn(x, self.linear1, self.activation, self.linear2, self.dropout)
        if y is None:
            return super()._ff_block(x)
        return getattr(self, self._kernels_ff_dropout)(y)


class _EncoderLayerMixin(_FeedForwardBlockMixin):
    """``nn.TransformerEncoderLayer`` always on its non-fast path, so its (patched) children run.

    torch's fast path (``torch._transformer_encoder_layer_fwd``, taken in inference) computes the
    same function natively; bypassing it is what lets the kernels run. Nested-tensor input (from
    ``nn.TransformerEncoder``'s padding fast path) only works on that path: it runs the original.
    """

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if src.is_nested:
            return super().forward(src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                                   is_causal=is_causal)
        src_key_padding_mask, src_mask = _canonical_masks(src_key_padding_mask, src_mask, src.dtype,
                                                          ("src_key_padding_mask", "src_mask"))
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class _DecoderLayerMixin(_FeedForwardBlockMixin):
    """``nn.TransformerDecoderLayer`` with its feed-forward block fused (it has no fast path)."""

    _kernels_ff_dropout = "dropout3"


class _SequentialMLPMixin:
    """``nn.Sequential(Linear, activation, [Dropout], Linear, [Dropout])`` as one :func:`transformer_kernels.ffn` call."""

    def forward(self, input):
        parts = mlp_parts(self)
        y = None
        if parts is not None and not (parts[4] is not None and (dropout_draws(parts[4]) or has_hooks(parts[4]))):
            y = fused_linear_ffn(input, parts[0], parts[1], parts[3], parts[2])
        return super().forward(input) if y is None else y

    def _fp8_linears(self):  # transformer_kernels.quantize_fp8
        parts = mlp_parts(self)
        return None if parts is None else (parts[0], parts[3])


def mlp_parts(seq: nn.Sequential):
    """``(linear1, activation, dropout_or_None, linear2, dropout_after_or_None)`` if ``seq`` is exactly
    Linear-act-[Dropout]-Linear-[Dropout] with matching widths (the last form is torchvision's
    ``MLPBlock`` of its ViT), else None."""
    mods = list(seq)
    after = None
    if len(mods) >= 4 and type(mods[-1]).forward is nn.Dropout.forward:
        after, mods = mods[-1], mods[:-1]
    if len(mods) not in (3, 4):
        return None
    linear1, act, linear2 = mods[0], mods[1], mods[-1]
    dropout = mods[2] if len(mods) == 4 else None
    if not (plain_linear(linear1) and plain_linear(linear2) and activation_name(act) is not None):
        return None
    if dropout is not None and type(dropout).forward is not nn.Dropout.forward:
        return None
    if linear1.out_features != linear2.in_features:
        return None
    return linear1, act, dropout, linear2, after


# --------------------------------------------------------------------------------------------------
# Patched classes: built once per (original class, mixin), remembering the original
# --------------------------------------------------------------------------------------------------
_CLASSES: dict[tuple, type] = {}


def _reduce_patched(self, protocol):
    """Pickle (and deepcopy) support of a patched module: its class is made at run time, so it is
    stored as the recipe :func:`_rebuild_patched` follows, then the module's state."""
    return _rebuild_patched, type(self)._kernels_key, self.__getstate__()


def _rebuild_patched(original: type, mixin: type, attrs: tuple) -> nn.Module:
    """An empty instance of ``patched_class(original, mixin, **attrs)``, for unpickling."""
    cls = patched_class(original, mixin, **dict(attrs))
    return cls.__new__(cls)


def patched_class(original: type, mixin: type, **attrs) -> type:
    """The class ``Kernels<Original>(mixin, original)`` with ``_kernels_original_class = original`` and
    ``attrs`` as class attributes; cached, so every module of one type shares one patched class.
    A patched module pickles as "rebuild ``patched_class(original, mixin, **attrs)``, then restore the
    state" (:func:`_reduce_patched`), so ``torch.save(model)`` loads in another process wherever the
    original class and the mixin import (every torch.nn and transformers class patch knows). Classes for
    torch.nn's own types are also module globals, importable by name."""
    key = (original, mixin, tuple(sorted(attrs.items())))
    if key not in _CLASSES:
        name = "Kernels" + original.__name__ + "".join(f"_{k.removeprefix('_kernels_')}_{v}" for k, v in key[2])
        namespace = {"_kernels_original_class": original, "_kernels_key": key, "__module__": __name__,
                     "__qualname__": name, "__reduce_ex__": _reduce_patched, **attrs}
        bases = (mixin,) if issubclass(mixin, original) else (mixin, original)
        cls = type(name, bases, namespace)
        if original.__module__.startswith("torch.nn.") and name not in globals():
            globals()[name] = cls  # importable as transformer_kernels.patching.<name>: patched models pickle
        _CLASSES[key] = cls
    return _CLASSES[key]


def original_class(module: nn.Module) -> type | None:
    """The class ``patch`` replaced for ``module``, or None if ``module`` is not patched."""
    return type(module).__dict__.get("_kernels_original_class")


# --------------------------------------------------------------------------------------------------
# Rules: each looks at one module and decides Replace, Leave (with a reason) or None (not its kind)
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Options:
    """What to patch: ``attention`` (MHA, attention implementations), ``layer_norm`` (LayerNorm,
    RMSNorm), ``ffn`` (MLPs and the layers' feed-forward blocks)."""

    attention: bool = True
    layer_norm: bool = True
    ffn: bool = True


@dataclasses.dataclass(frozen=True)
class Replace:
    """A rule's decision to patch: the module's class becomes ``patched_class(type(module), mixin, **attrs)``."""

    mixin: type
    reason: str
    covers: tuple[str, ...] = ()  # children whose forward the replacement runs itself (not reported)
    attrs: tuple[tuple[str, object], ...] = ()


@dataclasses.dataclass(frozen=True)
class Leave:
    """A rule's decision to leave a module it recognized alone, and why (shown in the report)."""

    reason: str


Rule = Callable[[nn.Module, Options], Union[Replace, Leave, None]]


def _overrides(module, base: type, *methods: str) -> str | None:
    """The first of ``methods`` that ``type(module)`` overrides relative to ``base``, or None."""
    for name in methods:
        if getattr(type(module), name) is not getattr(base, name):
            return name
    return None


def _layer_norm_rule(m, opts: Options):
    if not isinstance(m, nn.LayerNorm):
        return None
    if type(m).forward is LayerNorm.forward:
        return Leave("already a transformer_kernels.LayerNorm")
    if type(m).forward is not nn.LayerNorm.forward:
        return Leave(f"{type(m).__name__} overrides nn.LayerNorm.forward: equivalence cannot be proven")
    if not opts.layer_norm:
        return Leave("layer_norm=False")
    if not m.eps > 0:
        return Leave(f"eps={m.eps}: transformer_kernels.layer_norm needs eps > 0")
    return Replace(_LayerNormMixin, "transformer_kernels.layer_norm with the same weight, bias and eps")


def _rms_norm_rule(m, opts: Options):
    if not isinstance(m, nn.RMSNorm):
        return None
    if _overrides(m, nn.RMSNorm, "forward"):
        return Leave(f"{type(m).__name__} overrides nn.RMSNorm.forward: equivalence cannot be proven")
    if not opts.layer_norm:
        return Leave("layer_norm=False")
    return Replace(_KernelsRMSNormMixin, "transformer_kernels.rms_norm with the same weight and eps")


def _mha_rule(m, opts: Options):
    if not isinstance(m, nn.MultiheadAttention):
        return None
    overridden = _overrides(m, nn.MultiheadAttention, "forward")
    if overridden:
        return Leave(f"{type(m).__name__} overrides nn.MultiheadAttention.forward: equivalence cannot be proven")
    if not opts.attention:
        return Leave("attention=False")
    if _MHA_FORWARD is None:
        return Leave("this torch's F.multi_head_attention_forward does not call scaled_dot_product_attention")
    notes = ["attention by transformer_kernels.scaled_dot_product_attention inside torch's multi_head_attention_forward",
             "calls with need_weights=True (the default of nn.MultiheadAttention) run the original forward"]
    if m.dropout > 0:
        notes.append(f"dropout={m.dropout}: in training mode the original forward runs")
    return Replace(_MultiheadAttentionMixin, "; ".join(notes), covers=("out_proj",))


def _ffn_note(m) -> tuple[str, tuple[str, ...], bool]:
    """(reason, covered children, fuses) for a Transformer layer's feed-forward block."""
    name = activation_name(m.activation)
    if name is None:
        return f"feed-forward block unfused: activation {_describe_activation(m.activation)} has no kernel", (), False
    if name not in FFN_ACTIVATIONS:
        return f"feed-forward block unfused: the installed transformer_kernels.ffn has no {name!r}", (), False
    if not (plain_linear(m.linear1) and plain_linear(m.linear2)):
        return "feed-forward block unfused: linear1/linear2 are not plain nn.Linear (or have hooks)", (), False
    covers = ("linear1", "dropout", "linear2") + (("activation",) if isinstance(m.activation, nn.Module) else ())
    note = f"feed-forward block fused by transformer_kernels.ffn({name!r})"
    if m.dropout.p > 0:
        note += f"; dropout={m.dropout.p}: in training mode the block runs unfused"
    return note, covers, True


def _transformer_layer_rule(m, opts: Options):
    if isinstance(m, nn.TransformerEncoderLayer):
        base, mixin, methods = nn.TransformerEncoderLayer, _EncoderLayerMixin, ("forward", "_sa_block", "_ff_block")
    elif isinstance(m, nn.TransformerDecoderLayer):
        base, mixin, methods = nn.TransformerDecoderLayer, _DecoderLayerMixin, ("_ff_block",)
    else:
        return None
    overridden = _overrides(m, base, *methods)
    if overridden:
        return Leave(f"{type(m).__name__} overrides {base.__name__}.{overridden}: equivalence cannot be proven")
    note, covers, fuses = _ffn_note(m)
    if not opts.ffn:
        note, covers, fuses = "ffn=False: feed-forward block unfused", (), False
    notes = ["runs its non-fast path, so its patched children run"] if base is nn.TransformerEncoderLayer else []
    if base is nn.TransformerDecoderLayer and not fuses:
        return Leave(note)
    if not (fuses or opts.attention or opts.layer_norm):
        return Leave("attention, layer_norm and ffn are all False")
    return Replace(mixin, "; ".join(notes + [note]), covers, () if fuses else (("_kernels_fuse_ffn", False),))


def _sequential_rule(m, opts: Options):
    if not isinstance(m, nn.Sequential) or type(m).forward is not nn.Sequential.forward:
        return None
    parts = mlp_parts(m)
    if parts is None:
        return _near_miss_mlp(m)
    linear1, act, dropout, linear2, after = parts
    name = activation_name(act)
    if not opts.ffn:
        return Leave("ffn=False")
    if name not in FFN_ACTIVATIONS:
        return Leave(f"Linear-{type(act).__name__}-Linear MLP: the installed transformer_kernels.ffn has no {name!r}")
    note = f"transformer_kernels.ffn({name!r}) with the same weights"
    drop_p = max((d.p for d in (dropout, after) if d is not None), default=0.0)
    if drop_p > 0:
        note += f"; Dropout(p={drop_p}): in training mode the original forward runs"
    return Replace(_SequentialMLPMixin, note, tuple(str(i) for i in range(len(m))))


def _near_miss_mlp(seq: nn.Sequential):
    """A Sequential with a Linear followed by a module activation that is not exactly an MLP we fuse."""
    mods = list(seq)
    for first, second in zip(mods, mods[1:]):
        if isinstance(first, nn.Linear) and not isinstance(second, (nn.Linear, nn.Dropout)) and \
                type(second).__module__.startswith("torch.nn.modules.activation"):
            if activation_name(second) is None:
                return Leave(f"Linear followed by {type(second).__name__}: no kernel for that activation")
            return Leave("not exactly Linear-activation-[Dropout]-Linear (length, widths, types or hooks differ)")
    return None


def _encoder_fast_path_rule(m, opts: Options):
    """``nn.TransformerEncoder(enable_nested_tensor=True)``: its padding fast path is said in the report."""
    if not isinstance(m, nn.TransformerEncoder) or not getattr(m, "use_nested_tensor", False):
        return None
    return Leave("enable_nested_tensor=True: in eval under no_grad with a src_key_padding_mask, torch packs the "
                 "input into a nested tensor and its layers run torch's own fast path, none of our kernels "
                 "(construct it with enable_nested_tensor=False to run ours there)")


def _torchscript_rule(m, opts: Options):
    if isinstance(m, torch.jit.ScriptModule):
        return Leave("TorchScript module: its compiled code does not call Python forwards")
    return None


TORCH_RULES: tuple[Rule, ...] = (_torchscript_rule, _layer_norm_rule, _rms_norm_rule, _mha_rule,
                                 _transformer_layer_rule, _encoder_fast_path_rule, _sequential_rule)


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
def type_name(cls: type) -> str:
    """``nn.LayerNorm`` for torch.nn classes, ``transformers.GPT2MLP`` for transformers', else module.qualname."""
    module = cls.__module__
    if module.startswith("torch.nn."):
        return f"nn.{cls.__qualname__}"
    if module.startswith("transformers."):
        return f"transformers.{cls.__qualname__}"
    return f"{module}.{cls.__qualname__}"


@dataclasses.dataclass(frozen=True)
class PatchEntry:
    """One module in a :class:`PatchReport`.

    Attributes:
        path: the module's name in ``model.named_modules()`` ("" for the model itself).
        original: its class before patching (e.g. ``"nn.LayerNorm"``).
        replacement: the patched class's name, or None when the module was left alone.
        reason: what the replacement runs and when it falls back, or why the module was left alone.
    """

    path: str
    original: str
    replacement: str | None
    reason: str


class PatchReport:
    """What :func:`patch` (or :func:`transformer_kernels.hf.apply_kernels`) replaced and what it left alone, and why.

    Attributes:
        model: the patched model (a copy when ``inplace=False``).
        replaced: :class:`PatchEntry` list, one per patched module (or attention implementation).
        left_alone: :class:`PatchEntry` list for every other module examined; those of types no rule
            knows have ``reason == NO_KERNEL`` and are summarized by type in ``str(report)``.
    """

    def __init__(self, model: nn.Module, source: str = "transformer_kernels.patch"):
        self.model = model
        self.source = source
        self.replaced: list[PatchEntry] = []
        self.left_alone: list[PatchEntry] = []

    def __repr__(self) -> str:
        return f"<PatchReport: {len(self.replaced)} replaced, {len(self.left_alone)} left alone>"

    def __str__(self) -> str:
        show = lambda p: p or "(model)"  # noqa: E731
        lines = [f"{self.source}: replaced {len(self.replaced)} module(s), left {len(self.left_alone)} alone"]
        if self.replaced:
            lines.append("replaced:")
            lines += [f"  {show(e.path)}: {e.original} -> {e.replacement}: {e.reason}" for e in self.replaced]
        specific = [e for e in self.left_alone if e.reason != NO_KERNEL]
        if specific:
            lines.append("left alone:")
            lines += [f"  {show(e.path)}: {e.original}: {e.reason}" for e in specific]
        generic = [e.original for e in self.left_alone if e.reason == NO_KERNEL]
        if generic:
            counts = sorted({n: generic.count(n) for n in generic}.items())
            lines.append(f"left alone, {NO_KERNEL}: " + ", ".join(f"{n} x{c}" for n, c in counts))
        return "\n".join(lines)

    def paths(self, which: str = "replaced") -> list[str]:
        """Module paths in ``replaced`` or ``left_alone``."""
        return [e.path for e in getattr(self, which)]


# --------------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------------
def apply_rules(model: nn.Module, rules, opts: Options, report: PatchReport) -> PatchReport:
    """Walk ``model.named_modules()`` once, applying the first rule with an opinion on each module."""
    covered: set[str] = set()
    for path, module in model.named_modules():
        if path in covered:
            continue
        if original_class(module) is not None:
            report.left_alone.append(PatchEntry(path, type_name(original_class(module)), None, "already patched"))
            continue
        decision = next((d for d in (rule(module, opts) for rule in rules) if d is not None), None)
        if isinstance(decision, Replace):
            cls = patched_class(type(module), decision.mixin, **dict(decision.attrs))
            original = type(module)
            module.__class__ = cls
            report.replaced.append(PatchEntry(path, type_name(original), cls.__qualname__, decision.reason))
            covered.update(f"{path}.{c}" if path else c for c in decision.covers)
        else:
            reason = decision.reason if isinstance(decision, Leave) else NO_KERNEL
            report.left_alone.append(PatchEntry(path, type_name(type(module)), None, reason))
    return report


def patch(model: nn.Module, *, attention: bool = True, layer_norm: bool = True, ffn: bool = True,
          inplace: bool = True) -> PatchReport:
    """Swap in our kernels wherever ``model`` provably computes the same thing with them.

    See the module docstring for what is replaced, what falls back at call time, and the exact
    meaning of "equivalent". Parameters, buffers and ``state_dict`` are untouched (the modules' classes
    change, nothing else); patching twice changes nothing more; :func:`unpatch` undoes it.

    Args:
        model: any ``nn.Module``; modules are visited in ``model.named_modules()`` order.
        attention: patch ``nn.MultiheadAttention`` (also inside Transformer layers).
        layer_norm: patch ``nn.LayerNorm`` and ``nn.RMSNorm``.
        ffn: fuse Linear-activation-Linear MLPs and the Transformer layers' feed-forward blocks.
        inplace: patch ``model`` itself (default) or a deep copy of it (``report.model``).

    Returns:
        A :class:`PatchReport`; ``print(report)`` lists every replaced module and every module left
        alone with the reason.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    opts = Options(attention=attention, layer_norm=layer_norm, ffn=ffn)
    return apply_rules(model, TORCH_RULES, opts, PatchReport(model))


# Functions run by unpatch(model) after the classes are restored (transformer_kernels.hf restores the attention
# implementation); each returns the descriptions of what it restored.
UNPATCH_HOOKS: list[Callable[[nn.Module], list[str]]] = []


def unpatch(model: nn.Module) -> list[str]:
    """Undo :func:`patch` (and :func:`transformer_kernels.hf.apply_kernels`): every patched module gets its original
    class back; nothing else about it changed, so ``state_dict`` is identical to before patching.

    Returns:
        The paths of the restored modules (plus, for Hugging Face models, a line for the restored
        attention implementation). Unpatched models give ``[]``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    restored = []
    for path, module in model.named_modules():
        original = original_class(module)
        if original is not None:
            module.__class__ = original
            restored.append(path)
    for hook in UNPATCH_HOOKS:
        restored += hook(model)
    return restored


# The patched classes of torch.nn's own types exist from import on, so that pickle finds them as
# transformer_kernels.patching.<name> when a saved patched model is loaded in a fresh process.
for _original, _mixin, _attrs in (
    (nn.LayerNorm, _LayerNormMixin, {}),
    (nn.MultiheadAttention, _MultiheadAttentionMixin, {}),
    (nn.TransformerEncoderLayer, _EncoderLayerMixin, {}),
    (nn.TransformerEncoderLayer, _EncoderLayerMixin, {"_kernels_fuse_ffn": False}),
    (nn.TransformerDecoderLayer, _DecoderLayerMixin, {}),
    (nn.Sequential, _SequentialMLPMixin, {}),
    (nn.RMSNorm, _KernelsRMSNormMixin, {}),
):
    patched_class(_original, _mixin, **_attrs)
del _original, _mixin, _attrs
