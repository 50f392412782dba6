"""Comparison helpers shared by the kernel tests."""
import torch

# Relative error ||out - ref|| / ||ref|| allowed against a float64 reference, by input dtype.
# fp32 runs true-fp32 dots ("ieee"); half types round every stored operand (2^-11, 2^-8).
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in ``out`` gives inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "out", floor: float = 0.0):
    """Relative error within TOL[dtype]; ``floor`` is an absolute RMS bound for references near zero."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    ref_rms = ref.detach().double().pow(2).mean().sqrt().item() if ref.numel() else 0.0
    if ref_rms <= floor:  # e.g. dq when each query sees a single key: the true gradient is 0
        rms = (out.detach().double() - ref.detach().double()).pow(2).mean().sqrt().item()
        assert rms <= floor, f"{name}: RMS error {rms:.2e} above floor {floor:.1e} (reference ~0)"
        return
    assert err <= TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.1e} for {dtype}"


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def f64(*tensors):
    """Detached float64 leaf copies that require grad, for the reference."""
    return [t.detach().double().requires_grad_() for t in tensors]
