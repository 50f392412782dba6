"""Triton FFN (kernels/ffn.py) against a float64 reference, forward and backward."""
import pytest
import torch
import torch.nn as nn

import kernels
from kernels.ffn import ffn_reference, matmul
from helpers import assert_close, f64, poisoned


def _params(d_model, d_ff, dtype, device, bias=True):
    w1 = torch.randn(d_ff, d_model, dtype=dtype, device=device) / d_model**0.5
    w2 = torch.randn(d_model, d_ff, dtype=dtype, device=device) / d_ff**0.5
    b1 = torch.randn(d_ff, dtype=dtype, device=device) if bias else None
    b2 = torch.randn(d_model, dtype=dtype, device=device) if bias else None
    return w1, b1, w2, b2


def _check(x, params, activation, dtype):
    leaves = [t.requires_grad_() for t in (x, *params) if t is not None]
    y = kernels.ffn(x, *params, activation=activation)
    assert kernels.last_path("ffn") == "triton"
    dy = torch.randn_like(y)
    y.backward(dy)
    refs = f64(*leaves)
    it = iter(refs)
    ref = ffn_reference(*[next(it) if t is not None else None for t in (x, *params)], activation=activation)
    ref.backward(dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref, dtype, "y")
    for i, (got, want) in enumerate(zip(leaves, refs)):
        assert_close(got.grad, want.grad, dtype, f"grad {i}")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,d_model,d_ff", [((3, 37), 48, 80), ((1,), 16, 64), ((2, 65), 64, 130)])
def test_matches_reference(device, launches, activation, dtype, tokens, d_model, d_ff):
    x = torch.randn(*tokens, d_model, dtype=dtype, device=device)
    with launches("ffn_matmul", at_least=6):  # 2 forward + 4 backward products
        _check(x, _params(d_model, d_ff, dtype, device), activation, dtype)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_without_bias_and_strided_input(device, activation):
    x = torch.randn(40, 7, 32, device=device).transpose(0, 1)  # (7, 40, 32), not contiguous
    _check(x, _params(32, 96, torch.float32, device, bias=False), activation, torch.float32)


def test_module_matches_two_linears(device):
    """FFN's parameters are two nn.Linear, named like nn.TransformerEncoderLayer's."""
    torch.manual_seed(0)
    ffn = kernels.FFN(32, 64, activation="gelu").to(device)
    assert set(ffn.state_dict()) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    x = torch.randn(5, 32, device=device)
    want = ffn.linear2(nn.functional.gelu(ffn.linear1(x)))
    torch.testing.assert_close(ffn(x), want, rtol=1e-5, atol=1e-5)


def test_matmul_epilogues_write_every_element(device):
    a, b = torch.randn(45, 70, device=device), torch.randn(70, 33, device=device)
    bias = torch.randn(33, device=device)
    out, pre = poisoned((45, 33), torch.float32, device), poisoned((45, 33), torch.float32, device)
    matmul(a, b, bias, epilogue="act", activation="gelu", aux=pre, store_aux=True, out=out)
    want_pre = a.double() @ b.double() + bias.double()
    assert_close(pre, want_pre, torch.float32)
    assert_close(out, torch.nn.functional.gelu(want_pre), torch.float32)
    grad = matmul(a, b, epilogue="act_grad", activation="relu", aux=pre, out=poisoned((45, 33), torch.float32, device))
    assert_close(grad, (a.double() @ b.double()) * (want_pre > 0), torch.float32)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(w1=lambda w: w[:, :5]), ValueError, "weight1"),
    (dict(w2=lambda w: w.t()), ValueError, "weight2"),
    (dict(b1=lambda b: b[:3]), ValueError, "bias1"),
    (dict(w1=lambda w: w.half()), TypeError, "must match"),
    (dict(x=lambda x: x.long()), TypeError, "dtype"),
])
def test_bad_input_raises(device, kwargs, error, match):
    x = torch.randn(4, 16, device=device)
    w1, b1, w2, b2 = _params(16, 32, torch.float32, device)
    ident = lambda t: t  # noqa: E731
    with pytest.raises(error, match=match):
        kernels.ffn(kwargs.get("x", ident)(x), kwargs.get("w1", ident)(w1), kwargs.get("b1", ident)(b1),
                    kwargs.get("w2", ident)(w2), b2, activation=kwargs.get("activation", "relu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gpu_large(dtype, activation):
    x = torch.randn(2048, 1024, dtype=dtype, device="cuda")
    _check(x, _params(1024, 4096, dtype, "cuda"), activation, dtype)
