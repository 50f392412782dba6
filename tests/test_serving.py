"""Serving features (issue 14): paged KV caches, cache_leftpad, rotary embeddings, learnable sinks and
return_softmax_lse, against float64 references built from plain (unpaged) tensors.

The semantics are flash-attention's (``tests/test_flash_attn.py::test_flash_attn_kvcache`` there):
keys of sequence b are cache rows ``cache_leftpad[b] .. cache_seqlens[b] + seqlen_new``; new keys are
written at rows ``cache_seqlens[b] ..``; rotary positions count from the left padding.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import transformer_kernels as tk
from transformer_kernels.attention import attention_reference
from helpers import check_fwd_bwd


def _angles(seqlen_ro, rotary_dim, device):
    angles = torch.rand(seqlen_ro, rotary_dim // 2, device=device) * 6.0
    return angles.cos(), angles.sin()


def _rotate(x, cos, sin, positions, interleaved):
    """float64 RoPE of x (seqlen, heads, dim) at integer ``positions`` (seqlen,)."""
    x = x.double()
    half = cos.shape[1]
    c, s = cos.double()[positions][:, None], sin.double()[positions][:, None]
    out = x.clone()
    if interleaved:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        out[..., 0:2 * half:2], out[..., 1:2 * half:2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :half], x[..., half:2 * half]
        out[..., :half], out[..., half:2 * half] = a * c - b * s, a * s + b * c
    return out


def _paged(cache_rows, page_size, device, spare=3):
    """A shuffled page pool holding ``cache_rows`` (batch, rows, heads, dim), and its block table."""
    batch, rows = cache_rows.shape[:2]
    pages_per_seq = -(-rows // page_size)
    padded = cache_rows.new_zeros((batch, pages_per_seq * page_size, *cache_rows.shape[2:]))
    padded[:, :rows] = cache_rows
    num_pages = batch * pages_per_seq + spare
    order = torch.randperm(num_pages, device=device)[:batch * pages_per_seq]
    pool = torch.randn(num_pages, page_size, *cache_rows.shape[2:], device=device, dtype=cache_rows.dtype)
    pool[order] = padded.reshape(batch * pages_per_seq, page_size, *cache_rows.shape[2:])
    return pool, order.reshape(batch, pages_per_seq).to(torch.int32)


# --- paged KV cache, left padding, appends, rotary ---------------------------------------------------
KVCACHE_CASES = [  # (page_size, paged, leftpad, rotary, interleaved, causal, extra)
    (16, True, False, False, False, True, {}),
    (5, True, True, True, False, True, {}),
    (16, True, True, True, True, False, {}),
    (7, True, False, True, True, True, dict(window_size=(6, 0), softcap=5.0)),
    (16, False, True, True, False, True, dict(num_splits=3)),
    (8, True, True, False, False, True, dict(num_splits=3, alibi=True)),
    (32, True, False, True, False, True, {}),  # pages a multiple of the key tile: one lookup per tile
    (64, True, False, False, True, False, dict(num_splits=3, window_size=(20, 3))),
]


@pytest.mark.parametrize("page_size,paged,leftpad,use_rotary,interleaved,causal,extra", KVCACHE_CASES)
def test_kvcache_paged_leftpad_rotary_against_unpaged_reference(device, launches, page_size, paged, leftpad,
                                                                 use_rotary, interleaved, causal, extra):
    """Appends that cross page boundaries, shuffled pages, page sizes that do and do not divide the
    sequences, GQA; out, the written cache and softmax_lse against float64 on the unpaged cache."""
    torch.manual_seed(0)
    batch, heads, heads_k, dim, seqlen_q, seqlen_new, rows = 3, 4, 2, 16, 2, 3, 40
    lengths = torch.tensor([13, 2, 30], dtype=torch.int32, device=device)
    pads = torch.tensor([4, 0, 11], dtype=torch.int32, device=device) if leftpad else None
    k_rows, v_rows = (torch.randn(batch, rows, heads_k, dim, device=device) for _ in range(2))
    q = torch.randn(batch, seqlen_q, heads, dim, device=device)
    k_new, v_new = (torch.randn(batch, seqlen_new, heads_k, dim, device=device) for _ in range(2))
    cos, sin = _angles(64, 12, device) if use_rotary else (None, None)
    alibi = torch.rand(heads, device=device) if extra.get("alibi") else None
    kw = {key: val for key, val in extra.items() if key != "alibi"}
    if paged:
        k_cache, table = _paged(k_rows, page_size, device)
        v_cache = torch.randn_like(k_cache)
        v_cache[table.flatten().long()] = torch.nn.functional.pad(
            v_rows, (0, 0, 0, 0, 0, table.shape[1] * page_size - rows)).reshape(-1, page_size, heads_k, dim)
    else:
        k_cache, v_cache, table = k_rows.clone(), v_rows.clone(), None
    with launches("attention_fwd"):
        out, lse = tk.flash_attn_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lengths,
            cache_leftpad=pads, block_table=table, causal=causal, rotary_interleaved=interleaved,
            alibi_slopes=alibi, return_softmax_lse=True, **kw)
    assert tk.last_path("attention") == "triton"
    window = kw.get("window_size", (-1, -1))
    for b in range(batch):
        first, end = (int(pads[b]) if leftpad else 0), int(lengths[b])
        offset = end - first
        k_b, q_b = k_new[b], q[b]
        if use_rotary:
            k_b = _rotate(k_b, cos, sin, torch.arange(seqlen_new, device=device) + offset, interleaved)
            q_pos = torch.arange(seqlen_q, device=device) + offset if causal or window != (-1, -1) else \
                torch.full((seqlen_q,), offset, device=device)
            q_b = _rotate(q_b, cos, sin, q_pos, interleaved)
        keys = torch.cat([k_rows[b, first:end].double(), k_b.double()])
        values = torch.cat([v_rows[b, first:end].double(), v_new[b].double()])
        ref, _, ref_lse = attention_reference(
            q_b.double().transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), causal=causal,
            bottom_right=True, window=(window[0], 0 if causal else window[1]), softcap=kw.get("softcap", 0.0),
            alibi_slopes=None if alibi is None else alibi.double(), return_probs=True)
        torch.testing.assert_close(out[b].double(), ref.transpose(0, 1), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse[b].double(), ref_lse, atol=2e-5, rtol=1e-5)
        written = (k_cache[table[b].long()].flatten(0, 1) if paged else k_cache[b])[end:end + seqlen_new]
        torch.testing.assert_close(written.double(), k_b.double(), atol=1e-6, rtol=1e-6)


@settings(max_examples=12, deadline=None)
@given(page_size=st.one_of(st.integers(1, 20), st.sampled_from([32, 64])), lengths=st.lists(st.integers(1, 45), min_size=1, max_size=3),
       causal=st.booleans(), splits=st.sampled_from([0, 1, 2]), seed=st.integers(0, 2**16))
def test_property_paged_equals_unpaged(page_size, lengths, causal, splits, seed):
    """The same cache contents paged (any page size, shuffled pages) and unpaged give the same output."""
    torch.manual_seed(seed)
    batch, rows = len(lengths), 48
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    k_rows, v_rows = (torch.randn(batch, rows, 2, 16) for _ in range(2))
    q = torch.randn(batch, 1, 4, 16)
    k_pool, table = _paged(k_rows, page_size, "cpu")
    v_pool = torch.empty_like(k_pool)
    v_pool[table.flatten().long()] = torch.nn.functional.pad(
        v_rows, (0, 0, 0, 0, 0, table.shape[1] * page_size - rows)).reshape(-1, page_size, 2, 16)
    paged = tk.flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=cache_seqlens, block_table=table,
                                            causal=causal, num_splits=splits)
    plain = tk.flash_attn_with_kvcache(q, k_rows, v_rows, cache_seqlens=cache_seqlens, causal=causal,
                                            num_splits=splits)
    torch.testing.assert_close(paged, plain, atol=1e-6, rtol=1e-6)


def test_varlen_over_a_paged_cache(device, launches):
    """flash_attn_varlen_func with block_table: forward equals the packed (unpaged) keys, softmax_lse
    as in the unpaged call; gradients reach the page pools."""
    torch.manual_seed(0)
    lengths_q, lengths_k, page_size = [3, 1, 5], [9, 20, 6], 8
    cu_q = torch.tensor([0, 3, 4, 9], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 29, 35], dtype=torch.int32, device=device)
    q = torch.randn(sum(lengths_q), 4, 16, device=device)
    k_rows, v_rows = (torch.randn(3, 24, 2, 16, device=device) for _ in range(2))
    k_pool, table = _paged(k_rows, page_size, device)
    v_pool = torch.empty_like(k_pool)
    v_pool[table.flatten().long()] = v_rows.reshape(-1, page_size, 2, 16)
    packed_k = torch.cat([k_rows[b, :n] for b, n in enumerate(lengths_k)])
    packed_v = torch.cat([v_rows[b, :n] for b, n in enumerate(lengths_k)])
    with launches("attention_fwd"):
        out, lse = tk.flash_attn_varlen_func(q, k_pool, v_pool, cu_q, cu_k, 5, 20, causal=True,
                                                  block_table=table, return_softmax_lse=True)
    want, want_lse = tk.flash_attn_varlen_func(q, packed_k, packed_v, cu_q, cu_k, 5, 20, causal=True,
                                                    return_softmax_lse=True)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-6)
    # Training through the pages: dQ as unpaged, dK and dV land in the pages the sequences use.
    leaves = [t.clone().requires_grad_() for t in (q, k_pool, v_pool)]
    out = tk.flash_attn_varlen_func(*leaves, cu_q, cu_k, 5, 20, causal=True, block_table=table)
    dout = torch.randn_like(out)
    out.backward(dout)
    plain = [t.clone().requires_grad_() for t in (q, packed_k, packed_v)]
    tk.flash_attn_varlen_func(*plain, cu_q, cu_k, 5, 20, causal=True).backward(dout)
    torch.testing.assert_close(leaves[0].grad, plain[0].grad, atol=1e-6, rtol=1e-6)
    for pool_grad, packed_grad in ((leaves[1].grad, plain[1].grad), (leaves[2].grad, plain[2].grad)):
        start = 0
        for b, n in enumerate(lengths_k):
            rows = pool_grad[table[b].long()].flatten(0, 1)
            torch.testing.assert_close(rows[:n], packed_grad[start:start + n], atol=1e-6, rtol=1e-6)
            assert rows[n:].abs().max() == 0
            start += n


def _kvcache_args(device, page_size=4):
    k_rows, v_rows = (torch.randn(2, 8, 2, 16, device=device) for _ in range(2))
    k_pool, table = _paged(k_rows, page_size, device)
    return dict(q=torch.randn(2, 1, 4, 16, device=device), k_cache=k_pool, v_cache=torch.randn_like(k_pool),
                k=torch.randn(2, 1, 2, 16, device=device), v=torch.randn(2, 1, 2, 16, device=device),
                cache_seqlens=torch.tensor([3, 5], dtype=torch.int32, device=device), block_table=table)


BAD_SERVING_INPUTS = [
    ("page index out of range", lambda a: dict(block_table=a["block_table"].clone().fill_(99)), ValueError,
     "block_table holds page indices outside"),
    ("block_table not int32", lambda a: dict(block_table=a["block_table"].long()), TypeError,
     "block_table must be an int32"),
    ("block_table of the wrong shape", lambda a: dict(block_table=a["block_table"][:1]), ValueError,
     r"block_table must have shape \(batch=2"),
    ("pages too few for the append", lambda a: dict(cache_seqlens=torch.tensor([3, 8], dtype=torch.int32,
                                                                               device=a["q"].device)),
     ValueError, "too short to append"),
    ("rotary tables too short", lambda a: dict(rotary_cos=torch.ones(4, 8, device=a["q"].device),
                                              rotary_sin=torch.zeros(4, 8, device=a["q"].device)),
     ValueError, "rotary tables of 4 positions are too short"),
    ("rotary without sin", lambda a: dict(rotary_cos=torch.ones(16, 8, device=a["q"].device)), ValueError,
     "rotary_cos and rotary_sin"),
    ("sink of the wrong shape", lambda a: dict(learnable_sink=torch.zeros(3, device=a["q"].device)), ValueError,
     r"learnable_sink must have shape \(4,\)"),
    ("cache_leftpad past cache_seqlens", lambda a: dict(cache_leftpad=torch.tensor([4, 0], dtype=torch.int32,
                                                                                  device=a["q"].device)),
     ValueError, "cache_leftpad must lie in"),
    ("cache_batch_idx with block_table", lambda a: dict(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32,
                                                                                    device=a["q"].device)),
     ValueError, "cache_batch_idx and block_table"),
]


@pytest.mark.parametrize("case,change,error,match", BAD_SERVING_INPUTS, ids=[c[0] for c in BAD_SERVING_INPUTS])
def test_bad_serving_input_is_refused_before_the_cache_changes(device, case, change, error, match):
    torch.manual_seed(0)
    args = _kvcache_args(device)
    args.update(change(args))
    before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(error, match=match):
        tk.flash_attn_with_kvcache(**args)
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


# --- learnable sinks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_learnable_sink_forward_and_backward(device, launches, causal, dtype):
    """A sink per query head (GQA) joins the softmax normalizer: out, dq, dk, dv and d(sink) against
    float64 (flash standard); the logsumexp includes the sink."""
    torch.manual_seed(0)
    q = torch.randn(2, 11, 4, 16, device=device, dtype=dtype)
    k, v = (torch.randn(2, 17, 2, 16, device=device, dtype=dtype) for _ in range(2))
    sink = torch.randn(4, device=device, dtype=dtype)

    def ours(q, k, v, sink):
        out = tk.flash_attn_func(q, k, v, causal=causal, learnable_sink=sink)
        assert tk.last_path("attention") == "triton"
        return out

    def ref(q, k, v, sink):
        return attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                   bottom_right=True, sinks=sink).transpose(1, 2)

    with launches("attention_fwd"), launches("attention_bwd_dq"):
        check_fwd_bwd(ours, ref, (q, k, v, sink), dtype, names=("dq", "dk", "dv", "dsink"))
    _, lse = tk.flash_attn_func(q, k, v, causal=causal, learnable_sink=sink, return_softmax_lse=True)
    _, _, ref_lse = attention_reference(*(t.double().transpose(1, 2) for t in (q, k, v)), causal=causal,
                                        bottom_right=True, sinks=sink.double(), return_probs=True)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-3, rtol=1e-3)


def test_learnable_sink_in_sdpa_varlen_and_split_decoding(device):
    """The same sinks through scaled_dot_product_attention (gradient included), a packed batch, and
    decoding with the keys split (only one slice counts the sink)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, device=device) for _ in range(3))
    sink = torch.randn(4, device=device)
    check_fwd_bwd(lambda q, k, v, s: tk.scaled_dot_product_attention(q, k, v, is_causal=True, learnable_sink=s),
                  lambda q, k, v, s: attention_reference(q, k, v, causal=True, sinks=s), (q, k, v, sink),
                  torch.float32, names=("dq", "dk", "dv", "dsink"))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    flat = [t[0].transpose(0, 1) for t in (q, k, v)]  # (9, 4, 16), two sequences of 4 and 5
    out = tk.flash_attn_varlen_func(*flat, cu, cu, 5, 5, causal=True, learnable_sink=sink)
    for a, b in ((0, 4), (4, 9)):
        want = attention_reference(*(t[a:b].transpose(0, 1).double() for t in flat), causal=True,
                                   sinks=sink.double())
        torch.testing.assert_close(out[a:b].double(), want.transpose(0, 1), atol=2e-5, rtol=1e-4)
    k_cache, v_cache = (torch.randn(1, 80, 2, 16, device=device) for _ in range(2))
    qd = torch.randn(1, 1, 4, 16, device=device)
    split = tk.flash_attn_with_kvcache(qd, k_cache, v_cache, num_splits=4, learnable_sink=sink)
    want = attention_reference(*(t[0].transpose(0, 1).double() for t in (qd, k_cache, v_cache)), sinks=sink.double())
    torch.testing.assert_close(split[0].double(), want.transpose(0, 1), atol=2e-5, rtol=1e-4)


# --- rotary -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets", ["none", "int", "tensor"])
def test_apply_rotary_emb_forward_and_backward(device, launches, interleaved, offsets):
    """Partial rotary (12 of 16 dims, the rest passed through), both pair layouts, per-sequence offsets."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 16, device=device)
    cos, sin = _angles(20, 12, device)
    seqlen_offsets = {"none": 0, "int": 4, "tensor": torch.tensor([2, 9], dtype=torch.int32, device=device)}[offsets]

    def ours(x):
        out = tk.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=seqlen_offsets)
        assert tk.last_path("rotary") == "triton"
        return out

    def ref(x):
        base = seqlen_offsets if isinstance(seqlen_offsets, int) else seqlen_offsets[:, None]
        pos = (torch.arange(7, device=device)[None] + base).expand(2, 7)
        rows = [_rotate(x[b], cos, sin, pos[b], interleaved) for b in range(2)]
        return torch.stack(rows).to(x.dtype)

    with launches("rotary", 2):
        check_fwd_bwd(ours, ref, (x,), torch.float32, names=("dx",))


def test_apply_rotary_emb_varlen_inplace_and_bad_input(device):
    torch.manual_seed(0)
    x = torch.randn(9, 2, 8, device=device)
    cos, sin = _angles(12, 8, device)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    want = torch.cat([_rotate(x[0:4], cos, sin, torch.arange(4, device=device) + 1, False),
                      _rotate(x[4:9], cos, sin, torch.arange(5, device=device) + 1, False)])
    y = x.clone()
    out = tk.apply_rotary_emb(y, cos, sin, inplace=True, seqlen_offsets=1, cu_seqlens=cu, max_seqlen=5)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y.double(), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="rotary tables of 12 positions are too short"):
        tk.apply_rotary_emb(torch.randn(1, 13, 2, 8, device=device), cos, sin)
    with pytest.raises(ValueError, match="rotary_dim 10"):
        tk.apply_rotary_emb(torch.randn(1, 4, 2, 8, device=device), *_angles(12, 10, device))
    with pytest.raises(TypeError, match="seqlen_offsets"):
        tk.apply_rotary_emb(torch.randn(2, 4, 2, 8, device=device), cos, sin, seqlen_offsets=[1, 2])


def test_unused_page_table_entries_may_hold_anything(device):
    """vLLM and transformers mark the pages a sequence does not use -1: only the used entries are checked."""
    torch.manual_seed(0)
    args = _kvcache_args(device)
    table = args["block_table"]
    padded = torch.cat([table, torch.full_like(table, -1)], dim=1)
    want = tk.flash_attn_with_kvcache(**{**args, "k_cache": args["k_cache"].clone(),
                                              "v_cache": args["v_cache"].clone()})
    got = tk.flash_attn_with_kvcache(**{**args, "block_table": padded})
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
