"""transformer_kernels.flash_attn_* (flash-attention's signatures and semantics) on the Triton kernels."""
import pytest
import torch

import transformer_kernels as tk
from transformer_kernels.attention import attention_reference
from helpers import check_fwd_bwd


def _bshd(batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, dtype, device):
    return (torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype, device=device),
            torch.randn(batch, seqlen_k, heads_k, head_dim, dtype=dtype, device=device),
            torch.randn(batch, seqlen_k, heads_k, head_dim, dtype=dtype, device=device))


def _flash(**kw):
    def fn(q, k, v):
        out = tk.flash_attn_func(q, k, v, **kw)
        assert tk.last_path("attention") == "triton"
        return out
    return fn


def _ref(causal=False, window=(-1, -1), **kw):
    """The reference in flash-attention's layout and alignment (bottom-right)."""
    def ref(q, k, v):
        out = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                  window=window, bottom_right=True, **kw)
        return out.transpose(1, 2)
    return ref


# --- alignment, shapes, GQA -------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(113, 203), (203, 113), (1, 512), (512, 1), (64, 64)])
@pytest.mark.parametrize("heads,heads_k", [(2, 2), (4, 2)])
def test_matches_reference(device, causal, seqlen_q, seqlen_k, heads, heads_k):
    check_fwd_bwd(_flash(causal=causal), _ref(causal=causal),
                  _bshd(1, seqlen_q, seqlen_k, heads, heads_k, 32, torch.float16, device), torch.float16)


def test_causal_is_bottom_right_aligned(device):
    """The docstring's picture: seqlen_q=2, seqlen_k=5 sees 4 then 5 keys; seqlen_q=5, seqlen_k=2 has 3
    empty rows (output 0) and then 1, 2 keys. Checked by moving one key's value and watching who notices."""
    for seqlen_q, seqlen_k, visible in ((2, 5, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
                                        (5, 2, [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]])):
        q, k, v = _bshd(1, seqlen_q, seqlen_k, 1, 1, 16, torch.float32, device)
        base = tk.flash_attn_func(q, k, v, causal=True)
        for j in range(seqlen_k):
            v2 = v.clone()
            v2[0, j] += 1.0
            moved = (tk.flash_attn_func(q, k, v2, causal=True) - base).abs().amax(dim=(0, 2, 3)) > 0
            assert moved.tolist() == [bool(row[j]) for row in visible]
        assert (base[0, [r for r, row in enumerate(visible) if not any(row)]] == 0).all()


def test_sdpa_is_top_left_aligned(device):
    """The same picture for transformer_kernels.scaled_dot_product_attention: torch's top-left triangle."""
    q, k, v = (torch.randn(1, 1, s, 16, device=device) for s in (2, 5, 5))
    base = tk.scaled_dot_product_attention(q, k, v, is_causal=True)
    seen = []
    for j in range(5):
        v2 = v.clone()
        v2[0, 0, j] += 1.0
        seen.append(((tk.scaled_dot_product_attention(q, k, v2, is_causal=True) - base).abs().amax(-1) > 0)[0, 0])
    assert torch.stack(seen, dim=1).int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]


# --- sliding windows --------------------------------------------------------------------------------
@pytest.mark.parametrize("window,causal", [((3, 3), False), ((8, 0), False), ((0, 5), False), ((-1, 4), False),
                                           ((16, -1), False), ((10, 7), True), ((0, -1), True)])
def test_sliding_window(device, window, causal):
    check_fwd_bwd(_flash(causal=causal, window_size=window), _ref(causal=causal, window=window),
                  _bshd(2, 70, 90, 2, 1, 32, torch.float16, device), torch.float16)


def test_window_skips_blocks_outside_it(device):
    """Keys whose whole block lies outside the window are never read: NaN there cannot leak in.
    (Masking instead of skipping would compute 0 * NaN = NaN in the P @ V product.)"""
    seqlen_q, seqlen_k, left = 32, 256, 8
    q, k, v = (t.requires_grad_() for t in _bshd(1, seqlen_q, seqlen_k, 2, 2, 16, torch.float32, device))
    # Query i sees keys [224 + i - 8, 224 + i]: nothing below key 216, so no block below 192 is visited
    # (the interpreter's blocks hold 32 keys; GPU blocks hold at least 16).
    with torch.no_grad():
        k[:, :192] = float("nan")
        v[:, :192] = float("nan")
    out = tk.flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (k.grad[:, :192] == 0).all() and (v.grad[:, :192] == 0).all()
    ref = _ref(causal=True, window=(left, -1))(q.detach(), k.detach()[:, 192:], v.detach()[:, 192:])
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)


# --- score modifiers --------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(device, causal):
    q, k, v = _bshd(2, 40, 50, 2, 2, 32, torch.float16, device)
    check_fwd_bwd(_flash(causal=causal, softcap=5.0), _ref(causal=causal, softcap=5.0), (q * 3, k * 3, v),
                  torch.float16)


@pytest.mark.parametrize("shape", ["heads", "batch_heads"])
def test_alibi(device, shape):
    slopes = torch.rand(4, device=device) if shape == "heads" else torch.rand(2, 4, device=device)
    check_fwd_bwd(_flash(causal=True, alibi_slopes=slopes), _ref(causal=True, alibi_slopes=slopes),
                  _bshd(2, 33, 45, 4, 2, 32, torch.float16, device), torch.float16)


def test_everything_at_once(device):
    slopes = torch.rand(4, device=device)
    kw = dict(causal=True, window_size=(12, 0), softcap=8.0, alibi_slopes=slopes)
    check_fwd_bwd(_flash(**kw), _ref(causal=True, window=(12, -1), softcap=8.0, alibi_slopes=slopes),
                  _bshd(2, 57, 71, 4, 1, 48, torch.float32, device), torch.float32)


# --- dropout and return_attn_probs ------------------------------------------------------------------
def test_dropout_and_attn_probs(device):
    """S_dmask holds the probabilities, negated where dropped; the output equals S_dmask's kept
    probabilities, rescaled by 1/(1-p), times V; about p of the visible entries are dropped."""
    p = 0.3
    q, k, v = _bshd(2, 37, 41, 4, 2, 32, torch.float32, device)
    out, lse, s_dmask = tk.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    assert s_dmask.shape == (2, 4, 37, 41) and lse.shape == (2, 4, 37)
    kept = s_dmask.clamp_min(0) / (1 - p)
    want = (kept.double() @ v.transpose(1, 2).repeat_interleave(2, dim=1).double()).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    visible = s_dmask != 0
    dropped = (s_dmask < 0).sum().item() / visible.sum().item()
    assert abs(dropped - p) < 0.03
    _, probs, lse_ref = attention_reference(q.transpose(1, 2).double(), k.transpose(1, 2).double(),
                                            v.transpose(1, 2).double(), causal=True, bottom_right=True,
                                            return_probs=True)
    torch.testing.assert_close(s_dmask.abs().double(), probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


# --- variable-length packed batches -----------------------------------------------------------------
def _packed(lens_q, lens_k, heads, heads_k, head_dim, dtype, device):
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)  # noqa: E731
    return (torch.randn(sum(lens_q), heads, head_dim, dtype=dtype, device=device),
            torch.randn(sum(lens_k), heads_k, head_dim, dtype=dtype, device=device),
            torch.randn(sum(lens_k), heads_k, head_dim, dtype=dtype, device=device), cu(lens_q), cu(lens_k))


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (6, 0)), (False, (4, 4))])
def test_varlen_equals_each_sequence_alone(device, causal, window):
    """A packed batch gives, sequence by sequence, what flash_attn_func gives on that sequence alone;
    a zero-length sequence included."""
    lens_q, lens_k = [5, 17, 0, 1, 40], [9, 17, 3, 4, 33]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 4, 2, 32, torch.float32, device)

    def packed(q, k, v):
        return tk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                              window_size=window)

    def one_by_one(q, k, v):
        outs = []
        for b in range(len(lens_q)):
            sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            outs.append(_ref(causal=causal, window=window)(q[None, sq], k[None, sk], v[None, sk])[0])
        return torch.cat(outs)

    check_fwd_bwd(packed, one_by_one, (q, k, v), torch.float32)


def test_varlen_equals_padded_batch_with_key_padding_mask(device):
    """The seeds' padding problem: a padded batch with a key-padding mask gives the packed batch's
    result on its real tokens (and the packed batch spends nothing on padding)."""
    lens = [7, 19, 12]
    q, k, v, cu, _ = _packed(lens, lens, 2, 2, 16, torch.float32, device)
    packed = tk.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens))
    padded = torch.zeros(3, 2, max(lens), 16, device=device)
    qp, kp, vp = padded.clone(), padded.clone(), padded.clone()
    for b, n in enumerate(lens):
        for src, dst in ((q, qp), (k, kp), (v, vp)):
            dst[b, :, :n] = src[cu[b]:cu[b + 1]].transpose(0, 1)
    key_padding = (torch.arange(max(lens), device=device)[None, :] < torch.tensor(lens, device=device)[:, None])
    out = tk.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_padding[:, None, None, :])
    for b, n in enumerate(lens):
        torch.testing.assert_close(out[b, :, :n].transpose(0, 1), packed[cu[b]:cu[b + 1]], rtol=1e-5, atol=1e-5)


def test_varlen_lse_layout_and_packed_variants(device):
    lens = [3, 8]
    q, k, v, cu, _ = _packed(lens, lens, 2, 2, 16, torch.float32, device)
    out, lse, s_dmask = tk.flash_attn_varlen_func(q, k, v, cu, cu, 8, 8, return_attn_probs=True)
    assert lse.shape == (2, 11) and s_dmask.shape == (2, 2, 8, 8)
    qkv = torch.stack([q, k, v], dim=1)
    torch.testing.assert_close(tk.flash_attn_varlen_qkvpacked_func(qkv, cu, 8), out)
    torch.testing.assert_close(tk.flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], 1), cu, cu, 8, 8), out)
    qd, kd, vd = _bshd(2, 9, 9, 2, 2, 16, torch.float32, device)
    dense = tk.flash_attn_func(qd, kd, vd, causal=True)
    torch.testing.assert_close(tk.flash_attn_qkvpacked_func(torch.stack([qd, kd, vd], 2), causal=True), dense)
    torch.testing.assert_close(tk.flash_attn_kvpacked_func(qd, torch.stack([kd, vd], 2), causal=True), dense)


# --- KV cache and decoding --------------------------------------------------------------------------
@pytest.mark.parametrize("num_splits", [1, 3, 0])
@pytest.mark.parametrize("seqlen_new", [1, 4])
def test_kvcache_appends_and_attends(device, num_splits, seqlen_new):
    batch, cache_len, heads, heads_k, head_dim = 3, 100, 4, 2, 32
    k_cache = torch.randn(4, cache_len, heads_k, head_dim, device=device)
    v_cache = torch.randn(4, cache_len, heads_k, head_dim, device=device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(batch, seqlen_new, heads, head_dim, device=device)
    k_new = torch.randn(batch, seqlen_new, heads_k, head_dim, device=device)
    v_new = torch.randn(batch, seqlen_new, heads_k, head_dim, device=device)
    cache_seqlens = torch.tensor([10, 0, 90], dtype=torch.int32, device=device)
    rows = torch.tensor([3, 0, 1], dtype=torch.int32, device=device)
    out, lse = tk.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                               cache_batch_idx=rows, causal=True, num_splits=num_splits,
                                               return_softmax_lse=True)
    assert tk.last_path("attention") == "triton"
    for b in range(batch):
        row, n = int(rows[b]), int(cache_seqlens[b])
        keys = torch.cat([before_k[row, :n], k_new[b]])
        values = torch.cat([before_v[row, :n], v_new[b]])
        assert torch.equal(k_cache[row, :n + seqlen_new], keys) and torch.equal(v_cache[row, :n + seqlen_new], values)
        assert torch.equal(k_cache[row, n + seqlen_new:], before_k[row, n + seqlen_new:])
        ref = _ref(causal=True)(q[b:b + 1].double(), keys[None].double(), values[None].double())
        torch.testing.assert_close(out[b:b + 1].double(), ref, rtol=2e-5, atol=2e-5)
    assert lse.shape == (batch, heads, seqlen_new) and torch.isfinite(lse).all()


def test_kvcache_split_keys_agree_with_one_pass(device, launches):
    q = torch.randn(1, 1, 8, 64, device=device)
    k_cache, v_cache = torch.randn(1, 500, 2, 64, device=device), torch.randn(1, 500, 2, 64, device=device)
    one = tk.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=450, num_splits=1,
                                         window_size=(200, 0), softcap=10.0, return_softmax_lse=True)
    with launches("attention_combine"):
        split = tk.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=450, num_splits=5,
                                               window_size=(200, 0), softcap=10.0, return_softmax_lse=True)
    for a, b in zip(one, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kvcache_has_no_backward(device):
    q = torch.randn(1, 1, 2, 16, device=device, requires_grad=True)
    out = tk.flash_attn_with_kvcache(q, torch.randn(1, 8, 2, 16, device=device),
                                         torch.randn(1, 8, 2, 16, device=device), cache_seqlens=5)
    with pytest.raises(NotImplementedError, match="no backward"):
        out.sum().backward()


# --- bad input --------------------------------------------------------------------------------------
def test_serving_arguments_are_checked(device):
    """block_table, cache_leftpad and rotary tables are supported (tests/test_serving.py); malformed ones
    get a ValueError/TypeError naming them."""
    q, k, v = _bshd(1, 2, 8, 2, 2, 16, torch.float16, device)
    for kwargs, error, match in ((dict(rotary_cos=torch.ones(8, 8, device=device)), ValueError, "rotary_cos"),
                                 (dict(cache_leftpad=torch.zeros(2, dtype=torch.int32, device=device)), TypeError,
                                  "cache_leftpad"),
                                 (dict(block_table=torch.zeros(1, 1, dtype=torch.int64, device=device)), TypeError,
                                  "block_table")):
        with pytest.raises(error, match=match):
            tk.flash_attn_with_kvcache(q, k, v, **kwargs)
    cu = torch.tensor([0, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="block_table"):
        tk.flash_attn_varlen_func(q[0], k[0][None], v[0][None], cu, cu, 2, 2, block_table=cu)


@pytest.mark.parametrize("cu_q,max_q,error,match", [
    ([0, 3, 5], 3, None, None),
    ([0, 3, 5], 2, ValueError, "max_seqlen"),
    ([0, 4, 3], 4, ValueError, "never decrease"),
    ([1, 3, 5], 3, ValueError, "start at 0"),
    ([0, 3, 9], 6, ValueError, "end at most"),
])
def test_cu_seqlens_are_checked(device, cu_q, max_q, error, match):
    q, k, v = (torch.randn(5, 2, 16, device=device) for _ in range(3))
    cu = torch.tensor(cu_q, dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    if error is None:
        tk.flash_attn_varlen_func(q, k, v, cu, cu_k, max_q, 3)
        return
    with pytest.raises(error, match=match):
        tk.flash_attn_varlen_func(q, k, v, cu, cu_k, max_q, 3)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v, d: tk.flash_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 2], device=d),
                                                       torch.tensor([0, 2], device=d), 2, 2), TypeError, "int32"),
    (lambda q, k, v, d: tk.flash_attn_func(q, k, v, window_size=(-2, 0)), ValueError, "window_size"),
    (lambda q, k, v, d: tk.flash_attn_func(q, k, v, window_size=4), TypeError, "window_size"),
    (lambda q, k, v, d: tk.flash_attn_func(q, k, v, softcap=-1.0), ValueError, "softcap"),
    (lambda q, k, v, d: tk.flash_attn_func(q, k, v, alibi_slopes=torch.ones(3, device=d)), ValueError, "alibi"),
    (lambda q, k, v, d: tk.flash_attn_func(q, k, v, alibi_slopes=torch.ones(2, device=d).half()), TypeError,
     "float32"),
    (lambda q, k, v, d: tk.flash_attn_func(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)),
     ValueError, "multiple"),
    (lambda q, k, v, d: tk.flash_attn_func(q[0], k[0], v[0]), ValueError, "batch, seqlen"),
    (lambda q, k, v, d: tk.flash_attn_with_kvcache(q, k, v, k, v), ValueError, "cache_seqlens"),
    (lambda q, k, v, d: tk.flash_attn_with_kvcache(q, k, v, k, v, cache_seqlens=6), ValueError, "too short"),
    (lambda q, k, v, d: tk.flash_attn_with_kvcache(q, k, v, cache_seqlens=torch.tensor([1], device=d)),
     TypeError, "cache_seqlens"),
])
def test_bad_input_raises(device, call, error, match):
    q, k, v = _bshd(1, 2, 8, 2, 2, 16, torch.float32, device)
    with pytest.raises(error, match=match):
        call(q, k, v, device)


# --- GPU only ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_large(dtype, head_dim):
    slopes = torch.rand(8, device="cuda")
    check_fwd_bwd(_flash(causal=True, window_size=(300, 0), alibi_slopes=slopes, softcap=20.0),
                  _ref(causal=True, window=(300, -1), alibi_slopes=slopes, softcap=20.0),
                  _bshd(2, 1500, 2000, 8, 2, head_dim, dtype, "cuda"), dtype)


@pytest.mark.gpu
def test_gpu_decode_long_cache():
    q = torch.randn(1, 1, 16, 128, device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(1, 65536, 2, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    out = tk.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=60000, causal=True)
    ref = _ref(causal=True)(q.float(), k_cache[:, :60000].float(), v_cache[:, :60000].float())
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
