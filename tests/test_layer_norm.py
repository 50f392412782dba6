"""Triton LayerNorm (kernels/layer_norm.py) against a float64 reference, forward and backward."""
import pytest
import torch
import torch.nn as nn

import kernels
from kernels.layer_norm import layer_norm_backward, layer_norm_forward, layer_norm_reference
from helpers import assert_close, f64, poisoned


def _run(x, shape, weight, bias, eps=1e-5):
    leaves = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
    y = kernels.layer_norm(x, shape, weight, bias, eps)
    assert kernels.last_path("layer_norm") == "triton"
    dy = torch.randn_like(y)
    y.backward(dy)
    refs = f64(*leaves)
    it = iter(refs)
    x64, w64, b64 = (next(it) if t is not None else None for t in (x, weight, bias))
    ref = layer_norm_reference(x64, shape, w64, b64, eps)
    ref.backward(dy.double())
    return y, ref, leaves, refs


@pytest.mark.parametrize("rows,cols", [(1, 7), (37, 48), (5, 130), (64, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(device, launches, rows, cols, dtype):
    x = torch.randn(rows, cols, dtype=dtype, device=device) * 3 + 1
    w = torch.randn(cols, dtype=dtype, device=device)
    b = torch.randn(cols, dtype=dtype, device=device)
    with launches("layer_norm_fwd"), launches("layer_norm_bwd"):
        y, ref, leaves, refs = _run(x, cols, w, b)
    assert y.dtype == dtype
    assert_close(y, ref, dtype, "y")
    for name, got, want in zip(("dx", "dweight", "dbias"), leaves, refs):
        assert_close(got.grad, want.grad, dtype, name)


@pytest.mark.parametrize("affine", ["none", "weight", "both"])
def test_without_affine_parameters(device, affine):
    x = torch.randn(3, 5, 40, device=device)
    w = torch.randn(40, device=device) if affine != "none" else None
    b = torch.randn(40, device=device) if affine == "both" else None
    y, ref, leaves, refs = _run(x, (40,), w, b)
    assert_close(y, ref, torch.float32)
    for got, want in zip(leaves, refs):
        assert_close(got.grad, want.grad, torch.float32)


def test_multi_dim_normalized_shape_and_strided_input(device):
    x = torch.randn(4, 20, 3, device=device).transpose(1, 2)  # (4, 3, 20), not contiguous
    w, b = torch.randn(3, 20, device=device), torch.randn(3, 20, device=device)
    y, ref, leaves, refs = _run(x, (3, 20), w, b)
    assert y.shape == x.shape
    assert_close(y, ref, torch.float32)
    for got, want in zip(leaves, refs):
        assert_close(got.grad, want.grad, torch.float32)


def test_fp32_weights_with_half_activations(device):
    x = torch.randn(9, 64, dtype=torch.float16, device=device)
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    y, ref, leaves, refs = _run(x, 64, w, b)
    assert y.dtype == torch.float16 and leaves[1].grad.dtype == torch.float32
    assert_close(y, ref, torch.float16)
    for got, want in zip(leaves, refs):
        assert_close(got.grad, want.grad, torch.float16)


def test_every_output_element_written(device):
    x, dy = torch.randn(23, 72, device=device), torch.randn(23, 72, device=device)
    w, b = torch.randn(72, device=device), torch.randn(72, device=device)
    y, mean, rstd = layer_norm_forward(x, w, b, 1e-5, y=poisoned((23, 72), torch.float32, device))
    assert torch.isfinite(y).all()
    dx, dw, db = layer_norm_backward(dy, x, w, b, mean, rstd, dx=poisoned((23, 72), torch.float32, device))
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()


def test_module_loads_torch_state_dict(device):
    torch_ln = nn.LayerNorm(48, eps=1e-6).to(device)
    with torch.no_grad():
        torch_ln.weight.normal_()
        torch_ln.bias.normal_()
    ours = kernels.LayerNorm(48, eps=1e-6).to(device)
    ours.load_state_dict(torch_ln.state_dict())
    assert isinstance(ours, nn.LayerNorm)
    x = torch.randn(6, 48, device=device)
    torch.testing.assert_close(ours(x), torch_ln(x), rtol=1e-5, atol=1e-5)
    assert kernels.last_path("layer_norm") == "triton"


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w: kernels.layer_norm(x, 24, w), ValueError, "normalized_shape"),
    (lambda x, w: kernels.layer_norm(x, 32, w[:5]), ValueError, "weight must have shape"),
    (lambda x, w: kernels.layer_norm(x.long(), 32), TypeError, "dtype"),
    (lambda x, w: kernels.layer_norm(x, 32, eps=0.0), ValueError, "eps"),
    (lambda x, w: kernels.layer_norm(x, 32, eps=-1e-5), ValueError, "eps"),
    (lambda x, w: kernels.layer_norm(x, "32"), TypeError, "normalized_shape"),
])
def test_bad_input_raises(device, call, error, match):
    x, w = torch.randn(3, 32, device=device), torch.randn(32, device=device)
    with pytest.raises(error, match=match):
        call(x, w)


def test_rows_longer_than_the_fused_limit_take_the_documented_fallback(device):
    from kernels.layer_norm import MAX_FUSED_N

    x = torch.randn(2, MAX_FUSED_N + 1, device=device)
    before = kernels.launch_count("layer_norm_fwd")
    y = kernels.layer_norm(x, MAX_FUSED_N + 1)
    assert kernels.last_path("layer_norm") == "torch" and kernels.launch_count("layer_norm_fwd") == before
    assert_close(y, layer_norm_reference(x.double(), MAX_FUSED_N + 1), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols", [768, 4096, 8192])
def test_gpu_large(dtype, cols):
    x = torch.randn(4096, cols, dtype=dtype, device="cuda")
    w = torch.randn(cols, dtype=dtype, device="cuda")
    b = torch.randn(cols, dtype=dtype, device="cuda")
    y, ref, leaves, refs = _run(x, cols, w, b)
    assert_close(y, ref, dtype)
    for got, want in zip(leaves, refs):
        assert_close(got.grad, want.grad, dtype)
