"""FP8 (e4m3) attention forward (issue 22, items 1 and 3): FlashAttention-3's q/k/v_descale semantics.

The accuracy contract: measured by RMSE against float64 attention of the original (unquantized)
inputs, the FP8 output stays within 2x of the floor, the RMSE of the same float64 attention run on the
dequantized fp8 inputs (what quantizing the inputs alone costs), for random inputs and for inputs with
a few 100x outlier channels. The interpreter multiplies e4m3 operands exactly and rounds P to e4m3 as
the GPU does (``_triton_utils.to_fp8``), so these runs check the kernel's arithmetic.
"""
import pytest
import torch
import triton
import triton.language as tl

import transformer_kernels as tk
from transformer_kernels import dispatch
from transformer_kernels._triton_utils import InputTypeError, InputValueError, to_fp8
from transformer_kernels.attention import attention_reference, fp8

E4M3 = torch.float8_e4m3fn


def _inputs(batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, outliers=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads, head_dim, generator=g)
    k, v = (torch.randn(batch, seqlen_k, heads_k, head_dim, generator=g) for _ in range(2))
    if outliers:  # a few channels 100x larger (as LLM activations have)
        for t in (q, k, v):
            t[..., :: max(head_dim // 3, 1)] *= 100
    return q, k, v


def _quantize(q, k, v):
    (qf, qd), (kf, kd), (vf, vd) = (fp8.quantize(q, group=q.shape[2] // k.shape[2]), fp8.quantize(k), fp8.quantize(v))
    return (qf, kf, vf), dict(q_descale=qd, k_descale=kd, v_descale=vd)


def _attention64(q, k, v, **kw):
    """float64 attention in flash-attention's layout (bottom-right aligned), GQA by repetition."""
    group = q.shape[2] // k.shape[2]
    q4, k4, v4 = (t.double().transpose(1, 2) for t in (q, k, v))
    k4, v4 = (t.repeat_interleave(group, 1) for t in (k4, v4))
    return attention_reference(q4, k4, v4, bottom_right=True, **kw).transpose(1, 2)


def _rmse(a, b):
    return ((a.double() - b) ** 2).mean().sqrt().item()


def _check_contract(out, q, k, v, quantized, descales, **kw):
    """RMSE(out) <= 2 x RMSE(dequantized inputs) against float64 attention of the originals; returns both."""
    true = _attention64(q, k, v, **kw)
    deq = [fp8.dequantize(t, d, heads_dim=-2) for t, d in zip(quantized, descales.values())]
    floor = _rmse(_attention64(*deq, **kw), true)
    got = _rmse(out, true)
    assert got <= 2 * floor, f"FP8 RMSE {got:.3e} exceeds 2x the quantization floor {floor:.3e}"
    return got, floor


CASES = {
    "plain": dict(shape=(2, 40, 40, 2, 2, 64), kw=dict()),
    "causal-gqa-outliers": dict(shape=(2, 50, 70, 4, 2, 64), kw=dict(causal=True), outliers=True),
    "window-softcap-d48": dict(shape=(1, 45, 45, 2, 1, 48), kw=dict(window=(16, 0), softcap=20.0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fp8_forward_within_twice_the_quantization_floor(name):
    case = CASES[name]
    q, k, v = _inputs(*case["shape"], outliers=case.get("outliers", False))
    quantized, descales = _quantize(q, k, v)
    kw = dict(case["kw"])
    launches = dispatch.launch_count("attention_fwd")
    out, lse = tk.flash_attn_func(*quantized, causal=kw.get("causal", False), window_size=kw.get("window", (-1, -1)),
                                  softcap=kw.get("softcap", 0.0), return_softmax_lse=True, **descales)
    assert dispatch.launch_count("attention_fwd") == launches + 1, "the Triton kernel did not run"
    assert out.dtype == torch.bfloat16 and out.shape == (*q.shape[:3], v.shape[-1])
    _check_contract(out, q, k, v, quantized, descales, **kw)
    # the logsumexp is that of the dequantized scores, unshifted by P's 2^8 units
    deq = [fp8.dequantize(t, d, heads_dim=-2) for t, d in zip(quantized, descales.values())]
    group = q.shape[2] // k.shape[2]
    _, _, ref_lse = attention_reference(*(t.double().transpose(1, 2).repeat_interleave(g, 1) for t, g in
                                          zip(deq, (1, group, group))), bottom_right=True, return_probs=True, **kw)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-6, atol=1e-4)  # fp32 rounding


def test_fp8_against_bf16_attention():
    """What FP8 costs next to bf16 attention of the same inputs (the README's figure): both against float64."""
    q, k, v = _inputs(2, 64, 64, 4, 4, 64, seed=3)
    quantized, descales = _quantize(q, k, v)
    out = tk.flash_attn_func(*quantized, causal=True, **descales)
    bf16 = tk.flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    true = _attention64(q, k, v, causal=True)
    got, ref = _rmse(out, true), _rmse(bf16, true)
    assert ref < got < 20 * ref  # FP8 is coarser than bf16 (3 mantissa bits against 8), within an order of magnitude


def test_fp8_varlen_and_paged_sequences_take_their_own_descales():
    """A packed batch (lengths 5, 33, 1, 20), descales per sequence and KV head, against the dequantized
    PyTorch path; then the same keys in pages of 8 rows in shuffled order, which must give the same output."""
    lens = [5, 33, 1, 20]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(sum(lens), h, 64, generator=g) * (1 + 10 * (seq[:, None, None] % 2)) for h in (4, 2, 2))
    (qf, qd), (kf, kd), (vf, vd) = (fp8.quantize(t, group=grp, batch_of=seq, num_seqs=len(lens))
                                    for t, grp in ((q, 2), (k, 1), (v, 1)))
    assert not torch.allclose(kd[0], kd[1]), "the sequences' scales differ"
    descales = dict(q_descale=qd, k_descale=kd, v_descale=vd)
    out = tk.flash_attn_varlen_func(qf, kf, vf, cu, cu, 33, 33, causal=True, **descales)
    ref = _dequantized_path(tk.flash_attn_varlen_func, qf, kf, vf, cu, cu, 33, 33, causal=True, **descales)
    assert out.dtype == ref.dtype == torch.bfloat16
    for b, n in enumerate(lens):  # per sequence: the P quantization keeps each within a few % of its scale
        s = slice(int(cu[b]), int(cu[b + 1]))
        assert _rmse(out[s].float(), ref[s].double()) <= 0.03 * ref[s].float().abs().max().item()

    page, pages = 8, torch.randperm(16, generator=g)
    k_pool, v_pool = (torch.zeros(16, page, 2, 64, dtype=E4M3) for _ in range(2))
    table = torch.zeros(len(lens), 5, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        for p in range(-(-n // page)):
            rows = slice(int(cu[b]) + p * page, min(int(cu[b]) + (p + 1) * page, int(cu[b + 1])))
            slot = pages[used]
            k_pool[slot, :rows.stop - rows.start], v_pool[slot, :rows.stop - rows.start] = kf[rows], vf[rows]
            table[b, p], used = slot, used + 1
    paged = tk.flash_attn_varlen_func(qf, k_pool, v_pool, cu, cu, 33, 33, causal=True, block_table=table, **descales)
    torch.testing.assert_close(paged.float(), out.float(), rtol=0, atol=0)
    # the PyTorch path dequantizes each page by the descales of the sequence that holds it
    paged_ref = _dequantized_path(tk.flash_attn_varlen_func, qf, k_pool, v_pool, cu, cu, 33, 33, causal=True,
                                  block_table=table, **descales)
    torch.testing.assert_close(paged_ref.float(), ref.float(), rtol=0, atol=0)


def _dequantized_path(fn, *args, **kw):
    """``fn`` on its PyTorch path: the inputs dequantized to float32 (what a CPU without the interpreter runs)."""
    saved, dispatch.INTERPRETER = dispatch.INTERPRETER, False
    try:
        return fn(*args, **kw)
    finally:
        dispatch.INTERPRETER = saved


def test_fp8_descale_shapes_broadcast():
    """(batch, nheads_k) descales, and ones that broadcast to it (a per-tensor (1, 1), per-head (nheads_k,))."""
    q, k, v = _inputs(2, 20, 20, 2, 2, 32, seed=5)
    scale = torch.tensor(0.05)
    quantized = [(t / scale).to(E4M3) for t in (q, k, v)]
    full = dict(q_descale=torch.full((2, 2), 0.05), k_descale=torch.full((2, 2), 0.05), v_descale=torch.full((2, 2), 0.05))
    expected = tk.flash_attn_func(*quantized, **full)
    for shape in ((1, 1), (2,), (2, 2)):
        got = tk.flash_attn_func(*quantized, **{n: torch.full(shape, 0.05) for n in full})
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # no descales at all: each is 1
    ones = tk.flash_attn_func(*quantized)
    unit = tk.flash_attn_func(*quantized, **{n: torch.ones(2, 2) for n in full})
    torch.testing.assert_close(ones, unit, rtol=0, atol=0)


def test_fp8_matches_the_dequantized_path_on_cpu():
    """Without the interpreter a CPU call dequantizes and runs PyTorch: the same result up to P's rounding."""
    q, k, v = _inputs(1, 30, 30, 2, 2, 64, seed=7)
    quantized, descales = _quantize(q, k, v)
    out = tk.flash_attn_func(*quantized, causal=True, **descales)
    ref = _dequantized_path(tk.flash_attn_func, *quantized, causal=True, **descales)
    assert tk.last_path("attention") == "torch" and ref.dtype == torch.bfloat16
    assert _rmse(out.float(), ref.double()) < 0.02 * ref.float().abs().max().item()


def test_fp8_bad_input_raises_clear_errors():
    q, k, v = _inputs(1, 8, 8, 2, 2, 32)
    (qf, kf, vf), descales = _quantize(q, k, v)
    cases = [
        (InputTypeError, "float8_e4m3fnuz", (qf.view(torch.uint8).view(torch.float8_e4m3fnuz), kf, vf), {}),
        (InputTypeError, "e4m3 only", (qf, kf.float().to(torch.float8_e5m2), vf), {}),
        (InputTypeError, "float8_e4m3fn", (qf, k.bfloat16(), vf), {}),
        (InputTypeError, "float32 tensor", (qf, kf, vf), dict(q_descale=torch.ones(1, 2, dtype=torch.float64))),
        (InputValueError, "shape", (qf, kf, vf), dict(k_descale=torch.ones(3, 2))),
        (InputValueError, "dropout", (qf, kf, vf), dict(dropout_p=0.1)),
        (InputValueError, "return_attn_probs", (qf, kf, vf), dict(return_attn_probs=True)),
        (InputTypeError, "float8_e4m3fn", (q.bfloat16(), k.bfloat16(), v.bfloat16()), dict(q_descale=torch.ones(1, 2))),
    ]
    for error, match, args, kw in cases:
        with pytest.raises(error, match=match):
            tk.flash_attn_func(*args, **kw)
    grad = qf.float().to(E4M3).requires_grad_()  # float8 leaves can require grad: refused by name
    with pytest.raises(InputValueError, match="inference-only"):
        tk.flash_attn_func(grad, kf, vf)


@triton.jit
def _cast(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, to_fp8(tl.load(X + i)))


def test_to_fp8_rounds_as_torch():
    """The interpreter's fp32 -> e4m3 cast goes through to_fp8's exact rounding: equal to torch's, including
    values whose rounding carries into the exponent (1.97 -> 2) and subnormals."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(1024, generator=g) * 448, torch.randn(1024, generator=g) * 3,
                   torch.rand(1024, generator=g) * 0.03, torch.tensor([1.97, -1.97, 0.0, 2 ** -9 * 1.5, 2 ** -10] * 205
                                                                      )[:1024]])
    y = torch.empty(4096, dtype=E4M3)
    _cast[(1,)](x, y, 4096)
    assert torch.equal(y.float(), x.to(E4M3).float())


@pytest.mark.parametrize("paged", [False, True])
def test_fp8_kv_cache_decoding_quantizes_what_it_appends(paged):
    """bf16 queries over an FP8 cache (per-KV-head descales, vLLM's k_scale / v_scale), two new tokens
    appended: the cache receives k / k_descale rounded to e4m3, and nothing else changes; the output meets
    the 2x contract against float64 attention over the unquantized cache (q is quantized per call), and
    a paged cache in shuffled pages of 8 rows gives the same output bit for bit."""
    g = torch.Generator().manual_seed(11)
    batch, heads, heads_k, dim, capacity, page = 2, 4, 2, 64, 40, 8
    k_true, v_true = (torch.randn(batch, capacity, heads_k, dim, generator=g) for _ in range(2))
    k_new, v_new = (torch.randn(batch, 2, heads_k, dim, generator=g) for _ in range(2))
    q = torch.randn(batch, 2, heads, dim, generator=g)
    k_descale, v_descale = torch.tensor([0.012, 0.02]), torch.tensor([0.015, 0.01])
    k_cache, v_cache = ((t / d[:, None]).to(E4M3) for t, d in ((k_true, k_descale), (v_true, v_descale)))
    lengths = torch.tensor([10, 30], dtype=torch.int32)
    before = k_cache.clone()
    if paged:
        order = torch.randperm(12, generator=g)[:10].reshape(batch, 5).to(torch.int32)
        pools = [torch.zeros(12, page, heads_k, dim, dtype=E4M3) for _ in range(2)]
        for b in range(batch):
            for p in range(5):
                for pool, cache in zip(pools, (k_cache, v_cache)):
                    pool[order[b, p]] = cache[b, p * page:(p + 1) * page]
        caches, extra = pools, dict(block_table=order)
    else:
        caches, extra = [k_cache, v_cache], {}
    out = tk.flash_attn_with_kvcache(q.bfloat16(), *caches, k_new, v_new, cache_seqlens=lengths, causal=True,
                                     k_descale=k_descale, v_descale=v_descale, **extra)
    assert tk.last_path("attention") == "triton" and out.dtype == torch.bfloat16
    if paged:
        rows = lambda pool, b: pool[order[b].long()].flatten(0, 1)  # noqa: E731
        k_cache, v_cache = (torch.stack([rows(pool, b) for b in range(batch)]) for pool in pools)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(k_cache[b, n:n + 2].float(), (k_new[b] / k_descale[:, None]).to(E4M3).float())
        assert torch.equal(k_cache[b, :n].view(torch.uint8), before[b, :n].view(torch.uint8))
    # the contract: float64 attention over the true keys (old and new) against the dequantized ones
    q8, q_descale = fp8.quantize(q.bfloat16(), group=heads // heads_k)
    outs, floors = [], []
    for b, n in enumerate((lengths + 2).tolist()):
        keys = torch.cat([k_true[b, :n - 2], k_new[b]])[None]
        values = torch.cat([v_true[b, :n - 2], v_new[b]])[None]
        deq = [fp8.dequantize(q8[b:b + 1], q_descale[b:b + 1], heads_dim=-2),
               k_cache[b:b + 1, :n].float() * k_descale[:, None], v_cache[b:b + 1, :n].float() * v_descale[:, None]]
        true = _attention64(q.bfloat16()[b:b + 1].float(), keys, values, causal=True)
        outs.append(_rmse(out[b:b + 1], true))
        floors.append(_rmse(_attention64(*deq, causal=True), true))
    assert max(o / f for o, f in zip(outs, floors)) <= 2


def test_fp8_kv_cache_bad_input_writes_nothing():
    k_cache, v_cache = (torch.randn(1, 16, 2, 32).to(E4M3) for _ in range(2))
    saved = k_cache.clone()
    q, k = torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 32)
    lengths = torch.tensor([4], dtype=torch.int32)
    cases = [
        (InputTypeError, "new k", dict(k=k.double(), v=k)),
        (InputValueError, "quantized per call", dict(k=k, v=k, q_descale=torch.ones(1, 2))),
        (InputValueError, "shape", dict(k=k, v=k, k_descale=torch.ones(3))),
    ]
    for error, match, kw in cases:
        with pytest.raises(error, match=match):
            tk.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, **kw)
        assert torch.equal(k_cache.view(torch.uint8), saved.view(torch.uint8)), "an error wrote into the cache"
    with pytest.raises(InputTypeError, match="e4m3 only"):
        tk.flash_attn_with_kvcache(q, k_cache.float().to(torch.float8_e5m2), v_cache, cache_seqlens=lengths)


def test_fp8_accuracy_benchmark_reports_the_contract():
    """benchmarks/fp8_accuracy.py (the README's figures) on a small case: the Triton kernel ran, and the
    ratios it reports are the contract's."""
    from benchmarks import fp8_accuracy

    q, k, v = fp8_accuracy.inputs(1, 48, 2, 1, 64, outliers=True)
    row = fp8_accuracy.errors(q, k, v, causal=True)
    assert row["path"] == "triton" and row["fp8_over_floor"] <= 2 and row["fp8"] > row["bf16"]


def test_fp8_forward_compiles_without_graph_breaks():
    """A torch.library custom op (transformer_kernels::attention_forward_fp8) with a fake implementation:
    torch.compile(fullgraph=True) traces through and gives the eager result."""
    q, k, v = _inputs(1, 24, 24, 2, 1, 32, seed=9)
    quantized, descales = _quantize(q, k, v)

    def f(q, k, v, q_descale, k_descale, v_descale):
        return tk.flash_attn_func(q, k, v, causal=True, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)

    explanation = torch._dynamo.explain(f)(*quantized, **descales)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*quantized, **descales)
    torch.testing.assert_close(compiled, f(*quantized, **descales), rtol=0, atol=0)


def test_fp8_transposed_v_candidate(gpu_tiles, monkeypatch):
    """Hopper's FP8 prefill candidate ``V_T`` (attention/configs.py): V copied head_dim-major once, so the
    kernel reads it K-major; the same output as the default (which the autotune guard also checks on a
    device), and the kernel really received the copy (unit stride along the keys)."""
    from transformer_kernels import autotune
    from transformer_kernels.attention import _kernels

    gpu_tiles("sm_90a")
    real, strides = _kernels._attn_fwd_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                strides.append(args[2].stride())
                return real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(_kernels, "_attn_fwd_kernel", Spy())
    q, k, v = _inputs(1, 40, 40, 2, 2, 64, seed=13)
    quantized, descales = _quantize(q, k, v)
    outs = []
    for index in (0, 1):
        with autotune.forced(index):
            outs.append(tk.flash_attn_func(*quantized, causal=True, **descales))
    assert strides[0][2] != 1 and strides[1][2] == 1, strides  # (batch, heads, keys, dim) strides of V
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=0, atol=2e-2)
    _check_contract(outs[1], q, k, v, quantized, descales, causal=True)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp8_blackwell_candidates(gpu_tiles, monkeypatch, head_dim):
    """sm_100a's FP8 prefill candidates (attention/configs.py): Hopper's 128x128 tile, which fits there
    with 8-bit operands, and at head_dim 128 the default through TMA (from Triton 3.7). Each runs in the
    interpreter with its own tiles, agrees with the default and meets the 2x accuracy contract."""
    from transformer_kernels import autotune, dispatch
    from transformer_kernels.attention import _kernels

    gpu_tiles("sm_100a")
    real, ran = _kernels._attn_fwd_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                ran.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["TMA"]))
                return real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(_kernels, "_attn_fwd_kernel", Spy())
    q, k, v = _inputs(1, 150, 139, 2, 1, head_dim, seed=head_dim)
    quantized, descales = _quantize(q, k, v)
    expected = [(128, 64, False), (128, 128, False)] + [(128, 64, True)] * (head_dim == 128 and dispatch.hopper_candidates())
    outs = []
    for index in range(len(expected)):
        with autotune.forced(index):
            outs.append(tk.flash_attn_func(*quantized, causal=True, **descales))
        _check_contract(outs[-1], q, k, v, quantized, descales, causal=True)
    assert ran == expected
    for other in outs[1:]:
        torch.testing.assert_close(other.float(), outs[0].float(), rtol=0, atol=2e-2)
