"""transformer_kernels.autotune: the device's choice among statically verified candidates, and every candidate's
correctness through the interpreter (issue 12, item 4).

No GPU here, so the timer is replaced by one that runs each candidate for real (through the
interpreter) and reports made-up times; what is tested is the choice, the caches, the dropped
candidates, and that each candidate computes the right attention.
"""
import importlib
import json
import warnings

import pytest
import triton
import torch

import transformer_kernels as tk
from transformer_kernels import autotune, dispatch
from transformer_kernels.attention import attention_reference
from helpers import check_fwd_bwd

configs = importlib.import_module("transformer_kernels.attention.configs")
launch_mod = importlib.import_module("transformer_kernels.attention.launch")


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """Timing on as on a GPU, with a fake timer: ``tuner(times)`` maps a candidate's name (or a
    predicate on its config) to milliseconds; each timed candidate is launched for real once. Returns
    the list of (op, config) timed."""
    monkeypatch.setenv("KERNELS_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", {})
    monkeypatch.setattr(autotune, "_disk_cache", None)
    monkeypatch.setattr(autotune, "_warned", set())
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    timed = []

    def use(times):
        def measure(launch, cfg):
            timed.append(cfg)
            launch(cfg)
            return times(cfg)
        monkeypatch.setattr(autotune, "_measure", measure)
        return timed

    return use


def _op(calls):
    def launch(cfg):
        calls.append(cfg)
        if cfg.get("fail"):
            raise RuntimeError("out of resources")
    return launch


def test_fastest_candidate_wins_and_is_stored(tuner):
    timed = tuner(lambda cfg: cfg["ms"])
    cands = [dict(ms=3.0), dict(ms=1.0), dict(ms=2.0)]
    calls = []
    assert autotune.choose("op", ("k",), cands, _op(calls), torch.device("cpu")) == cands[1]
    assert len(timed) == 3
    assert autotune.choose("op", ("k",), cands, _op(calls), torch.device("cpu")) == cands[1]
    assert len(timed) == 3, "a known key is not timed again"
    stored = json.loads(autotune.cache_path().read_text())
    (key,) = [k for k in stored if not k.startswith("timed: ")]
    assert stored[key] == autotune.name(cands[1])
    assert stored[f"timed: {key}"] == {autotune.name(c): c["ms"] for c in cands}, "each candidate's time is kept"
    # a new process: nothing in memory, the file answers
    autotune._memory.clear()
    autotune._disk_cache = None
    assert autotune.choose("op", ("k",), cands, _op(calls), torch.device("cpu")) == cands[1]
    assert len(timed) == 3
    # another bucket is timed on its own
    autotune.choose("op", ("other",), cands, _op(calls), torch.device("cpu"))
    assert len(timed) == 6


def test_a_changed_candidate_list_is_timed_again(tuner):
    timed = tuner(lambda cfg: cfg["ms"])
    autotune.choose("op", ("k",), [dict(ms=3.0), dict(ms=1.0)], _op([]), torch.device("cpu"))
    assert autotune.choose("op", ("k",), [dict(ms=3.0), dict(ms=4.0)], _op([]), torch.device("cpu")) == dict(ms=3.0)
    assert len(timed) == 4


def test_failing_candidate_is_dropped_with_one_warning(tuner):
    tuner(lambda cfg: cfg["ms"])
    cands = [dict(ms=2.0), dict(ms=1.0, fail=True)]
    with pytest.warns(RuntimeWarning, match="failed .* dropped") as caught:
        assert autotune.choose("op", ("a",), cands, _op([]), torch.device("cpu")) == cands[0]
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same failure on another bucket warns no more
        assert autotune.choose("op", ("b",), cands, _op([]), torch.device("cpu")) == cands[0]


def test_all_failing_gives_the_default(tuner):
    tuner(lambda cfg: 1.0)
    cands = [dict(fail=True, i=0), dict(fail=True, i=1)]
    with pytest.warns(RuntimeWarning):
        assert autotune.choose("op", ("a",), cands, _op([]), torch.device("cpu")) == cands[0]


def test_a_wrong_candidate_is_dropped_with_one_warning_and_recorded(tuner):
    """The guard (issue 22, item 6): each candidate's outputs are compared with the default's on the same
    call before it is timed; a fast candidate whose results differ is dropped, never chosen, and
    recorded beside the winners. One within rounding is kept."""
    timed = tuner(lambda cfg: cfg["ms"])
    out = torch.empty(64)

    def launch(cfg):
        out.copy_(torch.linspace(-1, 1, 64) * cfg["value"])

    cands = [dict(ms=3.0, value=1.0), dict(ms=1.0, value=1.5), dict(ms=2.0, value=1.0 + 1e-6)]
    with pytest.warns(RuntimeWarning, match="disagrees with the default .* dropped") as caught:
        chosen = autotune.choose("op", ("k",), cands, launch, torch.device("cpu"), outputs=lambda: [out])
    assert chosen == cands[2], "the wrong candidate was fastest and must not win"
    assert len(caught) == 1 and cands[1] not in timed
    stored = json.loads(autotune.cache_path().read_text())
    rejected = {k: v for k, v in stored.items() if k.startswith("rejected: ")}
    assert len(rejected) == 1 and autotune.name(cands[1]) in next(iter(rejected))
    assert "relative difference" in next(iter(rejected.values()))
    (times,) = [v for k, v in stored.items() if k.startswith("timed: ")]
    assert times == {autotune.name(cands[0]): 3.0, autotune.name(cands[1]): "rejected", autotune.name(cands[2]): 2.0}
    # a NaN where the default has a number is a disagreement too
    autotune._memory.clear()
    autotune._warned.clear()
    nan = dict(ms=0.5, value=float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert autotune.choose("op", ("k2",), [cands[0], nan], launch, torch.device("cpu"),
                               outputs=lambda: [out]) == cands[0]


def test_a_wrong_attention_candidate_is_never_chosen(device, gpu_tiles, tuner, monkeypatch):
    """A real launcher under the guard: the TMA forward candidate is made to write a wrong output (a
    stand-in for a kernel no GPU has run); timed as fastest, it is dropped and the result is exact."""
    gpu_tiles("sm_90a")
    kernels_mod = importlib.import_module("transformer_kernels.attention._kernels")
    real = kernels_mod._attn_fwd_kernel

    class Corrupted:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                real[grid](*args, **kwargs)
                if kwargs.get("TMA"):
                    args[3].add_(1.0)  # O (or its split partials)
            return run

    monkeypatch.setattr(kernels_mod, "_attn_fwd_kernel", Corrupted())
    tuner(lambda cfg: 1.0 if cfg.get("TMA") else 2.0)
    with pytest.warns(RuntimeWarning, match="attention_fwd: candidate .*TMA=True.* disagrees"):
        check_fwd_bwd(_sdpa, _ref, _qkv(40, 40, 64, device), torch.float16)
    assert not any("TMA=True" in w for k, w in autotune._memory.items() if k.startswith("attention_fwd"))


def test_nothing_is_timed_without_a_gpu_or_when_disabled(monkeypatch):
    def never(*args):
        raise AssertionError("timed")
    monkeypatch.setattr(autotune, "_measure", never)
    cands = [dict(a=1), dict(a=2)]
    assert not autotune.enabled(torch.device("cpu"))
    assert autotune.choose("op", ("k",), cands, never, torch.device("cpu")) == cands[0]
    monkeypatch.setenv("KERNELS_AUTOTUNE", "0")
    assert not autotune.enabled(torch.device("cuda"))
    with autotune.forced(1):
        assert autotune.choose("op", ("k",), cands, never, torch.device("cpu")) == cands[1]
    with autotune.forced(5):
        assert autotune.choose("op", ("k",), cands, never, torch.device("cpu")) == cands[1]


def _qkv(seqlen_q, seqlen_k, head_dim, device, dtype=torch.float16):
    g = torch.Generator().manual_seed(seqlen_q * 1000 + head_dim)
    return [torch.randn(1, 2, n, head_dim, generator=g, dtype=dtype).to(device) for n in (seqlen_q, seqlen_k, seqlen_k)]


def _sdpa(q, k, v):
    out = tk.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert tk.last_path("attention") == "triton"
    return out


def _ref(q, k, v):
    return attention_reference(q, k, v, causal=True)


def test_attention_launcher_times_every_candidate_and_runs_the_winner(device, gpu_tiles, tuner, launches):
    """sm_90a, head_dim 64: the forward times its pointer and TMA candidates, the backward its dK/dV and
    dQ candidates, each launched for real; the fake timer prefers TMA, and the result is exact."""
    gpu_tiles("sm_90a")
    timed = tuner(lambda cfg: 1.0 if cfg.get("TMA") else 2.0 + cfg["num_warps"] / 100)
    with launches("attention_fwd"), launches("attention_bwd_dq"):
        check_fwd_bwd(_sdpa, _ref, _qkv(40, 40, 64, device), torch.float16)
    if dispatch.hopper_candidates():
        assert any(c.get("TMA") for c in timed) and any(c.get("TMA") is False for c in timed)
        assert len(timed) == 3 + 3 + 3  # forward: pointers, TMA, persistent; dK/dV and dQ: pointers, TMA, another tile
        assert any("TMA=True" in w for w in autotune._memory.values())
    else:  # Triton < 3.7: the forward's default, and dK/dV and dQ each with another tile
        assert len(timed) == 1 + 2 + 2 and not any(c.get("TMA") for c in timed)


def _arch_candidates(arch, head_dim, seqlen_q=150, heavy=False):
    from transformer_kernels import dispatch
    saved, dispatch.INTERPRETER = dispatch.INTERPRETER, False
    try:
        fwd = configs.fwd_candidates(head_dim, torch.float16, seqlen_q, heavy, arch)
        dkdv, dq = configs.bwd_candidates(head_dim, torch.float16, heavy, arch)
    finally:
        dispatch.INTERPRETER = saved
    return max(len(fwd), len(dkdv), len(dq))


def _count_tma_launches(monkeypatch, module):
    """The list that records each launch of ``module``'s launchers that built tensor descriptors (they
    ask for scratch memory only then)."""
    runs, real = [], module.scratch_allocator

    def counting(device):
        runs.append(device)
        return real(device)
    monkeypatch.setattr(module, "scratch_allocator", counting)
    return runs


@pytest.fixture
def tma_runs(monkeypatch):
    """Attention launches that built tensor descriptors."""
    return _count_tma_launches(monkeypatch, launch_mod)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_every_sm90_candidate_is_exact(device, gpu_tiles, tma_runs, head_dim):
    """Each Hopper candidate after the default (the default runs in test_attention's gpu-tile tests):
    fp16, causal, lengths that are no multiple of any block, forward and backward."""
    gpu_tiles("sm_90a")
    count = _arch_candidates("sm_90a", head_dim)
    assert count >= 2 or not dispatch.hopper_candidates()
    for index in range(1, count):
        with autotune.forced(index):
            check_fwd_bwd(_sdpa, _ref, _qkv(150, 139, head_dim, device), torch.float16)
    assert tma_runs or not dispatch.hopper_candidates(), "no candidate used tensor descriptors"


def test_tma_candidate_on_packed_batches_and_a_kv_cache(device, gpu_tiles, tma_runs):
    """Tensor descriptors bounded per sequence: a packed (varlen) batch (TMA, then the persistent
    schedule), and decoding from a cache whose rows beyond each sequence's length hold NaN (they must
    never be read)."""
    if not dispatch.hopper_candidates():
        pytest.skip(f"Triton {triton.__version__}: no TMA attention candidates before 3.7")
    gpu_tiles("sm_90a")
    lens = [5, 70, 1, 33, 140]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(sum(lens), 2, 64, dtype=torch.float16, device=device) for _ in range(3))
    for index in (1, 2):
        with autotune.forced(index):
            packed = tk.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
        assert len(tma_runs) == index
        for b, n in enumerate(lens):
            s = slice(int(cu[b]), int(cu[b + 1]))
            ref = _ref(*(t[None, s].transpose(1, 2).double() for t in (q, k, v)))[0].transpose(0, 1)
            torch.testing.assert_close(packed[s].double(), ref, rtol=2e-3, atol=2e-3)

    k_cache = torch.full((2, 96, 2, 64), float("nan"), dtype=torch.float16, device=device)
    v_cache = k_cache.clone()
    lengths = [40, 77]
    for b, n in enumerate(lengths):
        k_cache[b, :n], v_cache[b, :n] = torch.randn(2, n, 2, 64, dtype=torch.float16, device=device)
    qd = torch.randn(2, 1, 2, 64, dtype=torch.float16, device=device)
    with autotune.forced(1):
        out = tk.flash_attn_with_kvcache(qd, k_cache, v_cache, cache_seqlens=torch.tensor(
            lengths, dtype=torch.int32, device=device), num_splits=1)
    assert len(tma_runs) == 3
    for b, n in enumerate(lengths):
        ref = attention_reference(*(t[b:b + 1, :n].transpose(1, 2).double() for t in (qd, k_cache, v_cache)))
        torch.testing.assert_close(out[b:b + 1].transpose(1, 2).double(), ref, rtol=2e-3, atol=2e-3)


def test_tma_is_dropped_for_unaligned_strides(device, gpu_tiles, tma_runs):
    """A key whose rows are 68 halves apart (136 bytes: not a multiple of 16) cannot be described to
    TMA: the pointer path runs instead, exactly."""
    gpu_tiles("sm_90a")
    q = torch.randn(1, 2, 40, 64, dtype=torch.float16, device=device)
    k = torch.randn(1, 2, 40, 68, dtype=torch.float16, device=device)[..., :64]
    v = torch.randn(1, 2, 40, 64, dtype=torch.float16, device=device)
    with autotune.forced(1):
        out = _sdpa(q, k, v)
    assert not tma_runs
    torch.testing.assert_close(out.double(), _ref(q.double(), k.double(), v.double()), rtol=2e-3, atol=2e-3)


# --- the FFN's matmul candidates ----------------------------------------------------------------------
ffn_mod = importlib.import_module("transformer_kernels.ffn")


@pytest.fixture
def ffn_sm90(monkeypatch):
    """The FFN launcher offers its sm_90a candidates here (the interpreter otherwise has one), and
    counts the launches that built tensor descriptors."""
    from transformer_kernels import dispatch
    real = ffn_mod.candidates

    def on_hopper(dtype, epilogue, second, arch, residual=False):
        with monkeypatch.context() as m:
            m.setattr(dispatch, "INTERPRETER", False)
            return real(dtype, epilogue, second, "sm_90a", residual)
    monkeypatch.setattr(ffn_mod, "candidates", on_hopper)
    return _count_tma_launches(monkeypatch, ffn_mod)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_every_sm90_ffn_candidate_is_exact(device, ffn_sm90, activation):
    """Each Hopper matmul candidate (TMA at the default tile, TMA 128x256x64 for the plain products, the
    warp-specialized TMA loop, the persistent TMA schedule):
    forward and every gradient of an FFN with a residual, shapes that are no multiple of any tile,
    row- and column-major operands (x W^T, dy^T h)."""
    from test_ffn import _check, _params
    gated = activation == "swiglu"
    for index in (1, 2, 3, 4):
        x = torch.randn(3, 45, 48, dtype=torch.float16, device=device)
        with autotune.forced(index):
            _check(x, _params(48, 136, torch.float16, device, gated=gated), activation, torch.float16,
                   residual=torch.randn_like(x))
    assert ffn_sm90, "no candidate used tensor descriptors"


def test_ffn_tma_is_dropped_for_unaligned_operands(device, ffn_sm90):
    """d_model 36 and d_ff 44 (72- and 88-byte rows, no multiple of 16) cannot be described to TMA:
    every product runs the pointer path, exactly."""
    from test_ffn import _check, _params
    x = torch.randn(2, 20, 36, dtype=torch.float16, device=device)
    with autotune.forced(1):
        _check(x, _params(36, 44, torch.float16, device), "relu", torch.float16)
    assert not ffn_sm90


def test_candidates_agree_with_the_default_under_every_modifier(device, gpu_tiles, tma_runs):
    """sm_90a, GQA, a causal window, soft-capping, ALiBi and dropout at once: each candidate (TMA,
    persistent; the backward's TMA) draws the same dropout mask and gives the default's output and
    gradients, up to fp16 rounding."""
    gpu_tiles("sm_90a")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, h, 64, generator=g, dtype=torch.float16).to(device)
               for n, h in ((150, 4), (139, 2), (139, 2)))
    kw = dict(causal=True, window_size=(40, 0), softcap=8.0, alibi_slopes=torch.rand(4, generator=g).to(device),
              dropout_p=0.2)
    results = []
    for index in range(3):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(0)
        with autotune.forced(index):
            out = tk.flash_attn_func(*leaves, **kw)
            out.backward(torch.ones_like(out))
        results.append([out, *(t.grad for t in leaves)])
    assert len(tma_runs) >= 4  # TMA forward and backward, persistent forward
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_ffn_pin(device, monkeypatch, launches):
    """KERNELS_FFN_CONFIG pins one matmul config for every product (the interpreter included); it
    computes the same FFN; a malformed value is a clear ValueError."""
    import json
    from test_ffn import _check, _params
    pin = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1, TMA=True, PERSISTENT=True)
    monkeypatch.setenv("KERNELS_FFN_CONFIG", json.dumps(pin))
    assert ffn_mod.candidates(torch.float16, "act", "none") == [dict(pin, WS=False)]
    runs = _count_tma_launches(monkeypatch, ffn_mod)
    with launches("ffn_matmul", 6):
        _check(torch.randn(2, 21, 48, dtype=torch.float16, device=device),
               _params(48, 80, torch.float16, device), "gelu", torch.float16)
    assert runs  # aligned operands went through descriptors
    for bad in ("[1]", '{"BLOCK_M": 16}', json.dumps(dict(pin, BLOCK_K=24)), json.dumps(dict(pin, TMA=False, WS=True))):
        monkeypatch.setenv("KERNELS_FFN_CONFIG", bad)
        with pytest.raises(ValueError, match="KERNELS_FFN_CONFIG"):
            ffn_mod.candidates(torch.float16, "act", "none")


def test_hopper_candidates_follow_the_triton_release(monkeypatch):
    """Triton 3.6 mis-builds the TMA attention and warp-specialized matmul candidates (an H200, 2026-12-04):
    before 3.7 the sm_90a lists hold the pointer candidates alone; from 3.7 they hold both."""
    assert dispatch._release("3.6.0") == (3, 6) and dispatch._release("3.7.1+git0a1b2c") == (3, 7)
    assert dispatch._release("3.10.0rc1") == (3, 10)
    monkeypatch.setattr(dispatch, "INTERPRETER", False)
    for release, offered in (((3, 6), False), ((3, 7), True), ((3, 9), True)):
        monkeypatch.setattr(dispatch, "TRITON_RELEASE", release)
        fwd = configs.fwd_candidates(64, torch.float16, 1024, False, "sm_90a")
        dkdv, dq = configs.bwd_candidates(64, torch.float16, False, "sm_90a")
        matmul = ffn_mod.candidates(torch.float16, "act", "none", "sm_90a")
        assert any(c["TMA"] for c in fwd + dkdv + dq) == offered, release
        assert any(c["WS"] for c in matmul) == offered, release
        assert fwd[0] == dict(configs._config(64, torch.float16, 1024, False, "sm_90a"), TMA=False, PERSISTENT=False)
        assert len(dkdv) == len(dq) == (3 if offered else 2) and any(c["TMA"] for c in matmul)


def test_blackwell_runs_sm80_tiles_and_times_hopper_ones(monkeypatch):
    """Compute capability 10.x is its own family (sm_100a): sm_80's tiles by default (spill-free there),
    Hopper's as run-time candidates where they compile spill-free for it (not the d=128 forward's 128x128),
    and from Triton 3.7 the defaults through TMA descriptors (not the d=64 forward's, which spills), in
    attention and the FFN matmul alike; FP8 attention gets Hopper's 128x128 tile too, which fits there with
    8-bit operands. 12.x (consumer Blackwell) stays on sm_80."""
    for major, family in ((8, "sm_80"), (9, "sm_90a"), (10, "sm_100a"), (12, "sm_80")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert dispatch.target_arch(torch.device("cuda")) == family
    monkeypatch.setattr(dispatch, "INTERPRETER", False)
    sm80 = lambda d: configs._config(d, torch.bfloat16, 1024, False, "sm_80")  # noqa: E731
    for release, tma in (((3, 6), False), ((3, 9), True)):
        monkeypatch.setattr(dispatch, "TRITON_RELEASE", release)
        fwd64 = configs.fwd_candidates(64, torch.bfloat16, 1024, False, "sm_100a")
        assert fwd64[0] == dict(sm80(64), TMA=False, PERSISTENT=False) and len(fwd64) == 2
        assert fwd64[1]["BLOCK_N"] == 128 and not fwd64[1]["TMA"]
        fwd128 = configs.fwd_candidates(128, torch.bfloat16, 1024, False, "sm_100a")
        assert fwd128 == [dict(sm80(128), TMA=False, PERSISTENT=False)] + ([dict(fwd128[0], TMA=True)] if tma else [])
        fp8 = configs.fwd_candidates(128, torch.float8_e4m3fn, 1024, False, "sm_100a")
        assert [(c["BLOCK_N"], c["TMA"]) for c in fp8] == [(64, False), (128, False)] + [(64, True)] * tma
        assert len(configs.fwd_candidates(128, torch.float8_e4m3fn, 1, False, "sm_100a")) == 1 + tma  # decoding
        assert len(configs.fwd_candidates(64, torch.bfloat16, 1024, False, "sm_100a", varlen=True)) == 1
        dkdv, dq = configs.bwd_candidates(128, torch.bfloat16, False, "sm_100a")
        sm80_dkdv, sm80_dq = configs._bwd_configs(128, torch.bfloat16, False, "sm_80")
        assert dkdv[0] == dict(sm80_dkdv, TMA=False) and dq[0] == dict(sm80_dq, TMA=False)
        assert len(dkdv) == len(dq) == 2 + tma and [c["TMA"] for c in dkdv + dq] == ([False, False] + [True] * tma) * 2
        assert not tma or (dkdv[-1] == dict(dkdv[0], TMA=True) and dq[-1] == dict(dq[0], TMA=True))
        packed_dkdv, packed_dq = configs.bwd_candidates(128, torch.bfloat16, False, "sm_100a", varlen=True)
        assert not any(c["TMA"] for c in packed_dkdv) and packed_dq == dq  # that dK/dV spills with TMA
        dkdv256, dq256 = configs.bwd_candidates(256, torch.bfloat16, False, "sm_100a")
        assert len(dkdv256) == len(dq256) == 1 + tma
        for operand in (torch.bfloat16, torch.float8_e4m3fn):
            matmul = ffn_mod.candidates(operand, "act", "none", "sm_100a")
            assert [(c["TMA"], c["PERSISTENT"]) for c in matmul] == [(False, False)] + [(True, False), (True, True)] * tma
            assert not any(c["WS"] for c in matmul)
        assert len(ffn_mod.candidates(torch.float32, "act", "none", "sm_100a")) == 1