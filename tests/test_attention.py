"""Triton attention (kernels/attention.py) against a float64 reference, forward and backward."""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.attention import attention_backward, attention_forward, attention_reference
from helpers import assert_close, f64, poisoned

SHAPES = [(1, 1), (7, 7), (65, 65), (130, 130), (65, 130), (130, 65), (1, 130)]


def _qkv(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, device, head_dim_v=None):
    g = lambda s: torch.randn(batch, heads, s[0], s[1], dtype=dtype, device=device)  # noqa: E731
    return g((seqlen_q, head_dim)), g((seqlen_k, head_dim)), g((seqlen_k, head_dim_v or head_dim))


def _check_fwd_bwd(q, k, v, dtype, *, is_causal, scale=None, launches=None):
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = kernels.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    assert kernels.last_path("attention") == "triton"
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = f64(q, k, v)
    ref = attention_reference(q64, k64, v64, is_causal=is_causal, scale=scale)
    ref.backward(dout.double())
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out")
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(got, want, dtype, name, floor=1e-3)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(device, launches, is_causal, seqlen_q, seqlen_k, dtype):
    head_dim = {1: 16, 7: 32, 65: 64, 130: 32}[seqlen_q]
    q, k, v = _qkv(2, 2, seqlen_q, seqlen_k, head_dim, dtype, device)
    with launches("attention_fwd"), launches("attention_bwd_dkdv"), launches("attention_bwd_dq"):
        _check_fwd_bwd(q, k, v, dtype, is_causal=is_causal)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_head_dims_and_dtypes(device, head_dim, dtype):
    q, k, v = _qkv(1, 2, 33, 47, head_dim, dtype, device)
    _check_fwd_bwd(q, k, v, dtype, is_causal=True)


@pytest.mark.parametrize("head_dim,head_dim_v", [(24, 24), (40, 40), (32, 16), (16, 48)])
def test_head_dim_not_power_of_two_and_value_width(device, head_dim, head_dim_v):
    q, k, v = _qkv(1, 2, 20, 37, head_dim, torch.float32, device, head_dim_v=head_dim_v)
    _check_fwd_bwd(q, k, v, torch.float32, is_causal=False)


def test_custom_scale(device):
    q, k, v = _qkv(2, 1, 19, 23, 32, torch.float32, device)
    _check_fwd_bwd(q, k, v, torch.float32, is_causal=True, scale=0.37)


def test_non_contiguous_inputs(device):
    """(batch, seqlen, heads, head_dim) memory seen through a transpose, a sliced key and an expanded value."""
    batch, heads, seqlen, head_dim = 2, 3, 37, 32
    q = torch.randn(batch, seqlen, heads, head_dim, device=device).transpose(1, 2)
    k = torch.randn(batch, heads, seqlen, 2 * head_dim, device=device)[..., ::2]
    v = torch.randn(1, heads, seqlen, head_dim, device=device).expand(batch, -1, -1, -1)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check_fwd_bwd(q, k, v, torch.float32, is_causal=True)


@pytest.mark.parametrize("shape", [(9, 16), (3, 9, 16), (2, 2, 2, 9, 16)])
def test_leading_dims_like_torch(device, shape):
    """torch accepts (..., L, E) with any number of leading dims; so do we, with the same output shape."""
    q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    out = kernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert kernels.last_path("attention") == "triton"
    ref = F.scaled_dot_product_attention(*f64(q, k, v), is_causal=True)
    assert_close(out, ref, torch.float32)
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.isfinite(q.grad).all()


def test_reference_is_torch_semantics():
    """The float64 reference the tests trust equals torch's own SDPA, causal with seqlen_q != seqlen_k included."""
    for seqlen_q, seqlen_k in [(5, 9), (9, 5), (6, 6)]:
        q, k, v = (torch.randn(2, 3, s, 8, dtype=torch.float64) for s in (seqlen_q, seqlen_k, seqlen_k))
        for is_causal in (False, True):
            want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
            torch.testing.assert_close(attention_reference(q, k, v, is_causal=is_causal), want)


def test_every_output_element_written(device):
    """NaN-poisoned out, logsumexp and gradients are fully overwritten by the launchers."""
    q, k, v = _qkv(2, 3, 45, 70, 32, torch.float32, device)
    out, lse = poisoned((2, 3, 45, 32), torch.float32, device), poisoned((2, 3, 45), torch.float32, device)
    attention_forward(q, k, v, is_causal=True, scale=0.2, out=out, lse=lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    grads = [poisoned(t.shape, torch.float32, device) for t in (q, k, v)]
    attention_backward(torch.randn_like(out), q, k, v, out, lse, is_causal=True, scale=0.2,
                       dq=grads[0], dk=grads[1], dv=grads[2])
    assert all(torch.isfinite(g).all() for g in grads)


def test_logsumexp(device):
    q, k, v = _qkv(1, 2, 21, 34, 16, torch.float32, device)
    _, lse = attention_forward(q, k, v, is_causal=False, scale=0.25)
    want = torch.logsumexp(0.25 * q.double() @ k.double().transpose(-2, -1), dim=-1)
    torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(40, 17), (17, 40)])
def test_bottom_right_causal_and_empty_rows(device, seqlen_q, seqlen_k):
    """flash-attention's alignment (used by the coming flash_attn_* API): with seqlen_q > seqlen_k the
    first rows see no key and must give 0 output, -inf logsumexp and 0 gradient, never NaN."""
    q, k, v = _qkv(1, 2, seqlen_q, seqlen_k, 32, torch.float32, device)
    out, lse = attention_forward(q, k, v, is_causal=True, scale=0.2, align="bottom_right")
    q64, k64, v64 = f64(q, k, v)
    ref = attention_reference(q64, k64, v64, is_causal=True, scale=0.2, align="bottom_right")
    assert_close(out, ref, torch.float32)
    dout = torch.randn_like(out)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, is_causal=True, scale=0.2, align="bottom_right")
    ref.backward(dout.double())
    for got, want in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        assert_close(got, want, torch.float32, floor=1e-3)
    empty = seqlen_q - seqlen_k
    if empty > 0:
        assert (out[:, :, :empty] == 0).all() and (dq[:, :, :empty] == 0).all()
        assert torch.isneginf(lse[:, :, :empty]).all()


def test_backward_is_deterministic(device):
    q, k, v = _qkv(1, 2, 70, 70, 32, torch.float16, device)
    out, lse = attention_forward(q, k, v, is_causal=True, scale=0.2)
    dout = torch.randn_like(out)
    first = attention_backward(dout, q, k, v, out, lse, is_causal=True, scale=0.2)
    second = attention_backward(dout, q, k, v, out, lse, is_causal=True, scale=0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_default_scale_is_inverse_sqrt_head_dim(device):
    q, k, v = _qkv(1, 1, 9, 9, 64, torch.float32, device)
    a = kernels.scaled_dot_product_attention(q, k, v)
    b = kernels.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(64))
    torch.testing.assert_close(a, b)


# --- bad input -------------------------------------------------------------------------------------
def test_unsupported_arguments_raise_not_implemented(device):
    q, k, v = _qkv(1, 1, 4, 4, 16, torch.float32, device)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        kernels.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="dropout_p"):
        kernels.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("make,error,match", [
    (lambda q, k, v: (q.long(), k, v), TypeError, "dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "float64"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "must match"),
    (lambda q, k, v: (q[..., :8], k, v), ValueError, "head_dim"),
    (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "seqlen"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "leading"),
    (lambda q, k, v: (q[0], k, v), ValueError, "number of dims"),
    (lambda q, k, v: (q[0, 0, 0], k, v), ValueError, "at least 2 dims"),
    (lambda q, k, v: ([1.0], k, v), TypeError, "torch.Tensor"),
])
def test_bad_input_raises(device, make, error, match):
    q, k, v = _qkv(2, 1, 4, 4, 16, torch.float32, device)
    with pytest.raises(error, match=match):
        kernels.scaled_dot_product_attention(*make(q, k, v))


def test_head_dim_too_large_raises(device):
    q, k, v = _qkv(1, 1, 2, 2, 264, torch.float32, device)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.scaled_dot_product_attention(q, k, v)


# --- GPU only ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_large(is_causal, dtype, head_dim):
    q, k, v = _qkv(2, 4, 1031, 1031, head_dim, dtype, "cuda")
    _check_fwd_bwd(q, k, v, dtype, is_causal=is_causal)
