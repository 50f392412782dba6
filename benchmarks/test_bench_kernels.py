"""pytest-benchmark fixtures for the kernels, for users who keep a history of timings.

    pytest benchmarks/ --benchmark-only                       # time everything available here
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # and save the run
    pytest benchmarks/ --benchmark-only --benchmark-compare   # against the last saved run

Each timed function synchronizes CUDA before returning, so the timer sees the GPU's work. Our kernels
are timed on CUDA only (on a CPU they would run in Triton's interpreter, or fall back to PyTorch); the
PyTorch peers are timed everywhere. ``python -m benchmarks`` is the full suite with reports.
"""

import pytest
import torch
import torch.nn.functional as F

import transformer_kernels as tk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
OURS = pytest.mark.skipif(DEVICE != "cuda", reason="our Triton kernels are timed on CUDA only")


def _synced(fn):
    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def _attention_inputs():
    batch, heads, seqlen, head_dim = (2, 16, 4096, 128) if DEVICE == "cuda" else (1, 4, 256, 64)
    return [torch.randn(batch, heads, seqlen, head_dim, device=DEVICE, dtype=DTYPE, requires_grad=True)
            for _ in range(3)]


@pytest.mark.parametrize("impl", [pytest.param("ours", marks=OURS), "torch"])
def test_attention_forward_backward(benchmark, impl):
    q, k, v = _attention_inputs()
    sdpa = tk.scaled_dot_product_attention if impl == "ours" else F.scaled_dot_product_attention
    dout = torch.randn_like(q)
    benchmark(_synced(lambda: sdpa(q, k, v, is_causal=True).backward(dout)))


@pytest.mark.parametrize("impl", [pytest.param("ours", marks=OURS), "torch"])
def test_layer_norm_forward_backward(benchmark, impl):
    rows, width = (8192, 4096) if DEVICE == "cuda" else (512, 1024)
    x = torch.randn(rows, width, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = torch.ones(width, device=DEVICE, dtype=DTYPE, requires_grad=True)
    norm = tk.layer_norm if impl == "ours" else F.layer_norm
    dy = torch.randn_like(x)
    benchmark(_synced(lambda: norm(x, (width,), w).backward(dy)))


@pytest.mark.parametrize("impl", [pytest.param("ours", marks=OURS), "torch"])
def test_ffn_forward_backward(benchmark, impl):
    tokens, d_model = (8192, 2048) if DEVICE == "cuda" else (256, 128)
    make = lambda *s: (torch.randn(*s, device=DEVICE, dtype=DTYPE) / s[-1] ** 0.5).requires_grad_()  # noqa: E731
    x, w1, w2 = make(tokens, d_model), make(4 * d_model, d_model), make(d_model, 4 * d_model)
    dy = torch.randn(tokens, d_model, device=DEVICE, dtype=DTYPE)
    if impl == "ours":
        step = lambda: tk.ffn(x, w1, None, w2, None, "gelu_tanh").backward(dy)  # noqa: E731
    else:
        step = lambda: F.linear(F.gelu(F.linear(x, w1), approximate="tanh"), w2).backward(dy)  # noqa: E731
    benchmark(_synced(step))
