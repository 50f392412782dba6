"""Tests of transformer/: the two backends agree and the Triton one really runs the kernels, state_dicts
cross backends, the masks are right, training reduces the loss, bad arguments raise ValueError.

Shapes are tiny (d_model 32, 2 heads, vocab 50) because on a CPU the Triton kernels run through
Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import transformer_kernels as tk
from transformer import (
    Transformer,
    TransformerConfig,
    TransformerLM,
    compute_loss,
    copy_task_batch,
    train_step,
)

VOCAB = 50
TRITON_KERNELS = ("attention_fwd", "attention_bwd_dq", "layer_norm_fwd", "layer_norm_bwd", "ffn_matmul")


def tiny_config(**overrides) -> TransformerConfig:
    fields = dict(vocab_size=VOCAB, d_model=32, num_heads=2, d_ff=64, num_encoder_layers=1,
                  num_decoder_layers=2, dropout=0.0, max_len=32)
    return TransformerConfig(**{**fields, **overrides})


def perturb_(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter off its initial value (LayerNorm 1/0, zero biases) so all of them matter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(batch: int, seqlen: int, device="cpu") -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seqlen), device=device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def logits_and_grads(model, inputs):
    """Logits and every parameter's gradient of <logits, fixed random cotangent>."""
    model.zero_grad(set_to_none=True)
    logits = model(*inputs)
    torch.manual_seed(1234)
    cotangent = torch.randn(logits.shape, device=logits.device, dtype=logits.dtype)
    (logits * cotangent).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def launches() -> dict[str, int]:
    return {k: tk.launch_count(k) for k in TRITON_KERNELS}


def assert_backends_match(model, inputs):
    """Run ``model`` on the Triton backend, switch it to torch, run again: same logits and gradients,
    the Triton kernels launched only in the first run."""
    before = launches()
    out_triton, grads_triton = logits_and_grads(model.set_backend("triton"), inputs)
    after_triton = launches()
    for kernel in TRITON_KERNELS:
        assert after_triton[kernel] > before[kernel], f"Triton kernel {kernel} did not run"
    assert all(tk.last_path(op) == "triton" for op in ("attention", "layer_norm", "ffn"))

    out_torch, grads_torch = logits_and_grads(model.set_backend("torch"), inputs)
    assert launches() == after_triton, "the torch backend launched a Triton kernel"
    assert model.backend == "torch"

    assert rel_err(out_triton, out_torch) < 1e-4
    # Some gradients are analytically zero (a key bias shifts every score of a query equally, which the
    # softmax ignores), so relative error gets a floor at a millionth of the largest gradient.
    floor = 1e-6 * max(g.norm().item() for g in grads_torch.values())
    for name, g_ref in grads_torch.items():
        err = (grads_triton[name] - g_ref).norm().item()
        assert err <= 1e-4 * g_ref.norm().item() + floor, f"{name}: gradient differs by {err}"


# ---------------------------------------------------------------------------------------------------
# Triton backend == torch backend
# ---------------------------------------------------------------------------------------------------
def test_encoder_decoder_backends_match(device):
    model = perturb_(Transformer(tiny_config()).to(device).eval())
    assert_backends_match(model, (tokens(2, 9, device), tokens(2, 13, device)))


def test_lm_backends_match(device):
    model = perturb_(TransformerLM(tiny_config(activation="gelu")).to(device).eval())
    assert_backends_match(model, (tokens(2, 13, device),))


def test_state_dict_loads_across_backends(device):
    cfg = tiny_config()
    triton_model = perturb_(Transformer(cfg).to(device).eval())
    torch_model = Transformer(dataclasses.replace(cfg, backend="torch")).to(device).eval()
    assert triton_model.state_dict().keys() == torch_model.state_dict().keys()
    torch_model.load_state_dict(triton_model.state_dict())  # strict

    src, tgt = tokens(2, 9, device), tokens(2, 13, device)
    with torch.no_grad():
        assert rel_err(triton_model(src, tgt), torch_model(src, tgt)) < 1e-4


def test_parameter_names():
    state = Transformer(tiny_config()).state_dict()
    keys = set(state)
    for key in ("embedding.weight",
                "encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.out_proj.bias",
                "encoder.layers.0.ffn.linear1.weight", "encoder.layers.0.ffn.linear2.bias",
                "encoder.layers.0.norm2.weight", "decoder.layers.1.cross_attn.k_proj.weight",
                "decoder.layers.1.norm3.bias"):
        assert key in keys
    assert not any(k.endswith(".pe") for k in keys)  # the positional encoding is not a parameter
    assert [k for k, v in state.items() if v.shape[0] == VOCAB] == ["embedding.weight"]  # tied output
    lm_keys = set(TransformerLM(tiny_config()).state_dict())
    assert "layers.1.ffn.linear1.weight" in lm_keys and not any("cross_attn" in k for k in lm_keys)


def test_output_projection_is_tied_to_embedding():
    model = Transformer(tiny_config(backend="torch"))
    src, tgt = tokens(2, 5).clamp(min=1), tokens(2, 6).clamp(min=1)  # token 0 is never embedded...
    model(src, tgt).logsumexp(-1).sum().backward()
    assert model.embedding.weight.grad[0].abs().sum() > 0  # ...so its gradient comes from the output projection


# ---------------------------------------------------------------------------------------------------
# Masks, embeddings and positional encoding
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decoder_sees_no_future_tokens(backend, device):
    model = perturb_(Transformer(tiny_config(backend=backend)).to(device).eval())
    lm = perturb_(TransformerLM(tiny_config(backend=backend)).to(device).eval())
    src, tgt = tokens(2, 9, device), tokens(2, 13, device)
    changed = tgt.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % VOCAB  # change positions 8.. only
    with torch.no_grad():
        for a, b in ((model(src, tgt), model(src, changed)), (lm(tgt), lm(changed))):
            torch.testing.assert_close(a[:, :8], b[:, :8])
            assert (a[:, 8:] - b[:, 8:]).abs().amax(-1).min() > 0


def test_decoder_attends_to_every_source_token():
    model = perturb_(Transformer(tiny_config(backend="torch")).eval())
    src, tgt = tokens(2, 9), tokens(2, 13)
    with torch.no_grad():
        base = model(src, tgt)
        for pos in (0, 8):
            changed = src.clone()
            changed[:, pos] = (changed[:, pos] + 1) % VOCAB
            assert (model(src=changed, tgt=tgt) - base).abs().amax(-1).min() > 0


def test_embedding_scale_and_positional_encoding():
    cfg = tiny_config(backend="torch")
    model = Transformer(cfg)
    pe = model.positional_encoding.pe
    pos, i = torch.arange(cfg.max_len)[:, None], torch.arange(0, cfg.d_model, 2)[None, :]
    angle = pos / 10000 ** (i / cfg.d_model)
    torch.testing.assert_close(pe[:, 0::2], torch.sin(angle))
    torch.testing.assert_close(pe[:, 1::2], torch.cos(angle))

    ids = tokens(2, 7)
    expected = model.embedding(ids) * math.sqrt(cfg.d_model) + pe[:7]
    torch.testing.assert_close(model.eval().embed(ids), expected)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_class", [Transformer, TransformerLM])
def test_training_steps_reduce_loss(model_class):
    torch.manual_seed(0)
    model = model_class(tiny_config(backend="torch"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    src, tgt = copy_task_batch(4, 9, VOCAB)
    batch = (src, tgt) if model_class is Transformer else torch.cat([src, tgt], dim=1)
    losses = [train_step(model, batch, optimizer) for _ in range(20)]
    assert all(isinstance(loss, float) and math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_step_on_triton_backend_with_dropout(device):
    model = Transformer(tiny_config(dropout=0.1)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    launched = tk.launch_count("attention_bwd_dq")
    loss = train_step(model, copy_task_batch(2, 9, VOCAB, device=device), optimizer, label_smoothing=0.1)
    assert math.isfinite(loss) and model.training
    assert tk.launch_count("attention_bwd_dq") > launched
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if not n.endswith("k_proj.bias"))


def test_compute_loss_is_teacher_forced_cross_entropy():
    model = Transformer(tiny_config(backend="torch")).eval()
    src, tgt = copy_task_batch(2, 9, VOCAB, reverse=True)
    assert torch.equal(tgt[:, 1:], src.flip(1)) and (tgt[:, 0] == 0).all()
    with torch.no_grad():
        logits = model(src, tgt[:, :-1])
        expected = F.cross_entropy(logits.reshape(-1, VOCAB), tgt[:, 1:].reshape(-1), label_smoothing=0.1)
        torch.testing.assert_close(compute_loss(model, (src, tgt), label_smoothing=0.1), expected)


# ---------------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=30, num_heads=4), "divisible"),
    (dict(backend="cuda"), "backend"),
    (dict(activation="swish"), "activation"),
    (dict(dropout=1.0), "dropout"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
])
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_bad_backend_or_inputs_raise():
    model = Transformer(tiny_config(backend="torch"))
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("cuda")
    assert model.backend == "torch"
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        model(tokens(2, 5), torch.full((2, 5), VOCAB))
    with pytest.raises(ValueError, match="max_len"):
        model(tokens(2, 33), tokens(2, 5))
    with pytest.raises(ValueError, match="batch size"):
        model(tokens(2, 5), tokens(3, 5))
    with pytest.raises(TypeError, match="int64"):
        model(torch.rand(2, 5), tokens(2, 5))


# --- presets, pre-norm, learned positions, padding, incremental decoding -----------------------------
def test_presets():
    from transformer import PRESETS, from_preset

    base = from_preset("base")
    assert (base.d_model, base.num_heads, base.d_ff, base.num_encoder_layers, base.dropout) == (512, 8, 2048, 6, 0.1)
    big = from_preset("big", vocab_size=1000)
    assert (big.d_model, big.num_heads, big.d_ff, big.dropout, big.vocab_size) == (1024, 16, 4096, 0.3, 1000)
    assert {"base", "big", "small", "tiny"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown preset"):
        from_preset("huge")


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_variants_match_across_backends(device, norm_first, positional):
    config = tiny_config(norm_first=norm_first, positional=positional)
    model = perturb_(Transformer(config)).to(device).eval()
    if norm_first:
        assert model.encoder.final_norm is not None and model.decoder.final_norm is not None
    assert_backends_match(model, (tokens(2, 9, device), tokens(2, 13, device)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_key_padding_masks(backend, device):
    """A padded row gives what the unpadded sequence gives alone, with explicit masks or config.pad_id."""
    pad = 0
    model = perturb_(Transformer(tiny_config(backend=backend, pad_id=pad))).to(device).eval()
    src, tgt = torch.randint(1, VOCAB, (2, 9), device=device), torch.randint(1, VOCAB, (2, 7), device=device)
    src[1, 6:] = pad
    tgt[1, 5:] = pad
    padded = model(src, tgt)
    alone = model(src[1:, :6], tgt[1:, :5])
    assert rel_err(padded[1:, :5], alone) < 1e-5
    explicit = model.set_backend(backend)(src, tgt, src_key_padding_mask=src != pad, tgt_key_padding_mask=tgt != pad)
    torch.testing.assert_close(explicit, padded)
    lm = perturb_(TransformerLM(tiny_config(backend=backend, pad_id=pad))).to(device).eval()
    seq = torch.randint(1, VOCAB, (2, 8), device=device)
    seq[0, 5:] = pad
    assert rel_err(lm(seq)[0, :5], lm(seq[:1, :5])[0]) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_incremental_decoding_equals_full_recompute(backend, norm_first, device):
    """With the KV cache each step feeds only the new tokens (a prompt chunk, then one at a time);
    the logits equal the full forward's (the triton backend runs flash_attn_with_kvcache)."""
    config = tiny_config(backend=backend, norm_first=norm_first)
    lm = perturb_(TransformerLM(config)).to(device).eval()
    seq = tokens(2, 11, device)
    cache = lm.init_cache(2, config.max_len)
    steps = [lm(seq[:, :5], cache=cache)] + [lm(seq[:, t:t + 1], cache=cache) for t in range(5, 11)]
    assert rel_err(torch.cat(steps, dim=1), lm(seq)) < 1e-5
    model = perturb_(Transformer(config)).to(device).eval()
    src, tgt = tokens(2, 9, device), tokens(2, 6, device)
    memory = model.encode(src)
    cache = model.init_cache(memory, config.max_len)
    steps = [model.decode(tgt[:, t:t + 1], memory, cache=cache) for t in range(6)]
    assert rel_err(torch.cat(steps, dim=1), model(src, tgt)) < 1e-5
    if backend == "triton":
        assert tk.last_path("attention") == "triton"
