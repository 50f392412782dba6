"""transformer_kernels.hf: our attention, norms and MLPs in Hugging Face GPT-2, BERT and Llama models.

Models are built from tiny local configs (nothing is downloaded). Each test runs the patched model
beside an unpatched deep copy: logits and every parameter gradient must match (fp32), and the launch
counters must show that the Triton kernels ran.
"""
import copy
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn as nn

import transformer_kernels as tk
from transformer_kernels.attention import attention_reference
from transformer_kernels.patching import override_sdpa, unpatch
from test_patching import assert_grads_match, assert_match, snapshot, assert_same_state

transformers = pytest.importorskip("transformers")
from transformer_kernels import hf  # noqa: E402

VOCAB = 64


def gpt2(**overrides):
    kwargs = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = transformers.GPT2Config(**{**kwargs, **overrides})
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def tokens(device, padded=False, batch=2, seqlen=8):
    ids = torch.randint(0, VOCAB, (batch, seqlen), device=device)
    mask = torch.ones(batch, seqlen, dtype=torch.long, device=device)
    if padded:
        mask[1, seqlen - 3:] = 0  # right padding: every query still sees a key
    return dict(input_ids=ids, attention_mask=mask)


def compare(model, ref, inputs):
    """Logits and all parameter gradients of the patched ``model`` against ``ref``."""
    logits, logits_ref = model(**inputs).logits, ref(**inputs).logits
    assert_match(logits, logits_ref, "logits")
    cotangent = torch.randn_like(logits_ref)
    (logits * cotangent).sum().backward()
    (logits_ref * cotangent).sum().backward()
    assert_grads_match(model, ref)


def assert_same_greedy(model, ref, inputs, launches, new_tokens=4):
    """Greedy generation of the patched model (our attention launched each step of each of 2 layers)
    gives the unpatched model's tokens and, step by step, its scores."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    with launches("attention_fwd", 2 * new_tokens):
        out = model.generate(**inputs, **kwargs)
    out_ref = ref.generate(**inputs, **kwargs)
    assert torch.equal(out.sequences, out_ref.sequences)
    for step, (s, s_ref) in enumerate(zip(out.scores, out_ref.scores)):
        assert_match(s, s_ref, f"scores of step {step}")


def patch_and_check(model, apply, inputs, launches, expect_replaced):
    """apply kernels, compare with the unpatched copy, prove the kernels ran, unpatch and check it restores."""
    torch.manual_seed(0)
    model = model.eval()
    ref = copy.deepcopy(model)
    snap = snapshot(model)
    report = apply(model)
    replaced = [e.original for e in report.replaced]
    for original, count in expect_replaced.items():
        assert replaced.count(original) == count, f"{original}: {replaced.count(original)} != {count}\n{report}"
    assert model.config._attn_implementation == hf.ATTENTION_NAME
    assert_same_state(model, snap)
    with launches("attention_fwd"), launches("attention_bwd_dq"), launches("layer_norm_fwd"), \
            launches("layer_norm_bwd"), launches("ffn_matmul", 4):
        compare(model, ref, inputs)
    restored = unpatch(model)
    assert len(restored) == len(report.replaced)
    assert model.config._attn_implementation == "sdpa"
    assert all(type(m) is type(r) for m, r in zip(model.modules(), ref.modules()))
    assert_same_state(model, snap)
    return report


def test_gpt2(device, launches):
    torch.manual_seed(0)
    report = patch_and_check(gpt2().to(device), hf.apply_kernels_to_gpt2, tokens(device), launches,
                             {"attn_implementation='sdpa'": 1, "nn.LayerNorm": 5, "transformers.GPT2MLP": 2})
    assert "gelu_tanh" in str(report)


def test_bert_padded_batch(device, launches):
    torch.manual_seed(0)
    patch_and_check(bert().to(device), hf.apply_kernels_to_bert, tokens(device, padded=True), launches,
                    {"attn_implementation='sdpa'": 1, "nn.LayerNorm": 6, "transformers.BertLayer": 2,
                     "transformers.BertSelfOutput": 2})


def test_llama_padded_batch_gqa(device, launches):
    torch.manual_seed(0)
    patch_and_check(llama().to(device), hf.apply_kernels_to_llama, tokens(device, padded=True), launches,
                    {"attn_implementation='sdpa'": 1, "transformers.LlamaRMSNorm": 5, "transformers.LlamaMLP": 2})


def test_generate_with_kv_cache(device, launches):
    """Greedy decoding: prefill with a padding mask, then one query against the cache per step."""
    torch.manual_seed(0)
    model = llama().to(device).eval()
    ref = copy.deepcopy(model)
    hf.apply_kernels(model)
    inputs = tokens(device, batch=2, seqlen=5)
    inputs["attention_mask"][0, :2] = 0  # left padding, as generation pads
    assert_same_greedy(model, ref, inputs, launches)


def test_applying_twice_changes_nothing_more(device):
    model = gpt2().to(device)
    first = hf.apply_kernels(model)
    second = hf.apply_kernels(model)
    assert len(first.replaced) == 8 and second.replaced == []
    reasons = {e.reason for e in second.left_alone}
    assert "already uses kernels' attention" in reasons and "already patched" in reasons
    assert len(unpatch(model)) == 8


def test_entry_points_check_the_model_type(device):
    with pytest.raises(ValueError, match="model_type"):
        hf.apply_kernels_to_llama(gpt2())
    with pytest.raises(TypeError, match="nn.Module"):
        hf.apply_kernels(object())


def test_other_attention_implementations_are_left_alone(device):
    model = gpt2().to(device)
    model.set_attn_implementation("eager")
    report = hf.apply_kernels(model, layer_norm=False, ffn=False)
    assert report.replaced == []
    entry = next(e for e in report.left_alone if e.original == "attn_implementation='eager'")
    assert "only 'sdpa'" in entry.reason
    assert model.config._attn_implementation == "eager"


class LookalikeRMSNorm(nn.Module):
    """Named like a norm, computes something else: must be left alone."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states):
        return hidden_states * self.weight


def test_norms_are_recognized_by_code(device, launches):
    """Qwen2's RMSNorm is LlamaRMSNorm's code ("Copied from"): patched. Gemma's computes (1 + weight) in
    fp32: patched by its own rule. A look-alike with other math: left alone, with the reason."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    torch.manual_seed(0)
    model = nn.Sequential(Qwen2RMSNorm(16), GemmaRMSNorm(16), LookalikeRMSNorm(16)).to(device)
    with torch.no_grad():
        model[0].weight.normal_(), model[1].weight.normal_()
    ref = copy.deepcopy(model)
    report = hf.apply_kernels(model)
    assert report.paths() == ["0", "1"]
    assert "not LlamaRMSNorm's code" in next(e.reason for e in report.left_alone if e.path == "2")
    x = torch.randn(3, 16, device=device)
    with launches("layer_norm_fwd", 2):
        assert_match(model(x), ref(x))


def test_dropout_in_training_reproduces_the_unpatched_model(device):
    """Attention dropout runs torch's SDPA and the MLP's dropout stays a module: same seed, same logits."""
    torch.manual_seed(0)
    model = gpt2(attn_pdrop=0.2, resid_pdrop=0.2).to(device).train()
    ref = copy.deepcopy(model)
    hf.apply_kernels(model)
    inputs = tokens(device)
    torch.manual_seed(1)
    logits = model(**inputs).logits
    torch.manual_seed(1)
    assert_match(logits, ref(**inputs).logits)
    assert tk.last_path("layer_norm") == "triton" and tk.last_path("ffn") == "triton"


def test_override_sdpa_reaches_the_sdpa_attention(device, launches):
    """transformers' own "sdpa" attention looks F.scaled_dot_product_attention up at call time."""
    torch.manual_seed(0)
    model = llama().to(device).eval()
    inputs = tokens(device, padded=True)
    with torch.no_grad():
        want = model(**inputs).logits
        with launches("attention_fwd", 2), override_sdpa():
            got = model(**inputs).logits
    assert_match(got, want)


def test_registered_name_works_with_set_attn_implementation(device):
    assert hf.register() == hf.ATTENTION_NAME
    model = bert().to(device).eval()
    ref = copy.deepcopy(model)
    model.set_attn_implementation(hf.ATTENTION_NAME)
    inputs = tokens(device, padded=True)
    with torch.no_grad():
        assert_match(model(**inputs).logits, ref(**inputs).logits)
    assert tk.last_path("attention") == "triton"


def test_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import transformer_kernels, transformer_kernels.hf, transformer_kernels.patching\n"
            "try:\n    transformer_kernels.hf.apply_kernels(transformer_kernels.LayerNorm(4))\n"
            "except ImportError as e:\n    print('ImportError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ImportError" in out.stdout and "transformers" in out.stdout


@pytest.mark.parametrize("make,apply", [(llama, hf.apply_kernels_to_llama), (gpt2, hf.apply_kernels_to_gpt2),
                                        (bert, hf.apply_kernels_to_bert)], ids=["llama", "gpt2", "bert"])
def test_patched_model_compiles_without_graph_breaks(device, launches, make, apply):
    """torch.compile(fullgraph=True) takes a patched model whole: the patched forwards look nothing up
    per call (transformers' modules are resolved at patch time), and the kernels are custom ops. The
    compiled model runs our kernels and gives the eager logits and gradients."""
    torch.manual_seed(0)
    model = make().to(device).eval()
    apply(model)
    inputs = tokens(device, padded=make is bert)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with launches("attention_fwd"), launches("ffn_matmul"):
        compare(compiled, ref, inputs)


def test_patched_models_pickle_and_load_in_a_fresh_process(device, tmp_path):
    """torch.save(model) of patched Llama, GPT-2 and BERT (classes made at patch time) loads here and in
    a new process, with the same classes, the registered attention and the same logits."""
    torch.manual_seed(0)
    inputs = tokens("cpu", padded=True)
    torch.save(inputs, tmp_path / "inputs.pt")
    for make, apply in ((llama, hf.apply_kernels_to_llama), (gpt2, hf.apply_kernels_to_gpt2),
                        (bert, hf.apply_kernels_to_bert)):
        model = make().eval()
        apply(model)
        names = [type(m).__name__ for m in model.modules()]
        assert any(n.startswith("Kernels") and n != "KernelsLayerNorm" for n in names)  # a transformers class
        copied = copy.deepcopy(model)
        assert [type(m).__name__ for m in copied.modules()] == names
        path = tmp_path / f"{make.__name__}.pt"
        torch.save(model, path)
        with torch.no_grad():
            want = model(**inputs).logits
        torch.save(want, tmp_path / "want.pt")
        code = ("import torch\n"
                f"m = torch.load({str(path)!r}, weights_only=False)\n"
                f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
                "with torch.no_grad():\n    got = m(**inputs).logits\n"
                f"want = torch.load({str(tmp_path / 'want.pt')!r})\n"
                "torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)\n"
                "print(m.config._attn_implementation, ','.join(type(x).__name__ for x in m.modules()))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
        assert out.returncode == 0, out.stderr[-2000:]
        implementation, loaded = out.stdout.strip().split(" ", 1)
        assert implementation == hf.ATTENTION_NAME and loaded.split(",") == names


@pytest.mark.parametrize("imports", ["import transformer_kernels, transformers", "import transformers, transformer_kernels"])
def test_attention_is_registered_in_either_import_order(imports):
    """attn_implementation="kernels_sdpa" needs no register() call, whichever of kernels and
    transformers is imported first; import transformer_kernels alone does not import transformers."""
    code = ("import sys\n"
            "import transformer_kernels\n"
            "assert ('transformers' in sys.modules) == " + str(imports.startswith("import transformers")) + "\n"
            f"{imports}\n"
            "config = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32,"
            " num_hidden_layers=1, num_attention_heads=2)\n"
            "m = transformers.LlamaForCausalLM._from_config(config, attn_implementation='kernels_sdpa')\n"
            "print(m.config._attn_implementation)\n")
    if imports.startswith("import transformers"):
        code = "import transformers\n" + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == hf.ATTENTION_NAME


def gpt_neox():
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=32, hidden_dropout=0.0,
                                        attention_dropout=0.0, eos_token_id=0, bos_token_id=0)
    return transformers.GPTNeoXForCausalLM(config)


def phi3():
    config = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                     pad_token_id=0, eos_token_id=0, bos_token_id=0)
    return transformers.Phi3ForCausalLM(config)


def test_gpt_neox_mlp(device, launches):
    """GPTNeoXMLP (dense_h_to_4h, GELU, dense_4h_to_h) as one transformer_kernels.ffn call; logits and gradients
    equal the unpatched model's."""
    torch.manual_seed(0)
    patch_and_check(gpt_neox().to(device), hf.apply_kernels, tokens(device, padded=True), launches,
                    {"attn_implementation='sdpa'": 1, "nn.LayerNorm": 5, "transformers.GPTNeoXMLP": 2})


def test_phi3_fused_gate_up_mlp(device, launches):
    """Phi3MLP's fused gate_up_proj as one gated transformer_kernels.ffn call on the weight's two row halves (the
    gradient reaches the fused weight); logits and gradients equal the unpatched model's."""
    torch.manual_seed(0)
    patch_and_check(phi3().to(device), hf.apply_kernels, tokens(device, padded=True), launches,
                    {"attn_implementation='sdpa'": 1, "transformers.Phi3MLP": 2, "transformers.Phi3RMSNorm": 5})


def _gemma(version, **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=32, head_dim=8, pad_token_id=0, eos_token_id=0,
              bos_token_id=0)
    kw.update(overrides)
    prefix = "Gemma" if version == 1 else "Gemma2"
    model = getattr(transformers, f"{prefix}ForCausalLM")(getattr(transformers, f"{prefix}Config")(**kw))
    with torch.no_grad():  # Gemma's norm weights start at 0 (scale 1 + w): give them values
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model


def test_gemma_rms_norm_and_mlp(device, launches):
    """GemmaRMSNorm's ``x * (1 + w)`` computed in fp32 runs transformer_kernels.rms_norm with the weight 1 + w; Gemma's
    MLP (Llama's code) the gated FFN; logits and gradients (the norm weights' included) equal the
    unpatched model's."""
    torch.manual_seed(0)
    patch_and_check(_gemma(1).to(device), hf.apply_kernels, tokens(device, padded=True), launches,
                    {"attn_implementation='sdpa'": 1, "transformers.GemmaRMSNorm": 5, "transformers.GemmaMLP": 2})


def test_gemma2_soft_capped_sliding_attention_norms_and_mlps(device, launches):
    """Gemma 2 (logit soft-capping, which transformers' 'sdpa' refuses, so it runs 'eager'): patch
    switches it to our attention, which caps in the kernel; a sliding layer (window 4 < 8 tokens) and a
    full layer; its four norms per layer and MLPs on our kernels. Logits and gradients equal eager's,
    greedy generation with left padding is token-identical, unpatch restores 'eager' exactly."""
    torch.manual_seed(0)
    model = _gemma(2, attn_logit_softcapping=5.0, sliding_window=4).to(device).eval()
    assert model.config._attn_implementation == "eager" and model.config.layer_types[0] == "sliding_attention"
    ref = copy.deepcopy(model)
    snap = snapshot(model)
    report = hf.apply_kernels(model)
    replaced = [e.original for e in report.replaced]
    assert replaced.count("transformers.Gemma2RMSNorm") == 9 and replaced.count("transformers.Gemma2MLP") == 2
    assert replaced.count("attn_implementation='eager'") == 1 and "soft-capping at 5.0" in str(report)
    with launches("attention_fwd", 2), launches("attention_bwd_dq", 2), launches("layer_norm_fwd"), \
            launches("ffn_matmul", 4):
        compare(model, ref, tokens(device, padded=True))
    assert tk.last_path("attention") == "triton"
    inputs = tokens(device, batch=2, seqlen=6)
    inputs["attention_mask"][0, :2] = 0  # left padding: a sliding layer's window moves past the prompt
    assert_same_greedy(model, ref, inputs, launches)
    unpatch(model)
    assert model.config._attn_implementation == "eager" and "_supports_sdpa" not in vars(model)
    assert all(type(m) is type(r) for m, r in zip(model.modules(), ref.modules()))
    assert_same_state(model, snap)


def test_clip_quick_gelu_mlp(device, launches):
    """CLIP's text MLP (fc1, quick_gelu = x sigmoid(1.702 x), fc2) runs transformer_kernels.ffn("quick_gelu"); the
    patched text model's hidden states and gradients equal the unpatched one's."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=32, hidden_act="quick_gelu",
                                         pad_token_id=0, bos_token_id=0, eos_token_id=1)
    model = transformers.CLIPTextModel(config).to(device).eval()
    ref = copy.deepcopy(model)
    report = hf.apply_kernels(model)
    replaced = [e.original for e in report.replaced]
    assert replaced.count("transformers.CLIPMLP") == 2 and "quick_gelu" in str(report)
    inputs = tokens(device)
    with launches("ffn_matmul", 4), launches("layer_norm_fwd"):
        out, want = model(**inputs).last_hidden_state, ref(**inputs).last_hidden_state
        assert_match(out, want, "hidden states")
        cotangent = torch.randn_like(want)
        (out * cotangent).sum().backward()
        (want * cotangent).sum().backward()
    assert_grads_match(model, ref)


def t5(feed_forward_proj="relu"):
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   feed_forward_proj=feed_forward_proj, dropout_rate=0.0, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_t5_norms_feed_forward_and_attention_with_learned_bias(device, launches, feed_forward_proj):
    """T5's RMS T5LayerNorm runs transformer_kernels.rms_norm; T5DenseActDense (ReLU) and T5DenseGatedActDense
    (GeGLU, tanh form) run transformer_kernels.ffn; its attention (self, causal self with padding, cross) runs our
    kernel with the learned relative position bias as an additive mask, whose gradient the dQ kernel
    writes: logits and every gradient, the bias table's included, equal the unpatched model's."""
    torch.manual_seed(0)
    model = t5(feed_forward_proj).to(device).eval()
    ref = copy.deepcopy(model)
    report = hf.apply_kernels(model)
    replaced = [e.original for e in report.replaced]
    dense = "transformers.T5DenseGatedActDense" if feed_forward_proj.startswith("gated") else \
        "transformers.T5DenseActDense"
    assert replaced.count(dense) == 4 and replaced.count("transformers.T5LayerNorm") == 12
    assert model.config._attn_implementation == hf.ATTENTION_NAME
    inputs = dict(tokens(device, padded=True), decoder_input_ids=torch.randint(0, VOCAB, (2, 5), device=device))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*falling back")  # the bias requires grad, stays on the kernel
        with launches("ffn_matmul", 8), launches("layer_norm_fwd", 12), launches("attention_fwd", 6), \
                launches("attention_bwd_dq", 6):
            compare(model, ref, inputs)
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def _t5_gradient_errors(model, inputs, freeze_bias):
    """Relative error against the model in float64, of the logits and of each parameter's gradient
    (floored at 1e-3 of the largest gradient's norm), for one random cotangent."""
    def run(m):
        for n, p in m.named_parameters():
            p.grad = None
            p.requires_grad_(not (freeze_bias and "relative_attention_bias" in n))
        out = m(**inputs).logits
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * cot.to(device=out.device, dtype=out.dtype)).sum().backward()
        return out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    out64, grads64 = run(copy.deepcopy(model).double())
    floor = 1e-3 * max(g.norm().item() for g in grads64.values())
    out, grads = run(model)
    errors = {"logits": ((out.double() - out64).norm() / out64.norm()).item()}
    errors.update({n: ((grads[n].double() - g).norm() / max(g.norm().item(), floor)).item() for n, g in grads64.items()})
    return errors


@pytest.mark.parametrize("freeze_bias", [False, True])
def test_t5_large_logits_fp32_errors_within_torchs_own_spread(device, freeze_bias):
    """Issue 20's model: T5 with initializer_factor 5 (unscaled logits up to ~2700), padded encoder and
    decoder batches, fp32, against itself in float64. Before the fix, q/k gradients were 10^3x torch's
    error (44x in the issue's run). At these logits fp32 is ill-conditioned: torch's own error moves by up
    to 42x when every weight is nudged by one ulp (the same model to fp32), so a single torch run is no
    yardstick. The rule: every error of the patched model within 2x the worst of torch's on the model and
    on two such nudged copies (each against its own float64 reference)."""
    torch.manual_seed(1)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64,
                                   initializer_factor=5.0, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).to(device).eval()
    inputs = dict(tokens(device, padded=True, seqlen=9), decoder_input_ids=torch.randint(1, VOCAB, (2, 7), device=device),
                  decoder_attention_mask=torch.ones(2, 7, dtype=torch.long, device=device))
    inputs["decoder_attention_mask"][1, 5:] = 0
    torch_errors = [_t5_gradient_errors(copy.deepcopy(model), inputs, freeze_bias)]
    for k in range(2):
        nudged = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1000 + k)
        with torch.no_grad():
            for p in nudged.parameters():
                p.mul_(1 + 1.2e-7 * torch.randn(p.shape, generator=g).to(device))
        torch_errors.append(_t5_gradient_errors(nudged, inputs, freeze_bias))
    patched = copy.deepcopy(model)
    hf.apply_kernels(patched)
    ours = _t5_gradient_errors(patched, inputs, freeze_bias)
    assert tk.launch_count("attention_bwd_dq") > 0
    for name, err in ours.items():
        spread = max(e[name] for e in torch_errors)
        assert err <= 2 * spread, f"{name}: error {err:.2e}, torch's {torch_errors[0][name]:.2e} (spread {spread:.2e})"


def test_t5_trains_under_fullgraph_compile(device, launches):
    """Issue 13: patched T5 with gradients compiles whole (0 graph breaks), runs our kernels and gives
    eager's logits and gradients."""
    torch.manual_seed(0)
    model = t5().to(device).eval()
    hf.apply_kernels(model)
    inputs = dict(tokens(device, padded=True), decoder_input_ids=torch.randint(0, VOCAB, (2, 5), device=device))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with launches("attention_fwd"), launches("attention_bwd_dq"), launches("ffn_matmul"):
        compare(compiled, ref, inputs)


def test_vit_mlp_layer_norms_and_attention(device, launches):
    """ViT (image inputs): ViTMLP, proven to run CLIPMLP's code, on transformer_kernels.ffn('gelu'); its LayerNorms and
    attention on ours; logits and gradients equal the unpatched model's; unpatch restores it exactly."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4, num_channels=3, num_labels=5)
    pixels = dict(pixel_values=torch.randn(2, 3, 16, 16, device=device))
    patch_and_check(transformers.ViTForImageClassification(config).to(device), hf.apply_kernels, pixels, launches,
                    {"attn_implementation='sdpa'": 1, "transformers.ViTMLP": 2, "nn.LayerNorm": 5})


def gpt_oss():
    """A tiny gpt-oss: attention sinks (random, not the zero init), sliding and full layers, MoE experts."""
    config = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                       num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
                                       pad_token_id=0, eos_token_id=0, bos_token_id=0)
    model = transformers.GptOssForCausalLM(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "sinks", None), nn.Parameter):
                module.sinks.normal_(0.0, 1.0)
    return model


def test_gpt_oss_attention_sinks(device, launches):
    """gpt-oss (learnable sinks per head passed as ``s_aux``, which transformers' 'sdpa' cannot run, so
    it runs 'eager'): patch switches it to our attention, whose kernel takes the sinks; logits and every
    gradient, the sinks' included, equal eager's; greedy generation is token-identical; unpatch
    restores 'eager'."""
    torch.manual_seed(0)
    model = gpt_oss().to(device).eval()
    assert model.config._attn_implementation == "eager"
    ref = copy.deepcopy(model)
    report = hf.apply_kernels(model)
    assert model.config._attn_implementation == hf.ATTENTION_NAME and "attention sinks (s_aux)" in str(report)
    with launches("attention_fwd", 2), launches("attention_bwd_dq", 2):
        compare(model, ref, tokens(device))
    sinks = model.model.layers[0].self_attn.sinks
    assert sinks.grad is not None and sinks.grad.abs().sum() > 0
    inputs = tokens(device, batch=2, seqlen=5)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with launches("attention_fwd", 2 * 4):
        out = model.generate(**inputs, **kwargs)
    assert torch.equal(out, ref.generate(**inputs, **kwargs))
    unpatch(model)
    assert model.config._attn_implementation == "eager"


def _small_cache():
    """A few pages: transformers otherwise sizes its cache to the free memory (seconds on a CPU)."""
    return transformers.ContinuousBatchingConfig(num_blocks=16, page_size=16, max_batch_tokens=64)


def test_continuous_batching_generates_the_sdpa_tokens_on_our_kernels(device, launches):
    """transformers' continuous batching (``generate_batch``) with ``hf.FLASH_ATTENTION_NAME``: prompts of
    different lengths packed into one varlen batch per step, the KV cache in transformers' pages; greedy
    tokens equal the 'sdpa' implementation's. (On CPU transformers reads the cache by index and calls
    our varlen function; its block-table decode path, CUDA only, is the next test's.)"""
    torch.manual_seed(0)
    model = llama().to(device).eval()
    ref = copy.deepcopy(model)
    hf.register()
    model.set_attn_implementation(hf.FLASH_ATTENTION_NAME)
    prompts = [[5, 9, 12, 3], [7, 1], [2, 8, 30, 31, 40, 17, 6]]
    config = transformers.GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=VOCAB + 1, pad_token_id=0)
    with launches("attention_fwd", 2 * 4):
        out = model.generate_batch(prompts, generation_config=config, progress_bar=False, warmup=False,
                                   continuous_batching_config=_small_cache())
    assert tk.last_path("attention") == "triton"
    want = ref.generate_batch(prompts, generation_config=config, progress_bar=False, warmup=False,
                              continuous_batching_config=_small_cache())
    assert sorted(out) == sorted(want)
    for request in out:
        assert out[request].generated_tokens == want[request].generated_tokens, request


def test_continuous_batching_with_attention_sinks_and_sliding_windows(device, launches):
    """gpt-oss under continuous batching on our flash interface (``hf.set_flash_attention``: gpt-oss
    lists the flash implementations that take its sinks): the sinks and the sliding layers' windows go to
    our varlen kernel; greedy tokens equal the eager implementation's ('paged|eager')."""
    torch.manual_seed(0)
    model = gpt_oss().to(device).eval()
    ref = copy.deepcopy(model)
    assert hf.set_flash_attention(model) == model.config._attn_implementation == hf.FLASH_ATTENTION_NAME
    prompts = [[5, 9, 12, 3, 4, 5, 6], [7, 1]]  # 7 tokens: past the window of 4
    config = transformers.GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=VOCAB + 1, pad_token_id=0)
    with launches("attention_fwd", 2 * 3):
        out = model.generate_batch(prompts, generation_config=config, progress_bar=False, warmup=False,
                                   continuous_batching_config=_small_cache())
    want = ref.generate_batch(prompts, generation_config=config, progress_bar=False, warmup=False,
                              continuous_batching_config=_small_cache())
    for request in want:
        assert out[request].generated_tokens == want[request].generated_tokens, request


def test_flash_interface_paged_decode_writes_pages_and_attends(device, launches):
    """The call transformers makes on continuous batching's decode path: one new token per sequence,
    ``block_table``, ``k_cache``/``v_cache`` page pools and ``cu_seq_lens_k``; our flash_attn_with_kvcache
    appends into the pages and attends, against a float64 reference on the gathered pages."""
    torch.manual_seed(0)
    hf.register()
    heads, heads_k, dim, page_size, past = 4, 2, 16, 4, [5, 9, 2]
    module = nn.Linear(dim, dim).to(device)  # an attention layer's attributes, as transformers reads them
    module.is_causal, module.layer_idx = True, 0
    module.config = types.SimpleNamespace(_attn_implementation=hf.FLASH_ATTENTION_NAME)
    num_pages, max_pages = 12, 3
    k_cache, v_cache = (torch.randn(num_pages, page_size, heads_k, dim, device=device) for _ in range(2))
    table = torch.randperm(num_pages, device=device)[:3 * max_pages].reshape(3, max_pages).to(torch.int32)
    cu_k = torch.tensor([0, 6, 16, 19], dtype=torch.int32, device=device)  # past + 1 new token each
    q = torch.randn(1, heads, 3, dim, device=device)
    k, v = (torch.randn(1, heads_k, 3, dim, device=device) for _ in range(2))
    before = k_cache.clone(), v_cache.clone()
    with launches("attention_fwd"):
        out, _ = hf.flash_attention_forward(module, q, k, v, None, scaling=dim ** -0.5, block_table=table,
                                            k_cache=k_cache, v_cache=v_cache, cu_seq_lens_q=cu_k[:4].clone(),
                                            cu_seq_lens_k=cu_k, max_length_q=1, max_length_k=1)
    for b, n in enumerate(past):
        keys = before[0][table[b].long()].flatten(0, 1)[:n + 1].clone()
        values = before[1][table[b].long()].flatten(0, 1)[:n + 1].clone()
        keys[n], values[n] = k[0, :, b], v[0, :, b]
        want = attention_reference(q[0, :, b:b + 1].double(), keys.transpose(0, 1).double(),
                                   values.transpose(0, 1).double(), causal=True, bottom_right=True)
        torch.testing.assert_close(out[0, b].double(), want[:, 0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(k_cache[table[b].long()].flatten(0, 1)[n], k[0, :, b])
