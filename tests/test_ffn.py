"""The FFN family (kernels/transformer_kernels/ffn.py) against a float64 reference, forward and backward."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import transformer_kernels as tk
from transformer_kernels.ffn import ACTIVATIONS, GATED_ACTIVATIONS, ffn_reference, matmul
from helpers import assert_close, poisoned


def _params(d_model, d_ff, dtype, device, bias=True, gated=False):
    w1 = torch.randn(d_ff, d_model, dtype=dtype, device=device) / d_model**0.5
    w2 = torch.randn(d_model, d_ff, dtype=dtype, device=device) / d_ff**0.5
    b1 = torch.randn(d_ff, dtype=dtype, device=device) if bias else None
    b2 = torch.randn(d_model, dtype=dtype, device=device) if bias else None
    wg = torch.randn(d_ff, d_model, dtype=dtype, device=device) / d_model**0.5 if gated else None
    bg = torch.randn(d_ff, dtype=dtype, device=device) if (gated and bias) else None
    return w1, b1, w2, b2, wg, bg


def _check(x, params, activation, dtype, residual=None, **kw):
    """Forward + backward against the float64 reference; every gradient compared."""
    w1, b1, w2, b2, wg, bg = params
    tensors = (x, w1, b1, w2, b2, wg, bg, residual)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = tk.ffn(*leaves[:5], activation, weight_gate=leaves[5], bias_gate=leaves[6], residual=leaves[7], **kw)
    assert tk.last_path("ffn") == "triton"
    dy = torch.randn_like(y)
    y.backward(dy)
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    ref = ffn_reference(*refs[:5], activation, weight_gate=refs[5], bias_gate=refs[6], residual=refs[7])
    ref.backward(dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref, dtype, "y")
    names = ("dx", "dw1", "db1", "dw2", "db2", "dwg", "dbg", "dresidual")
    for name, got, want in zip(names, leaves, refs):
        if got is not None:
            assert_close(got.grad, want.grad, dtype, name)
    return y


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,d_model,d_ff", [((3, 37), 48, 80), ((2, 65), 64, 130)])
def test_matches_reference(device, launches, activation, dtype, tokens, d_model, d_ff):
    x = torch.randn(*tokens, d_model, dtype=dtype, device=device)
    with launches("ffn_matmul", at_least=6):  # 2 forward + 4 backward products
        _check(x, _params(d_model, d_ff, dtype, device, gated=activation in GATED_ACTIVATIONS), activation, dtype)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bf16(device, activation):
    x = torch.randn(1, 16, dtype=torch.bfloat16, device=device)
    _check(x, _params(16, 64, torch.bfloat16, device, gated=activation == "swiglu"), activation, torch.bfloat16)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cublas_route_with_fused_elementwise(device, launches, activation):
    """gemm="torch": torch.matmul products with the epilogues as one fused elementwise Triton kernel."""
    x = torch.randn(2, 21, 32, device=device)
    with launches("ffn_elementwise", at_least=2):
        _check(x, _params(32, 72, torch.float32, device, gated=activation in GATED_ACTIVATIONS), activation,
               torch.float32, gemm="torch")


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("gemm", ["triton", "torch"])
def test_recompute_matches_and_saves_activation_memory(device, activation, gemm):
    gated = activation in GATED_ACTIVATIONS
    x = torch.randn(40, 32, device=device)
    params = _params(32, 96, torch.float32, device, gated=gated)
    _check(x, params, activation, torch.float32, recompute=True, gemm=gemm)

    def saved_elements(recompute):
        total = []
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, *params)]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel()) or t, lambda t: t):
            tk.ffn(*leaves[:5], activation, weight_gate=leaves[5], bias_gate=leaves[6], recompute=recompute,
                        gemm=gemm)
        return sum(total)

    hidden = 40 * 96  # one (tokens, d_ff) tensor
    expected = (3 if gated else (1 if activation == "relu" else 2)) * hidden  # h, and the pre-activation(s)
    assert saved_elements(False) - saved_elements(True) == expected


def test_residual_added_in_the_epilogue(device):
    x, res = torch.randn(5, 11, 24, device=device), torch.randn(5, 11, 24, device=device)
    _check(x, _params(24, 40, torch.float32, device), "gelu", torch.float32, residual=res)
    _check(x, _params(24, 40, torch.float32, device, gated=True), "swiglu", torch.float32, residual=res, gemm="torch")


@pytest.mark.parametrize("activation", ["relu", "geglu"])
def test_without_bias_and_strided_input(device, activation):
    x = torch.randn(40, 7, 32, device=device).transpose(0, 1)  # (7, 40, 32), not contiguous
    _check(x, _params(32, 96, torch.float32, device, bias=False, gated=activation == "geglu"), activation,
           torch.float32)


def test_transposed_weights_like_gpt2_conv1d(device):
    """GPT-2's Conv1D stores (in, out); a transposed view is a valid nn.Linear-layout weight."""
    c_fc, c_proj = torch.randn(32, 128, device=device) / 6, torch.randn(128, 32, device=device) / 11
    x = torch.randn(3, 9, 32, device=device)
    params = (c_fc.t(), torch.randn(128, device=device), c_proj.t(), torch.randn(32, device=device), None, None)
    _check(x, params, "gelu_tanh", torch.float32)


def test_modules(device):
    """FFN: two nn.Linear named like nn.TransformerEncoderLayer's; GatedFFN: Llama's MLP names and formula."""
    ffn = tk.FFN(32, 64, activation="gelu").to(device)
    assert set(ffn.state_dict()) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    x = torch.randn(5, 32, device=device)
    torch.testing.assert_close(ffn(x), ffn.linear2(F.gelu(ffn.linear1(x))), rtol=1e-5, atol=1e-5)
    gated = tk.GatedFFN(32, 64, activation="swiglu").to(device)
    assert set(gated.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    want = gated.down_proj(F.silu(gated.gate_proj(x)) * gated.up_proj(x))
    torch.testing.assert_close(gated(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated(x, residual=x), want + x, rtol=1e-5, atol=1e-5)


def test_only_needed_gradients(device):
    """Frozen weights get no gradient and cost no product."""
    ffn = tk.FFN(16, 32).to(device)
    ffn.requires_grad_(False)
    x = torch.randn(4, 16, device=device, requires_grad=True)
    ffn(x).sum().backward()
    assert x.grad is not None and ffn.linear1.weight.grad is None and ffn.linear2.bias.grad is None


def test_matmul_epilogues_write_every_element(device):
    a, b = torch.randn(45, 70, device=device), torch.randn(70, 33, device=device)
    bias = torch.randn(33, device=device)
    out, pre = poisoned((45, 33), torch.float32, device), poisoned((45, 33), torch.float32, device)
    matmul(a, b, bias, epilogue="act", activation="gelu", aux=pre, store_aux=True, out=out)
    want_pre = a.double() @ b.double() + bias.double()
    assert_close(pre, want_pre, torch.float32)
    assert_close(out, F.gelu(want_pre), torch.float32)
    grad = matmul(a, b, epilogue="act_grad", activation="relu", aux=pre, out=poisoned((45, 33), torch.float32, device))
    assert_close(grad, (a.double() @ b.double()) * (want_pre > 0), torch.float32)


def test_torch_compile_fullgraph(device):
    ffn = tk.GatedFFN(16, 32).to(device)
    x = torch.randn(3, 16, device=device, requires_grad=True)
    eager = ffn(x)
    compiled = torch.compile(ffn, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(activation="swiglu"), ValueError, "weight_gate"),
    (dict(wg=lambda w: w), ValueError, "only for the gated"),
    (dict(gemm="cutlass"), ValueError, "gemm"),
    (dict(w1=lambda w: w[:, :5]), ValueError, "weight1"),
    (dict(w2=lambda w: w.t()), ValueError, "weight2"),
    (dict(b1=lambda b: b[:3]), ValueError, "bias1"),
    (dict(w1=lambda w: w.half()), TypeError, "must match"),
    (dict(x=lambda x: x.long()), TypeError, "dtype"),
    (dict(residual=lambda x: x[:1]), ValueError, "residual"),
])
def test_bad_input_raises(device, kwargs, error, match):
    x = torch.randn(4, 16, device=device)
    w1, b1, w2, b2, _, _ = _params(16, 32, torch.float32, device)
    ident = lambda t: t  # noqa: E731
    wg = kwargs["wg"](w1) if "wg" in kwargs else None
    residual = kwargs["residual"](x) if "residual" in kwargs else None
    with pytest.raises(error, match=match):
        tk.ffn(kwargs.get("x", ident)(x), kwargs.get("w1", ident)(w1), kwargs.get("b1", ident)(b1),
                    kwargs.get("w2", ident)(w2), b2, activation=kwargs.get("activation", "relu"), weight_gate=wg,
                    residual=residual, gemm=kwargs.get("gemm", "auto"))


def test_module_rejects_the_other_family():
    with pytest.raises(ValueError, match="GatedFFN"):
        tk.FFN(8, 16, activation="swiglu")
    with pytest.raises(ValueError, match="swiglu"):
        tk.GatedFFN(8, 16, activation="relu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("gemm", ["triton", "torch"])
def test_gpu_large(dtype, activation, gemm):
    x = torch.randn(2048, 1024, dtype=dtype, device="cuda")
    _check(x, _params(1024, 4096, dtype, "cuda", gated=activation == "swiglu"), activation, dtype, gemm=gemm)


def test_nn_linear_chain_equivalence(device):
    l1, l2 = nn.Linear(16, 48).to(device), nn.Linear(48, 16).to(device)
    x = torch.randn(7, 16, device=device)
    torch.testing.assert_close(tk.ffn(x, l1.weight, l1.bias, l2.weight, l2.bias, "silu"), l2(F.silu(l1(x))),
                               rtol=1e-5, atol=1e-5)


def test_autocast_casts_fp32_parameters(device):
    """Under torch.autocast an FFN with fp32 weights runs in the autocast dtype, like F.linear."""
    ffn = tk.GatedFFN(16, 32).to(device)
    x = torch.randn(4, 16, device=device, requires_grad=True)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        y = ffn(x)
        want = ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x))
    assert y.dtype == torch.bfloat16 and tk.last_path("ffn") == "triton"
    assert ((y.float() - want.float()).norm() / want.float().norm()).item() < 2e-2
    y.float().sum().backward()
    assert ffn.gate_proj.weight.grad.dtype == torch.float32
