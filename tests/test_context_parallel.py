"""Context-parallel attention (transformer_kernels.context_parallel) on gloo: 2 and 4 spawned processes,
each holding a slice of the sequence, against one process attending over the whole sequence in
float64 (flash-attention's test standard), and against one device's dropout mask.

Each test spawns its group once and runs several cases in it (starting processes costs more than the
small cases); a failing assertion in any rank fails the test with that rank's traceback. Collectives
get a 10-minute timeout: the suite must pass on 2 shared cores.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import transformer_kernels as tk
from transformer_kernels import context_parallel as cp
from transformer_kernels.attention import attention_reference
from transformer_kernels.context_parallel import _blocks

from helpers import assert_flash_standard, rel_err, spawn_group as _spawn

B, D = 1, 16


def _inputs(seed, dtype, sq, sk, h, hk, dv=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, sq, h, D, generator=g).to(dtype)
    k = torch.randn(B, sk, hk, D, generator=g).to(dtype)
    v = torch.randn(B, sk, hk, dv, generator=g).to(dtype)
    dout = torch.randn(B, sq, h, dv, generator=g).to(dtype)
    return q, k, v, dout


def _reference(q, k, v, dout, *, causal, window, softcap, bottom_right=True):
    """(out, dq, dk, dv, lse) of one process over the whole sequence, in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    w = (window[0], 0 if causal else window[1])
    out, _, lse = attention_reference(*(t.transpose(1, 2) for t in leaves), window=w, softcap=softcap,
                                      bottom_right=bottom_right, return_probs=True)
    out = out.transpose(1, 2)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves] + [lse.detach()]


def _check_case(rank, case):
    """One case on every rank: shard, attend, backward, unshard; rank 0 compares."""
    dtype, strategy, layout = case["dtype"], case["strategy"], case["layout"]
    causal, window, softcap = case.get("causal", False), case.get("window", (-1, -1)), case.get("softcap", 0.0)
    sq, sk, h, hk = case["sq"], case.get("sk", case["sq"]), case.get("h", 2), case.get("hk", 2)
    q, k, v, dout = _inputs(case["seed"], dtype, sq, sk, h, hk)
    ql, kl, vl = (cp.shard(t, 1, layout=layout).requires_grad_() for t in (q, k, v))
    dl = cp.shard(dout, 1, layout=layout)
    before = tk.launch_count("attention_fwd")
    if case.get("torch_form"):  # torch's signature and layout, top-left causal
        out = cp.scaled_dot_product_attention(ql.transpose(1, 2), kl.transpose(1, 2), vl.transpose(1, 2),
                                              is_causal=causal, enable_gqa=True, strategy=strategy,
                                              layout=layout).transpose(1, 2)
        lse = None
    else:
        out, lse, probs = cp.attn_func(ql, kl, vl, causal=causal, window_size=window, softcap=softcap,
                                       return_attn_probs=True, strategy=strategy, layout=layout)
        assert probs is None
    out.backward(dl)
    if dtype != torch.float64:
        assert tk.last_path("attention") == "triton" and tk.launch_count("attention_fwd") > before
    got = cp.unshard([out.detach(), ql.grad, kl.grad, vl.grad], 1, layout=layout)
    got_lse = cp.unshard(lse, 2, layout=layout) if lse is not None else None
    if rank != 0:
        return
    bottom_right = not case.get("torch_form")
    high = _reference(*(t.double() for t in (q, k, v, dout)), causal=causal, window=window, softcap=softcap,
                      bottom_right=bottom_right)
    low = _reference(q, k, v, dout, causal=causal, window=window, softcap=softcap, bottom_right=bottom_right)
    label = f"{case}"
    for name, a, hi, lo in zip(("out", "dq", "dk", "dv"), got, high, low):
        assert_flash_standard(a, hi, lo, dtype if dtype != torch.float64 else torch.float32, f"{name} {label}")
    if got_lse is not None:
        finite = torch.isfinite(high[4])
        assert torch.equal(torch.isfinite(got_lse), finite), label
        assert (got_lse[finite].double() - high[4][finite]).abs().max() < 1e-4, label


def _run_cases(rank, world, cases):
    for case in cases:
        _check_case(rank, case)


F32, F16 = torch.float32, torch.float16

CASES_2 = [
    # ring, both layouts, causal and not, MHA and GQA/MQA
    dict(seed=1, dtype=F32, strategy="ring", layout="zigzag", causal=True, sq=16),
    dict(seed=2, dtype=F32, strategy="ring", layout="contiguous", causal=True, sq=16, hk=1),
    dict(seed=3, dtype=F16, strategy="ring", layout="zigzag", causal=False, sq=16, h=4, hk=2),
    # sliding windows (causal and two-sided), soft-capping
    dict(seed=4, dtype=F32, strategy="ring", layout="zigzag", causal=True, window=(5, -1), sq=32),
    dict(seed=5, dtype=F32, strategy="ring", layout="contiguous", window=(3, 6), softcap=5.0, sq=16),
    # bottom-right causal with seqlen_q != seqlen_k (flash-attention's alignment)
    dict(seed=6, dtype=F32, strategy="ring", layout="zigzag", causal=True, sq=8, sk=24),
    # torch's form: top-left causal, seqlen_q != seqlen_k
    dict(seed=7, dtype=F32, strategy="ring", layout="zigzag", causal=True, sq=24, sk=8, torch_form=True),
    # all-to-all (Ulysses), GQA with fewer key/value heads than ranks (repeated), windows
    dict(seed=8, dtype=F32, strategy="all_to_all", layout="zigzag", causal=True, sq=16, h=2, hk=1),
    dict(seed=9, dtype=F16, strategy="all_to_all", layout="contiguous", causal=True, window=(4, -1), sq=16),
    # float64 runs the PyTorch path through the same ring
    dict(seed=10, dtype=torch.float64, strategy="ring", layout="zigzag", causal=True, window=(3, -1), sq=16),
]

CASES_4 = [
    dict(seed=11, dtype=F32, strategy="ring", layout="zigzag", causal=True, sq=16, h=2, hk=1),
    dict(seed=12, dtype=F32, strategy="ring", layout="zigzag", causal=True, window=(6, -1), softcap=4.0, sq=32),
    dict(seed=13, dtype=F32, strategy="all_to_all", layout="zigzag", causal=True, sq=16, h=4, hk=2),
]


def test_two_ranks_match_one_device(device):
    _spawn(_run_cases, 2, CASES_2)


def test_four_ranks_match_one_device(device):
    _spawn(_run_cases, 4, CASES_4)


def _dropout_and_determinism(rank, world):
    """Dropout draws one device's Philox mask (same torch.manual_seed); and a second run is bitwise
    identical (sums in ring order)."""
    q, k, v, dout = _inputs(21, F32, 16, 16, 4, 2)
    for strategy in ("ring", "all_to_all"):
        torch.manual_seed(5)
        ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        one = tk.flash_attn_func(*ref, dropout_p=0.3, causal=True)
        one.backward(dout)
        no_drop = tk.flash_attn_func(q, k, v, causal=True)
        runs = []
        for _ in range(2):
            torch.manual_seed(5)
            ql, kl, vl = (cp.shard(t, 1).requires_grad_() for t in (q, k, v))
            out = cp.attn_func(ql, kl, vl, dropout_p=0.3, causal=True, strategy=strategy)
            out.backward(cp.shard(dout, 1))
            runs.append(cp.unshard([out.detach(), ql.grad, kl.grad, vl.grad], 1))
        if rank == 0:
            assert rel_err(one, no_drop) > 0.05, "dropout changed nothing"
            for name, a, b in zip(("out", "dq", "dk", "dv"), runs[0], [one] + [t.grad for t in ref]):
                assert rel_err(a, b) < 1e-5, f"{strategy} {name}: {rel_err(a, b):.2e} from one device's dropout"
            for a, b in zip(*runs):
                assert torch.equal(a, b), f"{strategy}: a second run differs"


def test_dropout_is_one_devices_mask_and_runs_repeat_bitwise(device):
    _spawn(_dropout_and_determinism, 2)


def _bad_input(rank, world):
    """Every rank raises the same clear error before anything is sent, and the group still works after."""
    q, k, v, _ = _inputs(31, F32, 16, 16, 2, 2)
    ql, kl, vl = (cp.shard(t, 1) for t in (q, k, v))

    def raises(match, fn):
        with pytest.raises((ValueError, TypeError), match=match):
            fn()

    # ranks disagree on the local length, on the layout, on the strategy
    short = ql[:, :4] if rank == 1 else ql
    raises("disagree.*seqlen_q", lambda: cp.attn_func(short, kl, vl, causal=True))
    raises("disagree.*layout", lambda: cp.attn_func(ql, kl, vl, layout="zigzag" if rank else "contiguous"))
    raises("disagree.*strategy", lambda: cp.attn_func(ql, kl, vl, strategy="ring" if rank else "all_to_all"))
    # a sequence that does not divide into 2 x world chunks
    raises("does not divide into 4 chunks", lambda: cp.attn_func(ql[:, :3], kl[:, :3], vl[:, :3]))
    raises("does not divide", lambda: cp.shard(q[:, :6], 1))
    # options that have no meaning across chunks, or a bad name
    raises("alibi_slopes", lambda: cp.attn_func(ql, kl, vl, alibi_slopes=torch.ones(2)))
    raises("attn_mask", lambda: cp.scaled_dot_product_attention(ql, kl, vl, attn_mask=torch.ones(8, 8).bool()))
    raises("strategy must be", lambda: cp.attn_func(ql, kl, vl, strategy="tree"))
    raises("layout must be", lambda: cp.attn_func(ql, kl, vl, layout="striped"))
    q3 = torch.randn(B, 8, 3, D)
    raises("num_heads \\(3\\) divisible", lambda: cp.attn_func(q3, q3, q3, strategy="all_to_all"))
    # and the group still serves a correct call
    out = cp.attn_func(ql, kl, vl, causal=True)
    full = cp.unshard(out, 1)
    if rank == 0:
        assert rel_err(full, tk.flash_attn_func(q, k, v, causal=True)) < 1e-5


def test_bad_input_is_refused_on_every_rank(device):
    _spawn(_bad_input, 2)


def test_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    x = torch.randn(1, 8, 2, D)
    with pytest.raises(ValueError, match="init_process_group"):
        cp.attn_func(x, x, x)


# ----------------------------------------------------------------------------------------------
# The plan and the layout, without processes
# ----------------------------------------------------------------------------------------------
def _spec(left=-1, right=0, dropout_p=0.0, seqlen=64):
    return _blocks.Spec(scale=0.25, left=left, right=right, softcap=0.0, dropout_p=dropout_p, seed=0,
                        seqlen_q=seqlen, seqlen_k=seqlen, num_heads=2, bottom_right=True)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_causal_steps_are_one_equal_call(world):
    """Load balance: under zigzag every causal ring step of every rank is one kernel call over the same
    number of visible (query, key) pairs, except each rank's own block (the causal diagonal)."""
    from transformer_kernels.context_parallel.ring import Ring

    seqlen = 8 * world
    c = seqlen // (2 * world)
    work = set()
    for rank in range(world):
        ring = Ring(None, rank, world, "zigzag", c, c)
        for t in range(1, world):
            tasks = ring.tasks(_spec(seqlen=seqlen), (rank - t) % world)
            assert len(tasks) == 1 and tasks[0].full
            work.add((tasks[0].q1 - tasks[0].q0) * (tasks[0].k1 - tasks[0].k0))
        diag = ring.tasks(_spec(seqlen=seqlen), rank)
        assert len(diag) == 1 and (diag[0].left, diag[0].right) == (-1, 0)
    assert work == {2 * c * c}


def test_plan_covers_exactly_the_band():
    """Every visible (query, key) pair of the global band is computed exactly once over the ring, for
    windows on both sides, zigzag and contiguous, with and without dropout (no merging)."""
    from transformer_kernels.context_parallel.ring import Ring

    world, seqlen = 3, 36
    for layout in ("zigzag", "contiguous"):
        for left, right in ((-1, 0), (5, 0), (4, 7), (-1, -1), (0, 3)):
            for p in (0.0, 0.1):
                spec = _spec(left, right, p, seqlen)
                c = seqlen // (2 * world if layout == "zigzag" else world)
                seen = torch.zeros(seqlen, seqlen, dtype=torch.int64)
                for rank in range(world):
                    ring = Ring(None, rank, world, layout, c, c)
                    qpos = cp.positions(seqlen, rank, world, layout)
                    for src in range(world):
                        kpos = cp.positions(seqlen, src, world, layout)
                        for t in ring.tasks(spec, src):
                            i = torch.arange(t.q0, t.q1)[:, None]
                            j = torch.arange(t.k0, t.k1)[None, :]
                            ok = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool)
                            if t.left >= 0:
                                ok &= (j - t.k0) - (i - t.q0) >= -t.left
                            if t.right >= 0:
                                ok &= (j - t.k0) - (i - t.q0) <= t.right
                            gi, gj = qpos[t.q0:t.q1][:, None].expand_as(ok), kpos[t.k0:t.k1][None, :].expand_as(ok)
                            seen.index_put_((gi[ok], gj[ok]), torch.ones(int(ok.sum()), dtype=torch.int64),
                                            accumulate=True)
                rel = torch.arange(seqlen)[None, :] - torch.arange(seqlen)[:, None]
                band = torch.ones_like(rel, dtype=torch.bool)
                if left >= 0:
                    band &= rel >= -left
                if right >= 0:
                    band &= rel <= right
                assert torch.equal(seen, band.long()), (layout, left, right, p)


def test_layout_round_trip_and_positions():
    seqlen, world = 24, 3
    for layout in cp.LAYOUTS:
        pos = [cp.positions(seqlen, r, world, layout) for r in range(world)]
        assert sorted(torch.cat(pos).tolist()) == list(range(seqlen))
        order = cp.gather_order(seqlen, world, layout)
        assert torch.equal(torch.cat(pos)[order], torch.arange(seqlen))
    assert cp.positions(16, 1, 2, "zigzag").tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert cp.positions(16, 0, 2, "zigzag").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]


def test_communication_volume_counts():
    """Ring sends K/V (world-1) times forward; backward again plus the fp32 dK/dV accumulators world times;
    all-to-all sends (world-1)/world of q, k, v, out (+ fp32 lse) forward and of dO, dq, dk, dv backward."""
    kw = dict(batch=1, seqlen=1024, num_heads=8, head_dim=64, world=4, element_bytes=2)
    ring = cp.communication_volume("ring", **kw)
    kv = 256 * 8 * 128
    assert ring["forward_bytes"] == 3 * kv * 2 and ring["backward_bytes"] == 3 * kv * 2 + 4 * kv * 4
    a2a = cp.communication_volume("all_to_all", **kw)
    assert a2a["forward_bytes"] == int(0.75 * (256 * 8 * 64 * 4 * 2 + 256 * 8 * 4))
    assert a2a["backward_bytes"] == int(0.75 * 256 * 8 * 64 * 4 * 2)
    gqa = cp.communication_volume("ring", **dict(kw, num_heads_k=2))
    assert gqa["forward_bytes"] * 4 == ring["forward_bytes"]
    with pytest.raises(ValueError):
        cp.communication_volume("tree", **kw)


# ----------------------------------------------------------------------------------------------
# torch's own context parallelism running our kernel (context_parallel/torch_interop.py)
# ----------------------------------------------------------------------------------------------
def _torch_context_parallel(rank, world):
    """Code written for torch.distributed.tensor.experimental.context_parallel: a projection, then
    F.scaled_dot_product_attention, inside ``context_parallel(mesh, buffers=[x])``. Entered inside
    ``transformer_kernels.override_sdpa()``, the attention is our ring (launch counts), and the output and
    the projection's gradient (summed over the ranks) are those of one process on the whole sequence;
    torch's load balancing on (head-tail = zigzag) and off (contiguous). The wrong nesting is refused."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._context_parallel import context_parallel_unshard
    from torch.distributed.tensor.experimental._context_parallel._attention import _cp_options

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(41)
    b, s, h, d = 1, 16, 2, D
    x_full = torch.randn(b, s, h * d, generator=g)
    w = torch.randn(3 * h * d, h * d, generator=g) / (h * d) ** 0.5

    def attend(x, weight):
        q, k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in (x @ weight.T).chunk(3, -1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    ref_w = w.clone().requires_grad_()
    ref = attend(x_full, ref_w)
    ref.pow(2).sum().backward()
    saved = _cp_options.enable_load_balance
    try:
        for balanced in (True, False):
            _cp_options.enable_load_balance = balanced
            weight = w.clone().requires_grad_()
            x = x_full.clone()
            before = tk.launch_count("attention_fwd")
            with tk.override_sdpa():
                with context_parallel(mesh, buffers=[x], buffer_seq_dims=[1], no_restore_buffers={x}):
                    out = attend(x, weight)
                    assert out.shape[2] == s // world
                    out.pow(2).sum().backward()
                    (full,) = context_parallel_unshard(mesh, [out.detach()], [2])
            assert tk.launch_count("attention_fwd") > before, "our kernel did not run"
            dist.all_reduce(weight.grad)
            if rank == 0:
                assert rel_err(full, ref) < 1e-5, (balanced, rel_err(full, ref))
                assert rel_err(weight.grad, ref_w.grad) < 1e-5, (balanced, rel_err(weight.grad, ref_w.grad))
    finally:
        _cp_options.enable_load_balance = saved
    x = x_full.clone()
    with context_parallel(mesh, buffers=[x], buffer_seq_dims=[1], no_restore_buffers={x}):
        with pytest.raises(RuntimeError, match="enter transformer_kernels.override_sdpa\\(\\) first"):
            with tk.override_sdpa():
                pass


def test_torch_context_parallel_runs_our_kernel(device):
    _spawn(_torch_context_parallel, 2)
