"""LayerNorm / RMSNorm and the fused Add & Norm (kernels/transformer_kernels/layer_norm.py) against a float64 reference.

Widths cover both kernel paths: rows that fit one program (several rows per program when narrow)
and wide rows that loop over column chunks (under the interpreter the single-pass limit is 64).
"""
import pytest
import torch
import torch.nn as nn

import transformer_kernels as tk
from transformer_kernels.layer_norm import MAX_SINGLE_PASS_N, norm_backward, norm_forward, norm_reference
from helpers import assert_close, poisoned

WIDTHS = [(1, 7), (37, 48), (70, 16), (5, 130), (3, 300)]
if MAX_SINGLE_PASS_N >= 300:  # compiled on a GPU the one-pass limit is 8192: one row past it takes the loop
    WIDTHS.append((2, MAX_SINGLE_PASS_N + 37))
assert any(n > MAX_SINGLE_PASS_N for _, n in WIDTHS) and any(n <= MAX_SINGLE_PASS_N for _, n in WIDTHS)


def _run(fn, ref, tensors, dtype, grad_of_extra=False):
    """Forward + backward of ``fn`` and of ``ref`` (float64); compares outputs and every gradient.
    ``fn``/``ref`` return y or (y, z); z (the pre-norm residual stream) gets its own random gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    outs, ref_outs = fn(*leaves), ref(*refs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    grads = [torch.randn_like(o) for o in outs]
    sum((o * g).sum() for o, g in zip(outs, grads)).backward()
    sum((o * g.double()).sum() for o, g in zip(ref_outs, grads)).backward()
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == dtype
        assert_close(o, r, dtype, f"output {i}")
    for i, (a, r) in enumerate(zip(leaves, refs)):
        if a is not None:
            assert_close(a.grad, r.grad, dtype, f"grad {i}")
    return outs


@pytest.mark.parametrize("rows,cols", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_matches_reference(device, launches, kind, rows, cols, dtype):
    x = torch.randn(rows, cols, dtype=dtype, device=device) * 3 + 1
    w, b = torch.randn(cols, dtype=dtype, device=device), torch.randn(cols, dtype=dtype, device=device)
    is_rms = kind == "rms_norm"
    eps = torch.finfo(dtype).eps if is_rms else 1e-5
    with launches("layer_norm_fwd"), launches("layer_norm_bwd"):
        if is_rms:
            _run(lambda x, w: tk.rms_norm(x, cols, w), lambda x, w: norm_reference(x, cols, w, eps=eps, is_rms=True),
                 (x, w), dtype)
        else:
            _run(lambda x, w, b: tk.layer_norm(x, cols, w, b), lambda x, w, b: norm_reference(x, cols, w, b),
                 (x, w, b), dtype)
    assert tk.last_path("layer_norm") == "triton"


@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("cols", [40, 200])
def test_without_affine_parameters(device, affine, cols):
    x = torch.randn(3, 5, cols, device=device)
    w = torch.randn(cols, device=device) if affine != "none" else None
    b = torch.randn(cols, device=device) if affine == "both" else None
    _run(lambda x, w, b: tk.layer_norm(x, cols, w, b), lambda x, w, b: norm_reference(x, cols, w, b),
         (x, w, b), torch.float32)


def test_multi_dim_normalized_shape_and_strided_input(device):
    x = torch.randn(4, 20, 3, device=device).transpose(1, 2)  # (4, 3, 20), not contiguous
    w, b = torch.randn(3, 20, device=device), torch.randn(3, 20, device=device)
    (y,) = _run(lambda x, w, b: tk.layer_norm(x, (3, 20), w, b), lambda x, w, b: norm_reference(x, (3, 20), w, b),
                (x, w, b), torch.float32)
    assert y.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_weights_with_half_activations(device, dtype):
    x = torch.randn(9, 64, dtype=dtype, device=device)
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = tk.layer_norm(leaves[0], 64, leaves[1], leaves[2])
    y.sum().backward()
    assert y.dtype == dtype and leaves[1].grad.dtype == torch.float32
    assert_close(y, norm_reference(x.double(), 64, w.double(), b.double()), dtype)


# --- fused Add & Norm -------------------------------------------------------------------------------
@pytest.mark.parametrize("cols", [48, 130])
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_add_and_norm(device, cols, prenorm, kind):
    """Post-norm LayerNorm(residual + x) (the paper), and pre-norm returning the updated residual too;
    gradients reach x, the residual, the parameters and flow back through the returned sum."""
    is_rms = kind == "rms_norm"
    x, res = torch.randn(2, 7, cols, device=device), torch.randn(2, 7, cols, device=device)
    w, b = torch.randn(cols, device=device), None if is_rms else torch.randn(cols, device=device)
    eps = 1e-6

    def fused(x, res, w, b):
        if is_rms:
            return tk.add_rms_norm(x, res, cols, w, eps=eps, prenorm=prenorm)
        return tk.add_layer_norm(x, res, cols, w, b, eps=eps, prenorm=prenorm)

    def ref(x, res, w, b):
        y, z = norm_reference(x, cols, w, b, eps, is_rms=is_rms, residual=res, return_residual=True)
        return (y, z) if prenorm else y

    _run(fused, ref, (x, res, w, b), torch.float32)


@pytest.mark.parametrize("cols", [48, 130])
def test_add_and_norm_dropout_matches_reference_with_its_mask(device, cols):
    """The kept pattern read off the returned sum (z - residual != 0) reproduces forward and backward."""
    p = 0.4
    x, res = torch.randn(16, cols, device=device), torch.randn(16, cols, device=device)
    w, b = torch.randn(cols, device=device), torch.randn(cols, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, res, w, b)]
    y, z = tk.add_layer_norm(*leaves[:2], cols, *leaves[2:], dropout_p=p, prenorm=True)
    keep = (z - res) != 0
    assert abs(keep.float().mean().item() - (1 - p)) < 0.06
    dy = torch.randn_like(y)
    y.backward(dy)
    refs = [t.double().requires_grad_() for t in (x, res, w, b)]
    ref = norm_reference(refs[0], cols, refs[2], refs[3], residual=refs[1], dropout_p=p, dropout_keep=keep)
    ref.backward(dy.double())
    assert_close(y, ref, torch.float32)
    for a, r in zip(leaves, refs):
        assert_close(a.grad, r.grad, torch.float32)


def test_dropout_statistics_and_seed(device):
    x, res = torch.randn(32, 64, device=device), torch.zeros(32, 64, device=device)
    torch.manual_seed(5)
    _, z1 = tk.add_layer_norm(x, res, 64, dropout_p=0.25, prenorm=True)
    torch.manual_seed(5)
    _, z2 = tk.add_layer_norm(x, res, 64, dropout_p=0.25, prenorm=True)
    _, z3 = tk.add_layer_norm(x, res, 64, dropout_p=0.25, prenorm=True)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    assert abs((z1 != 0).float().mean().item() - 0.75) < 0.04  # 2048 draws: ~4 standard deviations
    torch.testing.assert_close(z1[z1 != 0], (x / 0.75)[z1 != 0])


# --- launchers, modules, compile ---------------------------------------------------------------------
@pytest.mark.parametrize("cols", [72, 300])
def test_every_output_element_written_and_inputs_untouched(device, cols):
    x, dy, res = (torch.randn(7, cols, device=device) for _ in range(3))
    w, b = torch.randn(cols, device=device), torch.randn(cols, device=device)
    before = [t.clone() for t in (x, dy, res, w, b)]
    y, z, mean, rstd = norm_forward(x, res, w, b, 1e-5, is_rms=False, dropout_p=0.2, seed=3,
                                    y=poisoned((7, cols), torch.float32, device),
                                    z=poisoned((7, cols), torch.float32, device))
    assert torch.isfinite(y).all() and torch.isfinite(z).all()
    dz, dx, dw, db = norm_backward(dy, z, w, b, mean, rstd, is_rms=False, dz_out=dy, dropout_p=0.2, seed=3,
                                   dz=poisoned((7, cols), torch.float32, device))
    assert all(torch.isfinite(t).all() for t in (dz, dx, dw, db))
    assert all(torch.equal(a, b) for a, b in zip(before, (x, dy, res, w, b)))


def test_modules_load_torch_state_dicts_and_fuse(device):
    for ours, theirs in ((tk.LayerNorm(48, eps=1e-6), nn.LayerNorm(48, eps=1e-6)),
                         (tk.RMSNorm(48, eps=1e-6), nn.RMSNorm(48, eps=1e-6))):
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_()
        ours.load_state_dict(theirs.state_dict())
        ours, theirs = ours.to(device), theirs.to(device)
        assert isinstance(ours, type(theirs))
        x, res = torch.randn(6, 48, device=device), torch.randn(6, 48, device=device)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x, res), theirs(x + res), rtol=1e-5, atol=1e-5)
        y, z = ours(x, res, prenorm=True)
        torch.testing.assert_close(z, x + res)
        assert tk.last_path("layer_norm") == "triton"


def test_torch_compile_fullgraph(device):
    ln = tk.LayerNorm(32).to(device)

    def block(x, res):
        return ln(x, res) + tk.rms_norm(x, 32)

    x, res = torch.randn(4, 32, device=device, requires_grad=True), torch.randn(4, 32, device=device)
    eager = block(x, res)
    compiled = torch.compile(block, fullgraph=True)(x, res)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert torch.isfinite(x.grad).all()


# --- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,error,match", [
    (lambda x, w: tk.layer_norm(x, 24, w), ValueError, "normalized_shape"),
    (lambda x, w: tk.layer_norm(x, 32, w[:5]), ValueError, "weight must have shape"),
    (lambda x, w: tk.layer_norm(x.long(), 32), TypeError, "dtype"),
    (lambda x, w: tk.layer_norm(x, 32, eps=0.0), ValueError, "eps"),
    (lambda x, w: tk.layer_norm(x, 32, eps=-1e-5), ValueError, "eps"),
    (lambda x, w: tk.layer_norm(x, "32"), TypeError, "normalized_shape"),
    (lambda x, w: tk.add_layer_norm(x, x[:1], 32), ValueError, "residual"),
    (lambda x, w: tk.add_layer_norm(x, x.half(), 32), TypeError, "must match"),
    (lambda x, w: tk.add_layer_norm(x, x, 32, dropout_p=2.0), ValueError, "dropout_p"),
    (lambda x, w: tk.rms_norm(x, 32, w, eps=0.0), ValueError, "eps"),
])
def test_bad_input_raises(device, call, error, match):
    x, w = torch.randn(3, 32, device=device), torch.randn(32, device=device)
    with pytest.raises(error, match=match):
        call(x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols", [768, 4096, 8192, 20000, 65536])
def test_gpu_large(dtype, cols):
    x, res = torch.randn(1024, cols, dtype=dtype, device="cuda"), torch.randn(1024, cols, dtype=dtype, device="cuda")
    w, b = torch.randn(cols, dtype=dtype, device="cuda"), torch.randn(cols, dtype=dtype, device="cuda")
    _run(lambda x, res, w, b: tk.add_layer_norm(x, res, cols, w, b, prenorm=True),
         lambda x, res, w, b: norm_reference(x, cols, w, b, residual=res, return_residual=True),
         (x, res, w, b), dtype)
