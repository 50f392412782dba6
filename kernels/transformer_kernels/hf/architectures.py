"""transformers' norms and MLPs on our kernels, per instance, as :func:`transformer_kernels.patch` does.

Each rule recognizes a module by its code (:func:`._common.same_function` against a reference class of
transformers) and answers :class:`~transformer_kernels.patching.Replace` with a mixin whose forward runs
our kernels (parameters and ``state_dict`` keys unchanged), :class:`~transformer_kernels.patching.Leave`
with the reason it cannot, or None when it does not apply. :func:`rules` lists them in the order
:func:`transformer_kernels.hf.apply_kernels` tries them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import patching
from ..patching import Leave, Options, Replace, activation_name, fused_ffn, has_hooks, kernel_can_take, plain_linear
from ..quantize import fp8_scale
from ._common import _ffn_refusal, _forward_is, _hf_module


def llama_rms_norm(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """LlamaRMSNorm's ``weight * (x * rsqrt(mean(x^2) + eps))`` of ``module`` (its ``weight`` and
    ``variance_epsilon``) on ``transformer_kernels.rms_norm``, or None when the kernel cannot take the call.

    Llama computes in fp32 and rounds the normalized x to the input dtype before the weight product;
    the kernel rounds once at the end (equal up to rounding). An input whose dtype differs from the
    weight's answers None (Llama promotes the output to the wider dtype, which the kernel does not).
    """
    if not kernel_can_take(hidden_states, module.weight):
        return None
    with patching.autocast_off(hidden_states.device.type):
        return patching.rms_norm(hidden_states, (module.weight.shape[-1],), module.weight, module.variance_epsilon)


def gemma_rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """GemmaRMSNorm's ``(norm(x.float()) * (1 + weight.float())).type_as(x)`` of ``module`` (its
    ``weight`` and ``eps``) on ``transformer_kernels.rms_norm`` with the fp32 weight ``1 + weight`` (built
    per call, d elements; the gradient flows through it to ``weight``), or None when the kernel cannot
    take the call. The kernel normalizes and scales in fp32 and rounds once, which is Gemma's casting
    (Llama's rounds before the weight); Liger-Kernel calls this ``offset=1.0, casting_mode="gemma"``."""
    if not (kernel_can_take(x) and module.weight.device == x.device):
        return None
    with patching.autocast_off(x.device.type):
        return patching.rms_norm(x, (module.weight.shape[-1],), 1.0 + module.weight.float(), module.eps)


class _RMSNormMixin:
    """LlamaRMSNorm on :func:`llama_rms_norm`; the original forward where that answers None."""

    def forward(self, hidden_states):
        y = llama_rms_norm(self, hidden_states)
        return super().forward(hidden_states) if y is None else y


class _GemmaRMSNormMixin:
    """GemmaRMSNorm on :func:`gemma_rms_norm`; the original forward where that answers None."""

    def forward(self, x):
        y = gemma_rms_norm(self, x)
        return super().forward(x) if y is None else y


class _GatedMLPMixin:
    """LlamaMLP ``down(act(gate(x)) * up(x))`` as one gated ``transformer_kernels.ffn`` call."""

    def forward(self, x):
        parts = (self.gate_proj, self.up_proj, self.down_proj)
        y = None
        if all(plain_linear(p) for p in parts):
            y = fused_ffn(x, self.up_proj.weight, self.up_proj.bias, self.act_fn, self.down_proj.weight,
                          self.down_proj.bias, weight_gate=self.gate_proj.weight, bias_gate=self.gate_proj.bias,
                          gated=True, scales=tuple(fp8_scale(p) for p in (self.up_proj, self.down_proj, self.gate_proj)))
        return super().forward(x) if y is None else y

    def _fp8_linears(self):  # transformer_kernels.quantize_fp8
        return self.gate_proj, self.up_proj, self.down_proj


def _plain_conv1d(m) -> bool:
    conv1d = _hf_module("pytorch_utils").Conv1D
    return isinstance(m, conv1d) and type(m).forward is conv1d.forward and not has_hooks(m)


class _GPT2MLPMixin:
    """GPT2MLP ``dropout(c_proj(act(c_fc(x))))``: transformer_kernels.ffn on the Conv1D weights' transposes (nn.Linear
    layout views, no copies), then the module's own dropout."""

    def forward(self, hidden_states):
        y = None
        if _plain_conv1d(self.c_fc) and _plain_conv1d(self.c_proj):
            y = fused_ffn(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.act, self.c_proj.weight.t(),
                          self.c_proj.bias)
        return super().forward(hidden_states) if y is None else self.dropout(y)

    _fp8_skip_reason = "GPT-2's Conv1D weights (stored transposed): not quantized"

    def _fp8_linears(self):
        return None


class _NeoXMLPMixin:
    """GPTNeoXMLP ``dense_4h_to_h(act(dense_h_to_4h(x)))`` as one transformer_kernels.ffn call."""

    def forward(self, hidden_states):
        y = patching.fused_linear_ffn(hidden_states, self.dense_h_to_4h, self.act, self.dense_4h_to_h)
        return super().forward(hidden_states) if y is None else y

    def _fp8_linears(self):
        return self.dense_h_to_4h, self.dense_4h_to_h


class _T5DenseMixin:
    """T5DenseActDense ``wo(dropout(act(wi(x))))`` as one transformer_kernels.ffn call (dropout in eval only: in
    training it would draw other random numbers, so the original runs)."""

    def forward(self, hidden_states):
        y = patching.fused_linear_ffn(hidden_states, self.wi, self.act, self.wo, dropout=self.dropout)
        return super().forward(hidden_states) if y is None else y

    def _fp8_linears(self):
        return self.wi, self.wo


class _T5GatedDenseMixin:
    """T5DenseGatedActDense ``wo(dropout(act(wi_0(x)) * wi_1(x)))`` as one gated transformer_kernels.ffn call."""

    def forward(self, hidden_states):
        gate, up, down = self.wi_0, self.wi_1, self.wo
        y = None
        if all(plain_linear(p) for p in (gate, up, down)):
            y = fused_ffn(hidden_states, up.weight, up.bias, self.act, down.weight, down.bias, dropout=self.dropout,
                          weight_gate=gate.weight, bias_gate=gate.bias, gated=True,
                          scales=(fp8_scale(up), fp8_scale(down), fp8_scale(gate)))
        return super().forward(hidden_states) if y is None else y

    def _fp8_linears(self):
        return self.wi_0, self.wi_1, self.wo


class _CLIPMLPMixin:
    """CLIPMLP ``fc2(activation_fn(fc1(x)))`` (quick_gelu, or another recognized activation) as one
    transformer_kernels.ffn call."""

    def forward(self, hidden_states):
        y = patching.fused_linear_ffn(hidden_states, self.fc1, self.activation_fn, self.fc2)
        return super().forward(hidden_states) if y is None else y

    def _fp8_linears(self):
        return self.fc1, self.fc2


class _FusedGateUpMLPMixin:
    """Phi3MLP ``down(up * act(gate))`` with ``[gate | up] = gate_up_proj(x)`` as one gated transformer_kernels.ffn
    call on the two row halves of ``gate_up_proj.weight`` (views: gradients reach the fused weight)."""

    def forward(self, hidden_states):
        fused, down = self.gate_up_proj, self.down_proj
        y = None
        if plain_linear(fused) and plain_linear(down) and fused.weight.shape[0] % 2 == 0:
            d_ff = fused.weight.shape[0] // 2
            bias, scale = fused.bias, fp8_scale(fused)
            y = fused_ffn(hidden_states, fused.weight[d_ff:], None if bias is None else bias[d_ff:],
                          self.activation_fn, down.weight, down.bias, weight_gate=fused.weight[:d_ff],
                          bias_gate=None if bias is None else bias[:d_ff], gated=True,
                          scales=(None, None, None) if scale is None else (scale[d_ff:], fp8_scale(down), scale[:d_ff]))
        return super().forward(hidden_states) if y is None else y

    def _fp8_linears(self):
        return self.gate_up_proj, self.down_proj


class _BertLayerMixin:
    """BertLayer's ``feed_forward_chunk``: ``LayerNorm(dropout(out.dense(act(inter.dense(x)))) + x)`` with
    the two products and the activation in one transformer_kernels.ffn call; dropout and LayerNorm stay modules."""

    def feed_forward_chunk(self, attention_output):
        inter, out = self.intermediate, self.output
        y = None
        if not (has_hooks(inter) or has_hooks(out)) and plain_linear(inter.dense) and plain_linear(out.dense):
            y = fused_ffn(attention_output, inter.dense.weight, inter.dense.bias, inter.intermediate_act_fn,
                          out.dense.weight, out.dense.bias, scales=(fp8_scale(inter.dense), fp8_scale(out.dense), None))
        if y is None:
            return super().feed_forward_chunk(attention_output)
        return patching.add_and_norm(out.LayerNorm, out.dropout(y), attention_output)

    def _fp8_linears(self):  # transformer_kernels.quantize_fp8
        return self.intermediate.dense, self.output.dense


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
    return Replace(_RMSNormMixin, "transformer_kernels.rms_norm with the same weight and variance_epsilon; an input dtype "
                                  "other than the weight's runs the original")


_GEMMA_NORMS = (("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm"))


def _is_gemma_norm(m) -> bool:
    """Whether ``m``'s forward and ``_norm`` are those of Gemma's (1, 2 or 3) RMSNorm."""
    for module, cls in _GEMMA_NORMS:
        try:
            if _forward_is(m, module, cls) and _forward_is(m, module, cls, "_norm"):
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
    return Replace(_GemmaRMSNormMixin, "transformer_kernels.rms_norm with the fp32 weight 1 + weight and eps, all in fp32 "
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
    return Replace(_GatedMLPMixin, f"gated transformer_kernels.ffn({name!r}) with gate_proj, up_proj, down_proj",
                   covers=("gate_proj", "up_proj", "down_proj", "act_fn"))


def _gpt2_mlp_rule(m, opts: Options):
    if not _forward_is(m, "gpt2", "GPT2MLP"):
        return None
    if not (_plain_conv1d(m.c_fc) and _plain_conv1d(m.c_proj)):
        return Leave("c_fc/c_proj are not plain Conv1D (or have hooks)")
    refusal = _ffn_refusal(opts, m.act)
    if refusal:
        return refusal
    return Replace(_GPT2MLPMixin, f"transformer_kernels.ffn({activation_name(m.act)!r}) on the Conv1D weights (transposed "
                                  "views); the dropout after c_proj stays", covers=("c_fc", "c_proj", "act"))


def _neox_mlp_rule(m, opts: Options):
    if not _forward_is(m, "gpt_neox", "GPTNeoXMLP"):
        return None
    if not (plain_linear(getattr(m, "dense_h_to_4h", None)) and plain_linear(getattr(m, "dense_4h_to_h", None))):
        return Leave("dense_h_to_4h/dense_4h_to_h are not plain nn.Linear (or have hooks)")
    refusal = _ffn_refusal(opts, m.act)
    if refusal:
        return refusal
    return Replace(_NeoXMLPMixin, f"transformer_kernels.ffn({activation_name(m.act)!r}) with dense_h_to_4h, dense_4h_to_h",
                   covers=("dense_h_to_4h", "dense_4h_to_h", "act"))


def _t5_rule(m, opts: Options):
    """T5's RMS norm (Llama's math and casting, other code) and its two FFN forms."""
    if _forward_is(m, "t5", "T5LayerNorm"):
        if not opts.layer_norm:
            return Leave("layer_norm=False")
        return Replace(_RMSNormMixin, "transformer_kernels.rms_norm with the same weight and variance_epsilon; an input dtype "
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
                   f"{'gated ' if gated else ''}transformer_kernels.ffn({name!r}) with {', '.join(names)}; its dropout in "
                   "training runs the original", covers=(*names, "act", "dropout"))


def _clip_mlp_rule(m, opts: Options):
    if not _forward_is(m, "clip", "CLIPMLP"):
        return None
    if not (plain_linear(getattr(m, "fc1", None)) and plain_linear(getattr(m, "fc2", None))):
        return Leave("fc1/fc2 are not plain nn.Linear (or have hooks)")
    refusal = _ffn_refusal(opts, m.activation_fn)
    if refusal:
        return refusal
    return Replace(_CLIPMLPMixin, f"transformer_kernels.ffn({activation_name(m.activation_fn)!r}) with fc1, fc2",
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
    return Replace(_FusedGateUpMLPMixin, f"gated transformer_kernels.ffn({name!r}) on gate_up_proj's two halves, down_proj",
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
    return Replace(_BertLayerMixin, f"intermediate + output fused by transformer_kernels.ffn({name!r}), then "
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
        return Leave(f"{name}.forward is not the code of an MLP/norm transformer_kernels.hf knows (LlamaMLP, GPT2MLP, "
                     "GPTNeoXMLP, Phi3MLP, CLIPMLP, T5's, BertIntermediate+BertOutput, LlamaRMSNorm): equivalence cannot be proven")
    return None


def rules():
    torchscript, *torch_rules = patching.TORCH_RULES
    return (torchscript, _gemma_rms_norm_rule, _rms_norm_rule, _llama_mlp_rule, _gpt2_mlp_rule, _neox_mlp_rule,
            _clip_mlp_rule, _t5_rule, _fused_gate_up_mlp_rule, _bert_layer_rule, _bert_self_output_rule, *torch_rules,
            _unknown_hf_rule)
