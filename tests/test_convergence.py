"""Convergence with and without the kernels, in the style of Liger-Kernel's mini-model tests
(test/convergence/ in github.com/linkedin/Liger-Kernel): a tiny model trained for 30 AdamW steps twice
from the same initial weights on the same data -- once unpatched, once with ``transformer_kernels.hf.apply_kernels``
-- must produce the same loss at every step, end with the same weights, and learn (the loss falls).

Tolerances (fp32; the kernels compute true fp32 and differ from torch only in summation order):
per-step losses ``rtol=1e-5, atol=1e-8`` (Liger's fp32 loss tolerances; measured drift on CPU under the
interpreter: at most 1.4e-7 relative); all final weights together, relative error below 1e-4 (measured:
1.9e-5 for GPT-2, whose key bias gets only rounding noise as gradient -- softmax cancels it -- which
AdamW's normalization turns into steps of its own; 1e-7 for Llama). Dropout is 0 (a nonzero dropout
would run torch's code anyway, see test_hf.py).
"""
import pytest
import torch

import transformer_kernels as tk

transformers = pytest.importorskip("transformers")
from transformer_kernels import hf  # noqa: E402

STEPS = 30
BATCHES, BATCH, SEQLEN, VOCAB = 4, 2, 16, 64  # one layer, 32 tokens a step: ~0.8 s a step interpreted
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-8
WEIGHT_RTOL = 1e-4


def mini_gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQLEN, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # activation gelu_new: the "gelu_tanh" kernel


def mini_llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQLEN))  # GQA, RMSNorm, SwiGLU


def train(model, data):
    """``STEPS`` AdamW steps of causal-LM loss on ``data`` (cycled); returns the per-step losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    model.train()
    for step in range(STEPS):
        ids = data[step % len(data)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("build", [mini_gpt2, mini_llama], ids=["gpt2", "llama"])
def test_losses_agree_step_by_step(device, build):
    torch.manual_seed(0)
    baseline = build().to(device)
    patched = build().to(device)
    patched.load_state_dict(baseline.state_dict())  # same initial weights
    report = hf.apply_kernels(patched)
    assert len(report.replaced) == 5, str(report)  # attention, 3 norms, 1 MLP
    generator = torch.Generator().manual_seed(1)
    data = [torch.randint(0, VOCAB, (BATCH, SEQLEN), generator=generator).to(device) for _ in range(BATCHES)]

    expected = train(baseline, data)
    before = tk.launch_counts()
    actual = train(patched, data)
    ran = {k: v - before.get(k, 0) for k, v in tk.launch_counts().items()}
    for kernel in ("attention_fwd", "attention_bwd_dq", "layer_norm_fwd", "layer_norm_bwd", "ffn_matmul"):
        assert ran.get(kernel, 0) >= STEPS, f"{kernel} launched {ran.get(kernel, 0)} times in {STEPS} steps"

    torch.testing.assert_close(actual, expected, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert expected[-BATCHES:].mean() < 0.8 * expected[:BATCHES].mean(), f"did not learn: {expected.tolist()}"
    # All weights together: a key bias gets only rounding noise as gradient (softmax cancels it), which
    # AdamW's normalization turns into steps of its own, different in both runs, so no per-tensor bound.
    final = torch.cat([p.detach().double().flatten() for p in patched.parameters()])
    final_ref = torch.cat([p.detach().double().flatten() for p in baseline.parameters()])
    err = ((final - final_ref).norm() / final_ref.norm()).item()
    assert err < WEIGHT_RTOL, f"final weights differ by {err:.2e}"
