"""FP8 (e4m3) feed-forward network for inference (issue 22, item 2).

The spec is ``torch._scaled_mm``'s row-wise scaled GEMM: ``(A_fp8 @ B_fp8) * scale_a (M, 1) *
scale_b (1, N)``, with e4m3 weights scaled per output channel and the activations entering each product
quantized per token (amax / 448). The tests build that FFN out of ``torch._scaled_mm`` itself on the CPU
and compare the Triton kernels (run by the interpreter, which multiplies e4m3 operands exactly) with it;
the accuracy contract (item 3) compares both with float64 FFN of the unquantized tensors.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import transformer_kernels as tk
from transformer_kernels import dispatch, ffn_fp8
from transformer_kernels._triton_utils import InputTypeError, InputValueError
from transformer_kernels.ffn import ACTIVATIONS, GATED_ACTIVATIONS, ffn_reference

E4M3 = torch.float8_e4m3fn
_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


def _weights(d_model, d_ff, gated, *, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w1, w2, wg = (torch.randn(d_ff, d_model, generator=g) / d_model ** 0.5,
                  torch.randn(d_model, d_ff, generator=g) / d_ff ** 0.5,
                  torch.randn(d_ff, d_model, generator=g) / d_model ** 0.5)
    b1, b2, bg = (torch.randn(n, generator=g).to(dtype) for n in (d_ff, d_model, d_ff))
    return dict(w1=w1, w2=w2, wg=wg if gated else None, b1=b1, b2=b2, bg=bg if gated else None)


def _quantized(p):
    (q1, s1), (q2, s2) = ffn_fp8.quantize_rows(p["w1"]), ffn_fp8.quantize_rows(p["w2"])
    args = (q1, p["b1"], q2, p["b2"])
    kw = dict(weight1_scale=s1, weight2_scale=s2)
    if p["wg"] is not None:
        qg, sg = ffn_fp8.quantize_rows(p["wg"])
        kw.update(weight_gate=qg, weight_gate_scale=sg, bias_gate=p["bg"])
    return args, kw


def _scaled_mm_ffn(x, args, kw, activation, residual=None):
    """The FP8 FFN composed from torch._scaled_mm (fp32 out), the epilogue in fp32, h in x's dtype."""
    q1, b1, q2, b2 = args

    def mm(a, sa, w, sw, bias):
        out = torch._scaled_mm(a, w.t(), scale_a=sa[:, None], scale_b=sw[None, :], out_dtype=torch.float32)
        return out + bias.float()

    xq, sx = ffn_fp8.quantize_rows(x)
    up = mm(xq, sx, q1, kw["weight1_scale"], b1)
    if activation in GATED_ACTIVATIONS:
        gate = mm(xq, sx, kw["weight_gate"], kw["weight_gate_scale"], kw["bias_gate"])
        h = _ACT[GATED_ACTIVATIONS[activation]](gate) * up
    else:
        h = _ACT[activation](up)
    hq, sh = ffn_fp8.quantize_rows(h.to(x.dtype))
    y = mm(hq, sh, q2, kw["weight2_scale"], b2)
    return (y if residual is None else y + residual.float()).to(x.dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _rmse(a, b):
    return ((a.double() - b.double()) ** 2).mean().sqrt().item()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fp8_ffn_is_scaled_mm_ffn(activation):
    """Every activation, biases and a residual: the kernels compute torch._scaled_mm's FFN (h rounded to
    the output dtype, then quantized per token). Both Triton GEMMs ran."""
    gated = activation in GATED_ACTIVATIONS
    d_model, d_ff, tokens = 40, 72, 37  # nothing a multiple of the 32-wide interpreter tiles
    p = _weights(d_model, d_ff, gated, seed=ACTIVATIONS.index(activation))
    x = torch.randn(tokens, d_model).to(torch.bfloat16)
    residual = torch.randn(tokens, d_model).to(torch.bfloat16)
    args, kw = _quantized(p)
    before = tk.launch_count("ffn_matmul")
    y = tk.ffn(x, *args, activation, residual=residual, **kw)
    assert tk.launch_count("ffn_matmul") - before == 2 and tk.last_path("ffn") == "triton"
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.isfinite(y).all()
    expected = _scaled_mm_ffn(x, args, kw, activation, residual)
    # fp32 sums in another order may move an h element across an e4m3 rounding boundary (one 6% step of
    # one element of a 72-wide row); the output is otherwise that of the scaled GEMMs, rounded to bf16
    assert _rel(y, expected) < 4e-3


@pytest.mark.parametrize("outliers", [False, True])
def test_fp8_ffn_within_twice_the_quantization_floor(outliers):
    """RMSE against float64 FFN of the unquantized tensors <= 2x that of float64 FFN on the dequantized
    weights and input (what quantizing them alone costs): random input, and a few 100x channels."""
    d_model, d_ff, tokens = 64, 96, 48
    for activation in ("gelu", "swiglu"):
        gated = activation in GATED_ACTIVATIONS
        p = _weights(d_model, d_ff, gated, seed=11)
        x = torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(3))
        if outliers:
            x[:, ::20] *= 100
        x = x.to(torch.bfloat16)
        args, kw = _quantized(p)
        y = tk.ffn(x, *args, activation, **kw)
        extra = dict(weight_gate=p["wg"].double(), bias_gate=p["bg"].double()) if gated else {}
        true = ffn_reference(x.double(), p["w1"].double(), p["b1"].double(), p["w2"].double(), p["b2"].double(),
                             activation, **extra)
        deq = lambda q, s: ffn_fp8.dequantize_rows(q, s).double()  # noqa: E731
        xd = deq(*ffn_fp8.quantize_rows(x))
        extra_d = dict(weight_gate=deq(kw["weight_gate"], kw["weight_gate_scale"]), bias_gate=p["bg"].double()) \
            if gated else {}
        floor = ffn_reference(xd, deq(args[0], kw["weight1_scale"]), p["b1"].double(), deq(args[2], kw["weight2_scale"]),
                              p["b2"].double(), activation, **extra_d)
        got, least = _rmse(y, true), _rmse(floor, true)
        assert got <= 2 * least, f"{activation}: FP8 RMSE {got:.3e} > 2x the floor {least:.3e}"


def test_fp8_input_with_scale_equals_the_float_input():
    """An e4m3 input with its per-token scale (what a quantizing norm hands over) gives what the float
    input quantized inside the first GEMM gives, bit for bit; out_dtype picks the output dtype; 3-D."""
    p = _weights(32, 64, True, seed=4, dtype=torch.float16)
    args, kw = _quantized(p)
    x = torch.randn(2, 9, 32).to(torch.float16)
    xq, sx = ffn_fp8.quantize_rows(x)
    from_float = tk.ffn(x, *args, "swiglu", **kw)
    from_fp8 = tk.ffn(xq, *args, "swiglu", input_scale=sx, out_dtype=torch.float16, **kw)
    assert from_fp8.dtype == torch.float16 and from_fp8.shape == (2, 9, 32)
    torch.testing.assert_close(from_fp8, from_float, rtol=0, atol=0)
    torch.testing.assert_close(tk.ffn(xq, *args, "swiglu", input_scale=sx[..., None], out_dtype=torch.float16, **kw),
                               from_float, rtol=0, atol=0)


def test_fp8_scale_shapes_and_zero_rows():
    """Per-channel scales as (n,) or (n, 1), a per-tensor scale, strided input; an all-zero token gives
    act(b1)-based output, not NaN."""
    p = _weights(32, 48, False, seed=6)
    args, kw = _quantized(p)
    x = torch.randn(32, 20).to(torch.bfloat16).t()  # (20, 32), column-major
    x[3] = 0
    base = tk.ffn(x, *args, "relu", **kw)
    assert torch.isfinite(base).all()
    as_columns = {k: v[:, None] for k, v in kw.items()}
    torch.testing.assert_close(tk.ffn(x, *args, "relu", **as_columns), base, rtol=0, atol=0)
    one = torch.full((1,), 0.01)
    w1 = (p["w1"] / 0.01).clamp(-448, 448).to(E4M3)
    w2 = (p["w2"] / 0.01).clamp(-448, 448).to(E4M3)
    per_tensor = tk.ffn(x, w1, p["b1"], w2, p["b2"], "relu", weight1_scale=one, weight2_scale=one)
    expanded = tk.ffn(x, w1, p["b1"], w2, p["b2"], "relu", weight1_scale=one.expand(48).clone(),
                      weight2_scale=one.expand(32).clone())
    torch.testing.assert_close(per_tensor, expanded, rtol=0, atol=0)
    zero_row = _scaled_mm_ffn(torch.zeros(1, 32, dtype=torch.bfloat16), args, kw, "relu")
    torch.testing.assert_close(base[3:4].float(), zero_row.float(), rtol=0.02, atol=0.02)


def test_fp8_ffn_on_cpu_without_the_interpreter_runs_the_reference():
    p = _weights(32, 48, True, seed=8)
    args, kw = _quantized(p)
    x = torch.randn(10, 32).to(torch.bfloat16)
    got = tk.ffn(x, *args, "swiglu", **kw)
    saved, dispatch.INTERPRETER = dispatch.INTERPRETER, False
    try:
        ref = tk.ffn(x, *args, "swiglu", **kw)
        assert tk.last_path("ffn") == "torch"
    finally:
        dispatch.INTERPRETER = saved
    assert _rel(got, ref) < 4e-3


def test_fp8_ffn_bad_input_raises_clear_errors():
    p = _weights(32, 48, False, seed=9)
    (q1, b1, q2, b2), kw = _quantized(p)
    x = torch.randn(4, 32).to(torch.bfloat16)
    s1, s2 = kw["weight1_scale"], kw["weight2_scale"]
    cases = [
        (InputTypeError, "float8_e4m3fnuz", (x, q1.view(torch.uint8).view(torch.float8_e4m3fnuz), b1, q2, b2), kw),
        (InputTypeError, "float8_e4m3fn", (x, q1.float().to(torch.float8_e5m2), b1, q2, b2), kw),
        (InputValueError, "needs weight2_scale", (x, q1, b1, q2, b2), dict(weight1_scale=s1)),
        (InputValueError, r"\(32,\)", (x, q1, b1, q2, b2), dict(weight1_scale=s1, weight2_scale=s1)),
        (InputTypeError, "float32", (x, q1, b1, q2, b2), dict(weight1_scale=s1.half(), weight2_scale=s2)),
        (InputTypeError, "output dtype", (x, q1, b1.float(), q2, b2), kw),
        (InputValueError, "input_scale", (x, q1, b1, q2, b2), dict(kw, input_scale=torch.ones(4))),
        (InputValueError, "needs input_scale", (x.to(E4M3), q1, b1, q2, b2), kw),
        (InputValueError, "gemm", (x, q1, b1, q2, b2), dict(kw, gemm="torch")),
        (InputTypeError, "float8_e4m3fn", (x, q1, b1, p["w2"].bfloat16(), b2), kw),
    ]
    for error, match, args, extra in cases:
        with pytest.raises(error, match=match):
            tk.ffn(*args, "relu", **extra)
    with pytest.raises(InputValueError, match="inference-only"):
        tk.ffn(x, q1, nn.Parameter(b1), q2, b2, "relu", **kw)
    with torch.no_grad():  # a Parameter bias is fine where autograd records nothing
        tk.ffn(x, q1, nn.Parameter(b1), q2, b2, "relu", **kw)


def test_quantize_fp8_makes_a_patched_model_fp8(tmp_path):
    """One call: every fused FFN block's Linears become FP8Linear (e4m3 weight + weight_scale buffer), the
    fused forward runs the FP8 kernels, an unpatched model's own forward runs FP8Linear's GEMM, and the
    output stays close to bf16. Layers the report names; a Linear outside an FFN stays as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)),
                          tk.GatedFFN(32, 48)).to(torch.bfloat16).eval()
    x = torch.randn(6, 32).to(torch.bfloat16)
    with torch.no_grad():
        before = model(x)
        tk.patch(model)
        report = tk.quantize_fp8(model)
        assert sorted(report.quantized) == ["1", "2"] and type(model[0]) is nn.Linear
        assert isinstance(model[1][0], tk.FP8Linear) and model[1][0].weight.dtype == E4M3
        assert model[2].down_proj.weight_scale.shape == (32,)
        assert "2.gate_proj.weight_scale" in model.state_dict()
        count = tk.launch_count("ffn_matmul")
        after = model(x)
        assert tk.launch_count("ffn_matmul") - count == 4  # two fused FP8 FFNs, two GEMMs each
        assert _rel(after, before) < 0.1
        tk.unpatch(model)
        unfused = model(x)  # nn.Sequential's own forward: FP8Linear, GELU, FP8Linear
        assert _rel(unfused, after) < 0.05  # (the unfused GELU runs on bf16-rounded pre-activations)


@pytest.mark.parametrize("rms", [False, True])
def test_norm_fp8_quantizes_what_the_norm_stores(rms):
    """norm_fp8 = the (add &) norm's output quantized per token by quantize_rows, bit for bit, for a row in
    registers and a wide row (more than the interpreter's 64-wide single pass); the sum comes back; the
    FFN fed from it gives what the FFN gives from the stored norm."""
    for n in (48, 200):
        g = torch.Generator().manual_seed(n)
        x, r = (torch.randn(5, n, generator=g).to(torch.bfloat16) for _ in range(2))
        w, b = torch.randn(n, generator=g), None if rms else torch.randn(n, generator=g)
        y_fp8, scale, z = tk.norm_fp8(x, n, w, b, rms=rms, residual=r)
        assert tk.last_path("layer_norm") == "triton" and y_fp8.dtype == E4M3 and scale.shape == (5,)
        stored, z_ref = (tk.add_rms_norm(x, r, n, w, prenorm=True) if rms
                         else tk.add_layer_norm(x, r, n, w, b, prenorm=True))
        q, s = ffn_fp8.quantize_rows(stored)
        torch.testing.assert_close(y_fp8.float(), q.float(), rtol=0, atol=0)
        torch.testing.assert_close(scale, s, rtol=0, atol=0)
        torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    y_plain, s_plain = tk.norm_fp8(x, n, w, b, rms=rms)  # no residual: two outputs
    q, s = ffn_fp8.quantize_rows(tk.rms_norm(x, n, w) if rms else tk.layer_norm(x, n, w, b))
    torch.testing.assert_close(y_plain.float(), q.float(), rtol=0, atol=0)
    p = _weights(n, 64, False, seed=2)
    args, kw = _quantized(p)
    from_norm = tk.ffn(y_plain, *args, "gelu", input_scale=s_plain, **kw)
    torch.testing.assert_close(from_norm, tk.ffn(tk.rms_norm(x, n, w) if rms else tk.layer_norm(x, n, w, b), *args,
                                                 "gelu", **kw), rtol=0, atol=0)
    with pytest.raises(InputValueError, match="inference-only"):
        tk.norm_fp8(x, n, nn.Parameter(w), rms=rms)


def test_quantized_prenorm_transformer_feeds_the_ffn_from_the_norm(monkeypatch):
    """The pre-norm Transformer with FP8 FFN weights: each FFN's input comes from norm_fp8 in e4m3 (no
    float activation reaches the first GEMM), and the logits stay close to the bf16 model's."""
    from transformer import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=64, num_heads=4, d_ff=128, num_encoder_layers=2,
                            num_decoder_layers=2, norm_first=True, dropout=0.0, activation="gelu")
    model = TransformerLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (2, 12))
    seen = []
    forward = ffn_fp8.ffn_fp8_forward
    monkeypatch.setattr(ffn_fp8, "ffn_fp8_forward", lambda x, *a, **k: seen.append(x.dtype) or forward(x, *a, **k))
    with torch.no_grad():
        before = model(ids)
        assert tk.quantize_fp8(model).quantized == ["layers.0.ffn", "layers.1.ffn"]
        after = model(ids)
    assert seen == [E4M3, E4M3]
    assert _rel(after, before) < 0.1


def test_quantize_fp8_kv_cache_of_the_transformer():
    """kv_cache=True: the model's decoding caches are e4m3, their descales set per (sequence, head) by the
    prompt, appends quantized by the decoding kernel; cached decoding stays close to the full forward."""
    from transformer import TransformerConfig, TransformerLM

    torch.manual_seed(1)
    cfg = TransformerConfig(vocab_size=64, d_model=64, num_heads=4, d_ff=128, num_encoder_layers=2,
                            num_decoder_layers=2, dropout=0.0, max_len=64)
    model = TransformerLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (2, 9))
    report = tk.quantize_fp8(model, kv_cache=True)
    assert report.kv_cache_models == ["(model)"] and len(report.quantized) == 2
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(2, 16)
        assert cache[0].fp8 and cache[0].k_descale is None
        count = tk.launch_count("attention_fwd")
        steps = [model(ids[:, :6], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(6, 9)]
        assert tk.launch_count("attention_fwd") > count and tk.last_path("attention") == "triton"
    assert cache[0].k_descale.shape == (2, 4) and cache[0].lengths.tolist() == [9, 9]
    assert (cache[0].k[:, :9].float().abs().amax(dim=(1, 3)) <= 448).all()
    assert _rel(torch.cat(steps, 1), full) < 0.05


def test_fp8_ffn_and_norm_compile_without_graph_breaks():
    """torch.library custom ops with fake implementations: torch.compile(fullgraph=True) traces norm_fp8
    feeding the FP8 FFN, and gives the eager result."""
    p = _weights(32, 48, True, seed=12)
    args, kw = _quantized(p)
    x, w = torch.randn(6, 32).to(torch.bfloat16), torch.randn(32)

    def f(x, w, s1, s2, sg):
        h, scale, z = tk.norm_fp8(x, 32, w, rms=True, residual=x)
        return tk.ffn(h, *args, "swiglu", weight1_scale=s1, weight2_scale=s2, weight_gate=kw["weight_gate"],
                      weight_gate_scale=sg, bias_gate=kw["bias_gate"], input_scale=scale, residual=z,
                      out_dtype=torch.bfloat16)

    scales = (kw["weight1_scale"], kw["weight2_scale"], kw["weight_gate_scale"])
    explanation = torch._dynamo.explain(f)(x, w, *scales)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, *scales)
    torch.testing.assert_close(compiled, f(x, w, *scales), rtol=0, atol=0)


def test_prequantize_candidate_is_bit_identical():
    """The candidate the device may pick instead of quantizing on load (a quantization pass, then the
    e4m3 product) gives the default's output bit for bit, both products, plain and gated, a strided
    input; its quantization kernel ran."""
    from transformer_kernels import autotune

    p = _weights(40, 72, True, seed=13)
    args, kw = _quantized(p)
    x = torch.randn(40, 37).to(torch.bfloat16).t()  # (37, 40), column-major
    for gate in ({}, {k: kw[k] for k in ("weight_gate", "weight_gate_scale", "bias_gate")}):
        plain = {k: kw[k] for k in ("weight1_scale", "weight2_scale")}
        activation = "swiglu" if gate else "gelu"
        base = tk.ffn(x, *args, activation, **plain, **gate)
        count = tk.launch_count("ffn_quantize")
        with autotune.forced(1):
            pre = tk.ffn(x, *args, activation, **plain, **gate)
        assert tk.launch_count("ffn_quantize") - count == 2
        torch.testing.assert_close(pre, base, rtol=0, atol=0)
