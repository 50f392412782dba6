"""Hugging Face ``transformers`` integration: our attention, norms and MLPs in GPT-2, BERT and Llama-style models.

Two pieces, both reversible with :func:`kernels.unpatch`:

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
* **Norms and MLPs** are swapped per instance, as :func:`kernels.patch` does (the class becomes a
  subclass whose forward runs our kernels; parameters and ``state_dict`` keys stay): ``LlamaRMSNorm``
  -> ``kernels.rms_norm``; ``LlamaMLP`` (gate/up/down) -> gated ``kernels.ffn``; ``GPT2MLP`` (Conv1D,
  ``gelu_new``) -> ``kernels.ffn`` on the transposed Conv1D weights; ``GPTNeoXMLP`` -> ``kernels.ffn``;
  ``Phi3MLP`` (one fused ``gate_up_proj``) -> gated ``kernels.ffn`` on its two row halves; ``CLIPMLP``
  (``quick_gelu``) -> ``kernels.ffn``; T5's ``T5LayerNorm`` -> ``kernels.rms_norm`` and
  ``T5DenseActDense`` / ``T5DenseGatedActDense`` -> ``kernels.ffn``; ``BertIntermediate`` +
  ``BertOutput`` -> one ``kernels.ffn`` (patched on ``BertLayer.feed_forward_chunk``); BERT's
  ``LayerNorm(dropout(h) + x)`` -> the fused Add & Norm ``kernels.add_layer_norm``; every
  ``nn.LayerNorm`` -> ``kernels.layer_norm``.

A module is recognized by *code*, not by name: its forward must be the very code of the reference
class above (same bytecode, constants, and the same objects behind the globals it reads), so
"Copied from" siblings (Mistral's and Qwen2's RMSNorm/MLP, RoBERTa's layers, Gemma's MLP) are patched
too, while a look-alike with different math is left alone and reported. Gemma's RMSNorm (``1 + weight``,
all in fp32; Gemma 1-3) has a rule of its own.

The entry points follow Liger-Kernel's ``apply_liger_kernel_to_llama`` etc. (github.com/linkedin/
Liger-Kernel), but patch the given model instance only, never transformers' classes.

The attention is registered (:func:`register`) as soon as both ``kernels`` and ``transformers`` are
imported, in either order (``import kernels`` does not import transformers: a hook registers right after
transformers' own import), so ``from_pretrained(..., attn_implementation="kernels_sdpa")`` needs no
call, and a pickled patched model finds it registered when it loads. ``import kernels.hf`` also works
without transformers; the functions then raise ``ImportError``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import patching
from .attention import scaled_dot_product_attention
from .patching import (
    Leave,
    Options,
    PatchEntry,
    PatchReport,
    Replace,
    activation_name,
    fused_ffn,
    has_hooks,
    kernel_can_take,
    original_class,
    plain_linear,
)

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
]

ATTENTION_NAME = "kernels_sdpa"
"""The ``attn_implementation`` name of our attention. It contains "sdpa" on purpose: transformers then
accepts it only for models that declare SDPA support (``_supports_sdpa``), whose semantics we mirror."""

FLASH_ATTENTION_NAME = "kernels_flash_attention_2"
"""The ``attn_implementation`` name of our flash-attention-style attention (:func:`flash_attention_forward`):
no 4-D masks, padding-free and packed batches, and the paged KV cache of transformers' continuous
batching (``generate_batch``), which accepts only 'sdpa', 'paged|eager' and names holding "flash", and
takes its block-table decode path only for names matching flash-attention 2 or 3 (on CUDA). Our functions
have flash-attention 2's signatures."""


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("kernels.hf needs the `transformers` package (pip install transformers)") from e


_HF_MODULES: dict[str, types.ModuleType] = {}


def _hf_module(name: str) -> types.ModuleType:
    """``transformers.<name>``, imported once. The rules import at patch time, so a patched forward
    finds the module here: an import per call would break ``torch.compile``'s graph (dynamo refuses
    ``importlib.import_module``)."""
    module = _HF_MODULES.get(name)
    if module is None:
        module = _HF_MODULES[name] = importlib.import_module(f"transformers.{name}")
    return module


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
_warned_output_attentions = False


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface function on :func:`kernels.scaled_dot_product_attention`.

    Mirrors ``transformers.integrations.sdpa_attention.sdpa_attention_forward``: ``is_causal`` from the
    argument or ``module.is_causal`` (default True), used only when there is no mask and more than one
    query; causal prefill against longer static-cache keys reads only the first ``seqlen_q`` keys;
    T5-style ``position_bias`` is folded into the mask (its gradient, when it is learned, comes from the
    kernel). Grouped-query attention uses the kernel's ``enable_gqa`` (no ``repeat_kv`` copies).
    Gemma 2's ``softcap`` (logit soft-capping, which 'sdpa' refuses) runs in the kernel, with the mask
    added after the cap as in transformers' eager attention; gpt-oss's ``s_aux`` (a learnable sink per
    head) joins the kernel's softmax normalizer, its gradient included; per-layer sliding windows come
    in the masks transformers builds for each layer type.

    Args:
        module: the attention layer (reads ``is_causal``).
        query: ``(batch, heads, seqlen_q, head_dim)``; key, value: ``(batch, heads_kv, seqlen_k, head_dim)``,
            heads a multiple of heads_kv.
        attention_mask: None, a bool mask (True = attend) or an additive float mask, broadcastable to
            ``(batch, heads, seqlen_q, seqlen_k)`` -- what transformers' SDPA mask builder makes.
        dropout: attention dropout probability; > 0 runs torch's SDPA (the kernel would draw other
            random numbers than the unpatched model), except with ``softcap``, which torch cannot run.
        softcap (keyword): logit soft-capping, ``softcap * tanh(scores / softcap)``; None or 0 = off.
        s_aux (keyword): ``(heads,)`` sink logits (gpt-oss), or None.
        scaling: softmax scale, default ``1/sqrt(head_dim)``.

    Returns:
        ``(attn_output, None)`` with ``attn_output`` of shape ``(batch, seqlen_q, heads, head_dim)``.

    Raises:
        NotImplementedError: a paged cache (continuous batching) is passed.
    """
    global _warned_output_attentions
    softcap = kwargs.get("softcap") or 0.0
    sinks = kwargs.get("s_aux")
    if kwargs.get("output_attentions", False) and not _warned_output_attentions:
        _warned_output_attentions = True
        warnings.warn(f"{ATTENTION_NAME!r} attention does not return attention weights (as 'sdpa'); use 'eager'",
                      stacklevel=2)
    if kwargs.get("cache") is not None:
        raise NotImplementedError(f"{ATTENTION_NAME!r} attention does not support paged caches (continuous "
                                  "batching); use 'sdpa'")
    position_bias = kwargs.get("position_bias")
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if is_causal and kv_length > q_length:  # prefill with an empty static cache: later keys are invisible
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        position_bias = None if position_bias is None else position_bias[..., :q_length]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    if softcap > 0 or sinks is not None:  # torch's SDPA has neither
        out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                           scale=scaling, is_causal=is_causal,
                                           enable_gqa=key.shape[1] != query.shape[1], softcap=softcap,
                                           learnable_sink=sinks)
    else:
        out = patching.routed_sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                   is_causal=is_causal, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`attention_forward` and the SDPA mask builder under :data:`ATTENTION_NAME`.

    Idempotent. Afterwards any model that supports SDPA can use it:
    ``AutoModel.from_pretrained(name, attn_implementation="kernels_sdpa")`` or
    ``model.set_attn_implementation("kernels_sdpa")``. Returns :data:`ATTENTION_NAME`.
    """
    transformers = _transformers()
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from transformers.masking_utils import flash_attention_mask

    transformers.AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    transformers.AttentionInterface.register(FLASH_ATTENTION_NAME, flash_attention_forward)
    AttentionMaskInterface.register(FLASH_ATTENTION_NAME, flash_attention_mask)
    _use_our_flash_functions()  # transformers' check of a flash implementation loads its functions
    return ATTENTION_NAME


def flash_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' flash-attention interface function, running our ``flash_attn_func``,
    ``flash_attn_varlen_func`` and ``flash_attn_with_kvcache``.

    It is transformers' own ``flash_attention_forward`` (unpadding by the 2-D mask, packed sequences
    from ``cu_seq_lens``/``position_ids``, sliding windows, soft-capping, ``s_aux`` sinks, and the paged
    decode of continuous batching with ``block_table``, ``k_cache``, ``v_cache``) with our three
    functions in place of flash-attention's: they take flash-attention's arguments, so transformers'
    argument mapping applies unchanged. Registered as :data:`FLASH_ATTENTION_NAME` by :func:`register`.

    Args and returns: as transformers' ``flash_attention_forward``: query ``(batch, heads, seqlen_q,
    head_dim)``, key/value ``(batch, heads_kv, seqlen_k, head_dim)``; returns ``(out (batch, seqlen_q,
    heads, head_dim), None)``.
    """
    _use_our_flash_functions()
    return _hf_module("integrations.flash_attention").flash_attention_forward(module, query, key, value,
                                                                             attention_mask, **kwargs)


def set_flash_attention(model: nn.Module) -> str:
    """Switch ``model`` to :data:`FLASH_ATTENTION_NAME` (e.g. before ``model.generate_batch``), also for
    models that list the flash implementations they accept (gpt-oss lists those that take its attention
    sinks; ours does, as ``learnable_sink``), where a plain ``set_attn_implementation`` would be redirected
    to a Hub kernel. Returns the name."""
    register()
    listing = [m for m in model.modules() if isinstance(m, _transformers().PreTrainedModel)
               and getattr(m, "_compatible_flash_implementations", None) is not None]
    for m in listing:
        m._compatible_flash_implementations = [*type(m)._compatible_flash_implementations, FLASH_ATTENTION_NAME]
    try:
        model.set_attn_implementation(FLASH_ATTENTION_NAME)
    finally:
        for m in listing:
            del m._compatible_flash_implementations
    return FLASH_ATTENTION_NAME


def _use_our_flash_functions() -> None:
    """Point transformers' loaded flash functions (``modeling_flash_attention_utils``, which caches one
    implementation at a time) at ours, as its own loader would for a flash-attention package."""
    utils = _hf_module("modeling_flash_attention_utils")
    if utils._loaded_implementation == FLASH_ATTENTION_NAME:
        return
    from . import flash_attn_interface as fa

    utils._flash_fn, utils._flash_varlen_fn = fa.flash_attn_func, fa.flash_attn_varlen_func
    utils._flash_with_kvcache_fn = torch.compiler.disable(fa.flash_attn_with_kvcache)
    utils._pad_fn, utils._unpad_fn = utils._pad_input, utils._unpad_input
    utils._process_flash_kwargs_fn = utils._lazy_define_process_function(fa.flash_attn_varlen_func)
    utils._process_with_kvcache_kwargs_fn = utils._lazy_define_process_function(fa.flash_attn_with_kvcache)
    utils._loaded_implementation = FLASH_ATTENTION_NAME


def _switch_attention(model: nn.Module, report: PatchReport) -> None:
    """Set ``model``'s attention implementation to ours if it is "sdpa" now; record why not otherwise."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    what = f"attn_implementation={current!r}"
    leave = lambda why: report.left_alone.append(PatchEntry("", what, None, why))  # noqa: E731
    if not isinstance(model, _transformers().PreTrainedModel):
        return leave("not a transformers.PreTrainedModel: no attention implementation to switch")
    if current in (ATTENTION_NAME, FLASH_ATTENTION_NAME):
        return leave("already uses kernels' attention")
    if current and "flash" in current:
        return leave(f"a flash-attention implementation: model.set_attn_implementation({FLASH_ATTENTION_NAME!r}) "
                     "runs ours with the same contract (padding-free batches, continuous batching's paged cache)")
    eager_only = _eager_only_feature(model) if current == "eager" else None
    if current != "sdpa" and eager_only is None:
        return leave("only 'sdpa' is switched, and 'eager' for soft-capped attention (Gemma 2) or attention "
                     "sinks (gpt-oss): our attention mirrors their semantics and masks (eager returns attention "
                     "weights, flash/flex build other masks)")
    if not model._can_set_attn_implementation():
        return leave(f"{type(model).__name__} cannot switch its attention implementation")
    register()
    with _sdpa_check_passes(model) if eager_only else contextlib.nullcontext():
        model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:  # pragma: no cover - transformers refused
        return leave("transformers did not accept the switch")
    model._kernels_original_attn_implementation = current
    report.replaced.append(PatchEntry(
        "", what, repr(ATTENTION_NAME),
        "attention layers call kernels.scaled_dot_product_attention through transformers' AttentionInterface, "
        "with the masks built for 'sdpa'; "
        + (f"{eager_only} in the kernel (which 'sdpa' cannot run); attention weights are not returned "
           "(output_attentions)" if eager_only else "attention dropout > 0 (training) runs torch's SDPA")))


@contextlib.contextmanager
def _sdpa_check_passes(model: nn.Module):
    """transformers takes any implementation whose name holds "sdpa" for torch's SDPA and refuses it to
    models that declare ``_supports_sdpa = False``, as Gemma 2 does for its soft-capping, which our kernel
    runs: those models pass the check while the switch is made."""
    refusing = [m for m in model.modules() if isinstance(m, _transformers().PreTrainedModel) and not m._supports_sdpa]
    for m in refusing:
        m._supports_sdpa = True
    try:
        yield
    finally:
        for m in refusing:
            del m._supports_sdpa


def _eager_only_feature(model: nn.Module) -> str | None:
    """What makes transformers run ``model``'s attention eagerly that our kernel runs: Gemma 2's logit
    soft-capping (``attn_logit_softcapping``, also in a multimodal ``text_config``) or gpt-oss's attention
    sinks (``sinks`` parameters passed as ``s_aux``); None otherwise."""
    config = model.config
    for cfg in (config, getattr(config, "text_config", None)):
        cap = getattr(cfg, "attn_logit_softcapping", None)
        if cap:
            return f"logit soft-capping at {float(cap)}"
    if any(isinstance(getattr(m, "sinks", None), nn.Parameter) for m in model.modules()) and \
            getattr(config, "model_type", None) == "gpt_oss":
        return "attention sinks (s_aux)"
    return None


def _restore_attention(model: nn.Module) -> list[str]:
    """kernels.unpatch's hook: give back the attention implementation :func:`apply_kernels` replaced."""
    restored = []
    for path, module in model.named_modules():
        original = module.__dict__.get("_kernels_original_attn_implementation")
        if original is not None:
            module.set_attn_implementation(original)
            del module._kernels_original_attn_implementation
            restored.append(f"{path or '(model)'}: attn_implementation {ATTENTION_NAME!r} -> {original!r}")
    return restored


patching.UNPATCH_HOOKS.append(_restore_attention)


# --------------------------------------------------------------------------------------------------
# Recognizing transformers' modules by their code
# --------------------------------------------------------------------------------------------------
_MISSING = object()


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _same_code(a: types.CodeType, b: types.CodeType, skip_doc: bool) -> bool:
    consts_a, consts_b = list(a.co_consts), list(b.co_consts)
    if skip_doc and consts_a and consts_b:  # a docstring is the first constant; it may differ
        consts_a, consts_b = consts_a[1:], consts_b[1:]
    if (a.co_code, a.co_names, a.co_varnames, a.co_argcount, a.co_kwonlyargcount, len(consts_a)) != \
            (b.co_code, b.co_names, b.co_varnames, b.co_argcount, b.co_kwonlyargcount, len(consts_b)):
        return False
    for x, y in zip(consts_a, consts_b):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            if not _same_code(x, y, skip_doc=False):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def same_function(f, g) -> bool:
    """Whether functions ``f`` and ``g`` run the same code on the same globals: equal bytecode, names and
    constants (docstrings aside), no closures, equal defaults, and every global name either reads is
    bound to the same object in both modules. This is how a "Copied from" class is proven identical."""
    f, g = getattr(f, "__func__", f), getattr(g, "__func__", g)
    if f is g:
        return True
    if not (isinstance(f, types.FunctionType) and isinstance(g, types.FunctionType)):
        return False
    if f.__closure__ or g.__closure__ or f.__defaults__ != g.__defaults__:
        return False
    if not _same_code(f.__code__, g.__code__, skip_doc=True):
        return False
    return all(f.__globals__.get(n, _MISSING) is g.__globals__.get(n, _MISSING) for n in _code_names(f.__code__))


@functools.lru_cache(maxsize=None)
def _reference(module: str, qualname: str):
    """A reference class of transformers, e.g. ``("llama", "LlamaMLP")``."""
    return getattr(_hf_module(f"models.{module}.modeling_{module}"), qualname)


def _forward_is(m: nn.Module, module: str, cls: str, method: str = "forward") -> bool:
    return same_function(getattr(type(m), method, None), getattr(_reference(module, cls), method))


def _recognize_hf_activation(act) -> str | None:
    """transformers.activations modules that compute a kernels.ffn activation exactly (up to rounding)."""
    if not isinstance(act, nn.Module) or type(act).__module__ != "transformers.activations" or has_hooks(act):
        return None
    acts = _hf_module("activations")
    cls = type(act)
    if cls is acts.GELUActivation:  # F.gelu, or the same erf formula in Python
        fn = act.act
        return "gelu" if fn is F.gelu or getattr(fn, "__func__", None) is acts.GELUActivation._gelu_python else None
    if cls is getattr(acts, "GELUTanh", None):
        fn = act.act
        if getattr(fn, "__func__", None) is acts.GELUTanh._gelu_tanh_python:
            return "gelu_tanh"
        return activation_name(fn)
    if cls in (acts.NewGELUActivation, acts.FastGELUActivation, acts.AccurateGELUActivation):
        return "gelu_tanh"  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); FastGELU's constant to 1e-11
    if cls is acts.SiLUActivation:
        return "silu"
    if cls is getattr(acts, "QuickGELUActivation", None):  # input * sigmoid(1.702 * input)
        return "quick_gelu"
    return None


patching.ACTIVATION_RECOGNIZERS.append(_recognize_hf_activation)


def _activation_problem(act, gated: bool = False) -> str | None:
    """Why ``act`` cannot be fused now, or None if it can."""
    name = activation_name(act)
    if name is None:
        return f"activation {type(act).__name__} has no kernel"
    if gated:
        name = patching.GATED.get(name)
        if name is None:
            return f"gated activation with {activation_name(act)!r} has no kernel"
    if name not in patching.FFN_ACTIVATIONS:
        return f"the installed kernels.ffn has no {name!r} activation yet"
    return None


def _ffn_refusal(opts: Options, act, gated: bool = False) -> Leave | None:
    """The Leave for an MLP whose FFN may not or cannot be fused (``ffn=False``, an activation with no
    kernel), or None when it can."""
    if not opts.ffn:
        return Leave("ffn=False")
    problem = _activation_problem(act, gated)
    return Leave(problem) if problem else None


# --------------------------------------------------------------------------------------------------
# Patched forwards
# --------------------------------------------------------------------------------------------------
class _RMSNormMixin:
    """LlamaRMSNorm-style ``weight * (x * rsqrt(mean(x^2) + eps))`` on ``kernels.rms_norm``.

    Llama computes in fp32 and rounds the normalized x to the input dtype before the weight product;
    the kernel rounds once at the end (equal up to rounding). An input whose dtype differs from the
    weight's runs the original (it promotes the output to the wider dtype, which the kernel does not).
    """

    def forward(self, hidden_states):
        if not kernel_can_take(hidden_states, self.weight):
            return super().forward(hidden_states)
        with patching.autocast_off(hidden_states.device.type):
            return patching.rms_norm(hidden_states, (self.weight.shape[-1],), self.weight, self.variance_epsilon)


class _GemmaRMSNormMixin:
    """GemmaRMSNorm ``(norm(x.float()) * (1 + weight.float())).type_as(x)`` on ``kernels.rms_norm`` with the
    fp32 weight ``1 + weight`` (built per call, d elements; the gradient flows through it to ``weight``).
    The kernel normalizes and scales in fp32 and rounds once, which is Gemma's casting (Llama's rounds
    before the weight); Liger-Kernel calls this ``offset=1.0, casting_mode="gemma"``."""

    def forward(self, x):
        if not (kernel_can_take(x) and self.weight.device == x.device):
            return super().forward(x)
        with patching.autocast_off(x.device.type):
            return patching.rms_norm(x, (self.weight.shape[-1],), 1.0 + self.weight.float(), self.eps)


class _GatedMLPMixin:
    """LlamaMLP ``down(act(gate(x)) * up(x))`` as one gated ``kernels.ffn`` call."""

    def forward(self, x):
        parts = (self.gate_proj, self.up_proj, self.down_proj)
        y = None
        if all(plain_linear(p) for p in parts):
            y = fused_ffn(x, self.up_proj.weight, self.up_proj.bias, self.act_fn, self.down_proj.weight,
                          self.down_proj.bias, weight_gate=self.gate_proj.weight, bias_gate=self.gate_proj.bias,
                          gated=True)
        return super().forward(x) if y is None else y


def _plain_conv1d(m) -> bool:
    conv1d = _hf_module("pytorch_utils").Conv1D
    return isinstance(m, conv1d) and type(m).forward is conv1d.forward and not has_hooks(m)


class _GPT2MLPMixin:
    """GPT2MLP ``dropout(c_proj(act(c_fc(x))))``: kernels.ffn on the Conv1D weights' transposes (nn.Linear
    layout views, no copies), then the module's own dropout."""

    def forward(self, hidden_states):
        y = None
        if _plain_conv1d(self.c_fc) and _plain_conv1d(self.c_proj):
            y = fused_ffn(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.act, self.c_proj.weight.t(),
                          self.c_proj.bias)
        return super().forward(hidden_states) if y is None else self.dropout(y)


class _NeoXMLPMixin:
    """GPTNeoXMLP ``dense_4h_to_h(act(dense_h_to_4h(x)))`` as one kernels.ffn call."""

    def forward(self, hidden_states):
        y = patching.fused_linear_ffn(hidden_states, self.dense_h_to_4h, self.act, self.dense_4h_to_h)
        return super().forward(hidden_states) if y is None else y


class _T5DenseMixin:
    """T5DenseActDense ``wo(dropout(act(wi(x))))`` as one kernels.ffn call (dropout in eval only: in
    training it would draw other random numbers, so the original runs)."""

    def forward(self, hidden_states):
        y = patching.fused_linear_ffn(hidden_states, self.wi, self.act, self.wo, dropout=self.dropout)
        return super().forward(hidden_states) if y is None else y


class _T5GatedDenseMixin:
    """T5DenseGatedActDense ``wo(dropout(act(wi_0(x)) * wi_1(x)))`` as one gated kernels.ffn call."""

    def forward(self, hidden_states):
        gate, up, down = self.wi_0, self.wi_1, self.wo
        y = None
        if all(plain_linear(p) for p in (gate, up, down)):
            y = fused_ffn(hidden_states, up.weight, up.bias, self.act, down.weight, down.bias, dropout=self.dropout,
                          weight_gate=gate.weight, bias_gate=gate.bias, gated=True)
        return super().forward(hidden_states) if y is None else y


class _CLIPMLPMixin:
    """CLIPMLP ``fc2(activation_fn(fc1(x)))`` (quick_gelu, or another recognized activation) as one
    kernels.ffn call."""

    def forward(self, hidden_states):
        y = patching.fused_linear_ffn(hidden_states, self.fc1, self.activation_fn, self.fc2)
        return super().forward(hidden_states) if y is None else y


class _FusedGateUpMLPMixin:
    """Phi3MLP ``down(up * act(gate))`` with ``[gate | up] = gate_up_proj(x)`` as one gated kernels.ffn
    call on the two row halves of ``gate_up_proj.weight`` (views: gradients reach the fused weight)."""

    def forward(self, hidden_states):
        fused, down = self.gate_up_proj, self.down_proj
        y = None
        if plain_linear(fused) and plain_linear(down) and fused.weight.shape[0] % 2 == 0:
            d_ff = fused.weight.shape[0] // 2
            bias = fused.bias
            y = fused_ffn(hidden_states, fused.weight[d_ff:], None if bias is None else bias[d_ff:],
                          self.activation_fn, down.weight, down.bias, weight_gate=fused.weight[:d_ff],
                          bias_gate=None if bias is None else bias[:d_ff], gated=True)
        return super().forward(hidden_states) if y is None else y


class _BertLayerMixin:
    """BertLayer's ``feed_forward_chunk``: ``LayerNorm(dropout(out.dense(act(inter.dense(x)))) + x)`` with
    the two products and the activation in one kernels.ffn call; dropout and LayerNorm stay modules."""

    def feed_forward_chunk(self, attention_output):
        inter, out = self.intermediate, self.output
        y = None
        if not (has_hooks(inter) or has_hooks(out)) and plain_linear(inter.dense) and plain_linear(out.dense):
            y = fused_ffn(attention_output, inter.dense.weight, inter.dense.bias, inter.intermediate_act_fn,
                          out.dense.weight, out.dense.bias)
        if y is None:
            return super().feed_forward_chunk(attention_output)
        return patching.add_and_norm(out.LayerNorm, out.dropout(y), attention_output)


class _BertSelfOutputMixin:
    """BertSelfOutput ``LayerNorm(dropout(dense(h)) + input)`` with the add fused into the norm."""

    def forward(self, hidden_states, input_tensor):
        if has_hooks(self.LayerNorm):
            return super().forward(hidden_states, input_tensor)
        return patching.add_and_norm(self.LayerNorm, self.dropout(self.dense(hidden_states)), input_tensor)


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------
def _rms_norm_rule(m, opts: Options):
    if not type(m).__name__.endswith("RMSNorm") or isinstance(m, getattr(nn, "RMSNorm", ())):
        return None
    if not (_forward_is(m, "llama", "LlamaRMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)):
        return Leave("forward is not LlamaRMSNorm's code: equivalence cannot be proven")
    if not opts.layer_norm:
        return Leave("layer_norm=False")
    return Replace(_RMSNormMixin, "kernels.rms_norm with the same weight and variance_epsilon; an input dtype "
                                  "other than the weight's runs the original")


_GEMMA_NORMS = (("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm"))


def _is_gemma_norm(m) -> bool:
    for module, cls in _GEMMA_NORMS:
        try:
            if _forward_is(m, module, cls):
                return True
        except (ImportError, AttributeError):  # an older transformers without this model
            continue
    return False


def _gemma_rms_norm_rule(m, opts: Options):
    if not type(m).__name__.endswith("RMSNorm") or not _is_gemma_norm(m):
        return None
    if not isinstance(getattr(m, "weight", None), torch.Tensor):
        return Leave("no weight tensor")
    if not opts.layer_norm:
        return Leave("layer_norm=False")
    return Replace(_GemmaRMSNormMixin, "kernels.rms_norm with the fp32 weight 1 + weight and eps, all in fp32 "
                                       "(Gemma's casting)")


def _llama_mlp_rule(m, opts: Options):
    if not _forward_is(m, "llama", "LlamaMLP"):
        return None
    if not all(plain_linear(getattr(m, p, None)) for p in ("gate_proj", "up_proj", "down_proj")):
        return Leave("gate_proj/up_proj/down_proj are not plain nn.Linear (or have hooks)")
    refusal = _ffn_refusal(opts, m.act_fn, gated=True)
    if refusal:
        return refusal
    name = patching.GATED[activation_name(m.act_fn)]
    return Replace(_GatedMLPMixin, f"gated kernels.ffn({name!r}) with gate_proj, up_proj, down_proj",
                   covers=("gate_proj", "up_proj", "down_proj", "act_fn"))


def _gpt2_mlp_rule(m, opts: Options):
    if not _forward_is(m, "gpt2", "GPT2MLP"):
        return None
    if not (_plain_conv1d(m.c_fc) and _plain_conv1d(m.c_proj)):
        return Leave("c_fc/c_proj are not plain Conv1D (or have hooks)")
    refusal = _ffn_refusal(opts, m.act)
    if refusal:
        return refusal
    return Replace(_GPT2MLPMixin, f"kernels.ffn({activation_name(m.act)!r}) on the Conv1D weights (transposed "
                                  "views); the dropout after c_proj stays", covers=("c_fc", "c_proj", "act"))


def _neox_mlp_rule(m, opts: Options):
    if not _forward_is(m, "gpt_neox", "GPTNeoXMLP"):
        return None
    if not (plain_linear(getattr(m, "dense_h_to_4h", None)) and plain_linear(getattr(m, "dense_4h_to_h", None))):
        return Leave("dense_h_to_4h/dense_4h_to_h are not plain nn.Linear (or have hooks)")
    refusal = _ffn_refusal(opts, m.act)
    if refusal:
        return refusal
    return Replace(_NeoXMLPMixin, f"kernels.ffn({activation_name(m.act)!r}) with dense_h_to_4h, dense_4h_to_h",
                   covers=("dense_h_to_4h", "dense_4h_to_h", "act"))


def _t5_rule(m, opts: Options):
    """T5's RMS norm (Llama's math and casting, other code) and its two FFN forms."""
    if _forward_is(m, "t5", "T5LayerNorm"):
        if not opts.layer_norm:
            return Leave("layer_norm=False")
        return Replace(_RMSNormMixin, "kernels.rms_norm with the same weight and variance_epsilon; an input dtype "
                                      "other than the weight's runs the original")
    gated = _forward_is(m, "t5", "T5DenseGatedActDense")
    if not (gated or _forward_is(m, "t5", "T5DenseActDense")):
        return None
    names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
    if not all(plain_linear(getattr(m, n, None)) for n in names):
        return Leave(f"{'/'.join(names)} are not plain nn.Linear (or have hooks)")
    refusal = _ffn_refusal(opts, m.act, gated=gated)
    if refusal:
        return refusal
    name = activation_name(m.act)
    name = patching.GATED[name] if gated else name
    return Replace(_T5GatedDenseMixin if gated else _T5DenseMixin,
                   f"{'gated ' if gated else ''}kernels.ffn({name!r}) with {', '.join(names)}; its dropout in "
                   "training runs the original", covers=(*names, "act", "dropout"))


def _clip_mlp_rule(m, opts: Options):
    if not _forward_is(m, "clip", "CLIPMLP"):
        return None
    if not (plain_linear(getattr(m, "fc1", None)) and plain_linear(getattr(m, "fc2", None))):
        return Leave("fc1/fc2 are not plain nn.Linear (or have hooks)")
    refusal = _ffn_refusal(opts, m.activation_fn)
    if refusal:
        return refusal
    return Replace(_CLIPMLPMixin, f"kernels.ffn({activation_name(m.activation_fn)!r}) with fc1, fc2",
                   covers=("fc1", "fc2", "activation_fn"))


def _fused_gate_up_mlp_rule(m, opts: Options):
    if not _forward_is(m, "phi3", "Phi3MLP"):
        return None
    fused, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (plain_linear(fused) and plain_linear(down)) or fused.weight.shape[0] % 2:
        return Leave("gate_up_proj/down_proj are not plain nn.Linear (or have hooks) with an even gate_up width")
    refusal = _ffn_refusal(opts, m.activation_fn, gated=True)
    if refusal:
        return refusal
    name = patching.GATED[activation_name(m.activation_fn)]
    return Replace(_FusedGateUpMLPMixin, f"gated kernels.ffn({name!r}) on gate_up_proj's two halves, down_proj",
                   covers=("gate_up_proj", "down_proj", "activation_fn"))


def _bert_layer_rule(m, opts: Options):
    if not _forward_is(m, "bert", "BertLayer", "feed_forward_chunk"):
        return None
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    if not (_forward_is(inter, "bert", "BertIntermediate") and _forward_is(out, "bert", "BertOutput")):
        return Leave("intermediate/output are not BertIntermediate/BertOutput code: equivalence cannot be proven")
    if not (plain_linear(inter.dense) and plain_linear(out.dense)) or has_hooks(inter) or has_hooks(out):
        return Leave("intermediate.dense/output.dense are not plain nn.Linear (or have hooks)")
    refusal = _ffn_refusal(opts, inter.intermediate_act_fn)
    if refusal:
        return refusal
    name = activation_name(inter.intermediate_act_fn)
    covers = ("intermediate", "intermediate.dense", "intermediate.intermediate_act_fn", "output", "output.dense")
    return Replace(_BertLayerMixin, f"intermediate + output fused by kernels.ffn({name!r}), then "
                                    "output.LayerNorm(dropout(.) + x) as one Add & Norm when LayerNorm is patched",
                   covers=covers)


def _bert_self_output_rule(m, opts: Options):
    if not _forward_is(m, "bert", "BertSelfOutput"):
        return None
    if not opts.layer_norm:
        return Leave("layer_norm=False")
    return Replace(_BertSelfOutputMixin, "LayerNorm(dropout(dense(h)) + input) with the add fused into the norm "
                                         "(when LayerNorm is patched)")


def _unknown_hf_rule(m, opts: Options):
    """transformers MLP/norm classes no rule proved equivalent: say so instead of 'no kernel'."""
    name = type(m).__name__
    if type(m).__module__.startswith("transformers.") and name.endswith(("MLP", "RMSNorm")):
        return Leave(f"{name}.forward is not the code of an MLP/norm kernels.hf knows (LlamaMLP, GPT2MLP, "
                     "GPTNeoXMLP, Phi3MLP, CLIPMLP, T5's, BertIntermediate+BertOutput, LlamaRMSNorm): equivalence cannot be proven")
    return None


def _rules():
    torchscript, *torch_rules = patching.TORCH_RULES
    return (torchscript, _gemma_rms_norm_rule, _rms_norm_rule, _llama_mlp_rule, _gpt2_mlp_rule, _neox_mlp_rule,
            _clip_mlp_rule, _t5_rule, _fused_gate_up_mlp_rule, _bert_layer_rule, _bert_self_output_rule, *torch_rules,
            _unknown_hf_rule)


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------
def apply_kernels(model: nn.Module, *, attention: bool = True, layer_norm: bool = True,
                  ffn: bool = True) -> PatchReport:
    """Put our kernels into a transformers model, in place, wherever it provably computes the same.

    * attention (``attention=True``): a model on ``attn_implementation="sdpa"`` (transformers' default)
      is switched to :data:`ATTENTION_NAME`; models on other implementations are left alone.
    * norms (``layer_norm=True``): ``nn.LayerNorm`` -> ``kernels.layer_norm``; LlamaRMSNorm-code norms
      -> ``kernels.rms_norm``.
    * MLPs (``ffn=True``): LlamaMLP-, GPT2MLP- and BertLayer-code feed-forward blocks -> ``kernels.ffn``
      (gated for Llama); BERT's residual add goes into its LayerNorm (fused Add & Norm).

    Everything else (including the rules of :func:`kernels.patch` for torch.nn modules) is as in
    :func:`kernels.patch`: parameters and ``state_dict`` unchanged, call-time fallbacks where a kernel
    would differ (dropout in training, dtypes, hooks), and :func:`kernels.unpatch` undoes all of it,
    the attention implementation included.

    Args:
        model: a ``transformers.PreTrainedModel`` (any ``nn.Module`` works for norms and MLPs).

    Returns:
        A :class:`kernels.PatchReport` (the attention switch is the entry with path ``""`` and
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
    report = PatchReport(model, source="kernels.hf.apply_kernels")
    if attention:
        _switch_attention(model, report)
    return patching.apply_rules(model, _rules(), opts, report)


def _check_model_type(fn: str, model, model_types: tuple[str, ...]) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in model_types:
        raise ValueError(f"{fn}: expected a model with config.model_type in {model_types}, got {model_type!r}; "
                         "kernels.hf.apply_kernels(model) takes any model")


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
    """Whether ``module`` itself was patched by :func:`kernels.patch` or :func:`apply_kernels`."""
    return original_class(module) is not None


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers our attention right after ``transformers`` is first imported, so the order of
    ``import kernels`` and ``import transformers`` does not matter and ``import kernels`` does not
    import transformers itself (it takes seconds)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_and_register(module):
                exec_module(module)
                with contextlib.suppress(Exception):  # never break the user's import of transformers
                    register()
            spec.loader.exec_module = exec_and_register
        return spec


if "transformers" in sys.modules:  # see the module docstring: registered once transformers is imported
    with contextlib.suppress(Exception):
        register()
elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnImport())
