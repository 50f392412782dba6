"""Comparison helpers shared by the kernel tests, and a spawner of process groups."""
import datetime
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


# flash-attention's test standard: the kernel's error against float64 may be at most twice PyTorch's
# own error at the same precision, plus a small floor: relative to the reference's norm, and an RMS
# floor for references that are ~0, where rounding in a sum of O(seqlen) unit-scale terms remains
# (e.g. dK when each query sees a single key: exactly 0 in the reference's autograd, ~1e-6 here).
FLASH_FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
RMS_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_flash_standard(out, ref64, ref_lowp, dtype, name="out"):
    """||out - ref64|| <= 2 ||ref_lowp - ref64|| + FLASH_FLOOR ||ref64|| + RMS_FLOOR sqrt(numel)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    out, ref64, ref_lowp = (t.detach().double() for t in (out, ref64, ref_lowp))
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    ours = (out - ref64).norm().item()
    torch_err = (ref_lowp - ref64).norm().item()
    bound = 2 * torch_err + FLASH_FLOOR[dtype] * ref64.norm().item() + RMS_FLOOR[dtype] * out.numel() ** 0.5
    assert ours <= bound, f"{name}: error {ours:.3e} > bound {bound:.3e} (torch at {dtype}: {torch_err:.3e})"


def check_fwd_bwd(fn, ref, inputs, dtype, names=("dq", "dk", "dv"), backward=True):
    """Run ``fn`` (the kernel) and ``ref`` (plain PyTorch, any dtype) on the same inputs, forward and
    backward with one random output gradient; hold ``fn`` to :func:`assert_flash_standard` against
    ``ref`` in float64, with ``ref`` at ``dtype`` as PyTorch's own error. Returns ``fn``'s output."""
    leaves = [t.detach().clone().requires_grad_(backward) for t in inputs]
    out = fn(*leaves)
    dout = torch.randn_like(out)
    lows = [t.detach().clone().requires_grad_(backward) for t in inputs]
    highs = [t.detach().double().requires_grad_(backward) for t in inputs]
    ref_low, ref_high = ref(*lows), ref(*highs)
    assert_flash_standard(out, ref_high, ref_low, dtype)
    if backward:
        out.backward(dout)
        ref_low.backward(dout)
        ref_high.backward(dout.double())
        for name, a, lo, hi in zip(names, leaves, lows, highs):
            assert_flash_standard(a.grad, hi.grad, lo.grad, dtype, name)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_group(fn, world: int, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined in a gloo group (10-minute
    collective timeout: the suite runs on 2 shared cores); the group is torn down after a barrier. A
    failing assertion in any rank raises here with that rank's traceback. ``fn`` must be importable
    (a module-level function of a test module)."""
    mp.spawn(_group_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def _group_entry(rank, world, port, fn, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_cleanly()


def _exit_cleanly():
    """Leave a spawned rank without the interpreter's teardown: gloo's threads have aborted a process
    there ("terminate called without an active exception", after a clean destroy_process_group) on
    busy cores, which would fail a test whose work had passed. Reached only after ``fn`` returned."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
