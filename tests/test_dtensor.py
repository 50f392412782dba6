"""Our custom ops on DTensors (kernels/transformer_kernels/_sharding.py): each public function called with
sharded or replicated DTensors runs the Triton kernel on every rank's shard and gives what one process
gives on the full tensors, forward and backward, instead of DTensor's "no sharding strategy" error.
2 spawned gloo processes; the kernels run through the interpreter."""
from __future__ import annotations

import torch
import torch.distributed as dist

import transformer_kernels as tk

from helpers import spawn_group


def _cases(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    def check(name, fn, inputs, placements, kernel, expect=None):
        ref_in = [t.clone().requires_grad_() for t in inputs]
        ref = fn(*ref_in)
        grad = torch.randn(ref.shape, generator=g)
        ref.backward(grad)
        dt_in = [distribute_tensor(t, mesh, [p]).requires_grad_() for t, p in zip(inputs, placements)]
        before = tk.launch_count(kernel)
        out = fn(*dt_in)
        assert isinstance(out, DTensor), name
        assert tk.launch_count(kernel) > before, f"{name}: the Triton kernel {kernel} did not run"
        if expect is not None:
            assert tuple(out.placements) == (expect,), f"{name}: {out.placements}"
        err = ((full(out) - ref).norm() / ref.norm()).item()
        assert err < 1e-6, f"{name}: {err:.2e}"
        out.backward(distribute_tensor(grad, mesh, list(out.placements)))
        for i, (a, b) in enumerate(zip(dt_in, ref_in)):
            gerr = ((full(a.grad) - b.grad).norm() / b.grad.norm()).item()
            assert gerr < 1e-5, f"{name}: input {i} gradient {gerr:.2e}"

    x, w, b = rnd(2, 8, 16), rnd(16), rnd(16)
    check("rms_norm, sequence-sharded rows", lambda a, c: tk.rms_norm(a, (16,), c), [x, w], [Shard(1), Replicate()],
          "layer_norm_fwd")
    check("layer_norm, batch-sharded", lambda a, c, d: tk.layer_norm(a, (16,), c, d), [x, w, b],
          [Shard(0), Replicate(), Replicate()], "layer_norm_fwd", Shard(0))
    check("add_rms_norm", lambda a, r, c: tk.add_rms_norm(a, r, (16,), c), [x, rnd(2, 8, 16), w],
          [Shard(0), Shard(0), Replicate()], "layer_norm_fwd", Shard(0))
    w1, b1, w2, b2 = rnd(32, 16), rnd(32), rnd(16, 32), rnd(16)
    check("ffn, token-sharded", lambda a, p, q, r, s: tk.ffn(a, p, q, r, s, "gelu"), [x, w1, b1, w2, b2],
          [Shard(0)] + [Replicate()] * 4, "ffn_matmul", Shard(0))
    q, k, v = rnd(2, 4, 8, 16), rnd(2, 2, 8, 16), rnd(2, 2, 8, 16)

    def sdpa(a, c, d):
        return tk.scaled_dot_product_attention(a, c, d, is_causal=True, enable_gqa=True)

    check("attention, head-sharded (GQA)", sdpa, [q, k, v], [Shard(1)] * 3, "attention_fwd", Shard(1))
    check("attention, batch-sharded", sdpa, [q, k, v], [Shard(0)] * 3, "attention_fwd", Shard(0))
    # (contiguous chunks, DTensor's Shard(2): our context-parallel ring over the mesh, contiguous layout)
    check("attention, sequence-sharded (ring)", sdpa, [q, k, v], [Shard(2)] * 3, "attention_fwd", Shard(2))
    check("attention, MQA heads (1 key/value head: not split)", sdpa, [q, rnd(2, 1, 8, 16), rnd(2, 1, 8, 16)],
          [Shard(1)] * 3, "attention_fwd")
    cos, sin = rnd(2, 8, 16), rnd(2, 8, 16)

    def rotary(a):
        tables = (cos, sin)
        if isinstance(a, DTensor):
            tables = tuple(distribute_tensor(t, mesh, [Replicate()]) for t in tables)
        return tk.apply_rotary_pos_emb(a, a, *tables)[0]

    check("rotary, head-sharded", rotary, [q], [Shard(1)], "rotary", Shard(1))
    dist.barrier()


def test_custom_ops_run_on_dtensors(device):
    spawn_group(_cases, 2)
