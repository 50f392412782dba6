"""Our attention behind transformers' attention interface (``transformers.AttentionInterface``).

:func:`attention_forward` (``"kernels_sdpa"``) mirrors transformers' ``sdpa_attention_forward`` with the
masks built for "sdpa"; :func:`flash_attention_forward` (``"kernels_flash_attention_2"``) is transformers'
own flash-attention path with our flash functions in place of flash-attention's. :func:`register` makes
both names known; the package registers them once transformers is imported.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from .. import patching
from ..attention import scaled_dot_product_attention
from ..patching import PatchEntry, PatchReport
from ._common import _hf_module, _transformers

ATTENTION_NAME = "kernels_sdpa"
"""The ``attn_implementation`` name of our attention. It contains "sdpa" on purpose: transformers then
accepts it only for models that declare SDPA support (``_supports_sdpa``), whose semantics we mirror."""

FLASH_ATTENTION_NAME = "kernels_flash_attention_2"
"""The ``attn_implementation`` name of our flash-attention-style attention (:func:`flash_attention_forward`):
no 4-D masks, padding-free and packed batches, and the paged KV cache of transformers' continuous
batching (``generate_batch``), which accepts only 'sdpa', 'paged|eager' and names holding "flash", and
takes its block-table decode path only for names matching flash-attention 2 or 3 (on CUDA). Our functions
have flash-attention 2's signatures."""


_warned_output_attentions = False


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface function on :func:`transformer_kernels.scaled_dot_product_attention`.

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
    from .. import flash_attn_interface as fa

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
        "attention layers call transformer_kernels.scaled_dot_product_attention through transformers' AttentionInterface, "
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
    """transformer_kernels.unpatch's hook: give back the attention implementation :func:`apply_kernels` replaced."""
    restored = []
    for path, module in model.named_modules():
        original = module.__dict__.get("_kernels_original_attn_implementation")
        if original is not None:
            module.set_attn_implementation(original)
            del module._kernels_original_attn_implementation
            restored.append(f"{path or '(model)'}: attn_implementation {ATTENTION_NAME!r} -> {original!r}")
    return restored


patching.UNPATCH_HOOKS.append(_restore_attention)
