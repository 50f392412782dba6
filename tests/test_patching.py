"""transformer_kernels.patch / transformer_kernels.unpatch on torch.nn modules, and transformer_kernels.override_sdpa.

Every test runs a patched model beside an unpatched deep copy on the same inputs and compares outputs
and all gradients (fp32, relative error), and proves the Triton kernels ran (launch counters).
Shapes are tiny: on a CPU the kernels run in Triton's interpreter.
"""
import copy
import io
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import transformer_kernels as tk
from transformer_kernels.patching import PatchReport, override_sdpa, patch, unpatch

RTOL = 1e-4  # fp32: kernels and torch differ only in summation order


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_match(out, ref, name="output", rtol=RTOL):
    assert (out.shape, out.dtype) == (ref.shape, ref.dtype), f"{name}: {out.shape, out.dtype} vs {ref.shape, ref.dtype}"
    assert rel_err(out, ref) < rtol, f"{name}: relative error {rel_err(out, ref):.2e}"


def assert_grads_match(model, ref, rtol=RTOL):
    """Every parameter gradient within rtol of the reference's. Gradients that are ~0 in exact arithmetic
    (e.g. a key bias, which softmax cancels) are held to rtol times the overall gradient norm instead."""
    pairs = [(n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())]
    assert all((g is None) == (r is None) for _, g, r in pairs)
    pairs = [(n, g, r) for n, g, r in pairs if r is not None]
    total = sum(r.double().pow(2).sum().item() for _, _, r in pairs) ** 0.5
    for name, g, r in pairs:
        err = (g.double() - r.double()).norm().item()
        assert err <= rtol * max(r.double().norm().item(), 1e-3 * total), f"grad {name}: error {err:.2e}"


def run_both(model, ref, *inputs, grad=True, **kwargs):
    """Forward both on clones of ``inputs`` (which require grad), backward one random cotangent; return
    the outputs and the input gradients."""
    leaves = [[t.detach().clone().requires_grad_(grad and t.is_floating_point()) if isinstance(t, torch.Tensor) else t
               for t in inputs] for _ in range(2)]
    outs = []
    for m, xs in zip((model, ref), leaves):
        y = m(*xs, **kwargs)
        outs.append(y[0] if isinstance(y, tuple) else y)
    if grad:
        cot = torch.randn_like(outs[1])
        for y in outs:
            y.backward(cot)
        for i, (a, b) in enumerate(zip(*leaves)):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                assert_match(a.grad, b.grad, f"input {i} grad")
        assert_grads_match(model, ref)
    return outs


def patched_copy(model, **options):
    ref = copy.deepcopy(model)
    report = patch(model, **options)
    return model, ref, report


def snapshot(model):
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def assert_same_state(model, snap):
    state = model.state_dict()
    assert list(state) == list(snap), "state_dict keys changed"
    for k, v in state.items():
        assert torch.equal(v, snap[k][0]) and v.data_ptr() == snap[k][1], f"{k} changed"


# --------------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(normalized_shape=16), dict(normalized_shape=16, elementwise_affine=False),
                                    dict(normalized_shape=16, bias=False), dict(normalized_shape=(3, 8), eps=1e-3)])
def test_layer_norm(device, launches, kwargs):
    torch.manual_seed(0)
    ln = nn.LayerNorm(**kwargs, device=device)
    with torch.no_grad():
        for p in ln.parameters():
            p.normal_()
    model, ref, report = patched_copy(nn.Sequential(ln))
    assert report.paths() == ["0"] and isinstance(model[0], tk.LayerNorm) and isinstance(model[0], nn.LayerNorm)
    shape = kwargs["normalized_shape"]
    x = torch.randn(2, 5, *((shape,) if isinstance(shape, int) else shape), device=device)
    with launches("layer_norm_fwd"), launches("layer_norm_bwd"):
        y, y_ref = run_both(model, ref, x)
    assert_match(y, y_ref)


def test_rms_norm(device, launches):
    if not hasattr(tk, "rms_norm"):
        pytest.skip("transformer_kernels.rms_norm not in this version")
    torch.manual_seed(0)
    model, ref, report = patched_copy(nn.Sequential(nn.RMSNorm(16), nn.RMSNorm(16, eps=1e-3)).to(device))
    assert report.paths() == ["0", "1"] and isinstance(model[0], tk.RMSNorm)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    ref.load_state_dict(model.state_dict())
    with launches("layer_norm_fwd", 2):
        y, y_ref = run_both(model, ref, torch.randn(3, 4, 16, device=device))
    assert_match(y, y_ref)


def test_float64_runs_the_original(device):
    """The kernels take fp16/bf16/fp32: a patched float64 model keeps working, on torch."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model, ref, report = patched_copy(nn.Sequential(nn.LayerNorm(8), mlp, layer).double().to(device))
    assert len(report.replaced) == 6
    x = torch.randn(2, 4, 8, dtype=torch.float64, device=device)
    before = tk.launch_counts()
    torch.testing.assert_close(model(x), ref(x))
    assert tk.launch_counts() == before


# --------------------------------------------------------------------------------------------------
# Linear-activation-Linear MLPs
# --------------------------------------------------------------------------------------------------
MLP_ACTIVATIONS = [nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()]


@pytest.mark.parametrize("act", MLP_ACTIVATIONS, ids=lambda a: repr(a))
@pytest.mark.parametrize("dropout,bias", [(False, True), (True, False)])
def test_sequential_mlp(device, launches, act, dropout, bias):
    torch.manual_seed(0)
    layers = [nn.Linear(16, 40, bias=bias), act, *([nn.Dropout(0.0)] if dropout else []), nn.Linear(40, 16, bias=bias)]
    model, ref, report = patched_copy(nn.Sequential(*layers).to(device))
    assert report.paths() == [""], str(report)
    with launches("ffn_matmul", 2):
        y, y_ref = run_both(model, ref, torch.randn(2, 7, 16, device=device))
    assert_match(y, y_ref)
    assert tk.last_path("ffn") == "triton"


def assert_training_runs_the_original(model, ref, x):
    """In training mode with dropout p > 0 the patched model runs the original forward: no FFN kernel
    launch, and bit-for-bit the unpatched output for the same seed."""
    before = tk.launch_count("ffn_matmul")
    torch.manual_seed(1)
    y = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
    assert tk.launch_count("ffn_matmul") == before


class _TorchvisionMLPBlock(nn.Sequential):
    """torchvision's ``MLPBlock`` (``torchvision.models.vision_transformer``), restated: an ``nn.Sequential``
    subclass of Linear, GELU, Dropout, Linear, Dropout built by ``torchvision.ops.misc.MLP`` with no
    forward of its own. (torchvision's PyPI wheel does not import with the CPU torch build the tests use:
    its compiled ops need CUDA torch; the CPU wheel is served only from download.pytorch.org.)"""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float):
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim),
                         nn.Dropout(dropout))


def test_torchvision_style_mlp_block(device, launches):
    """Linear-GELU-Dropout-Linear-Dropout in an nn.Sequential subclass: one transformer_kernels.ffn call in eval;
    in training with p > 0 the original forward runs (the same random numbers as unpatched)."""
    torch.manual_seed(0)
    model, ref, report = patched_copy(_TorchvisionMLPBlock(16, 40, 0.1).to(device).eval())
    assert report.paths() == [""] and "training mode the original forward runs" in report.replaced[0].reason
    x = torch.randn(2, 7, 16, device=device)
    with launches("ffn_matmul", 2):
        y, y_ref = run_both(model, ref, x)
    assert_match(y, y_ref)
    model.train(), ref.train()
    assert_training_runs_the_original(model, ref, x)
    unpatch(model)
    assert type(model) is _TorchvisionMLPBlock


def test_mlp_dropout_in_training_runs_the_original(device, launches):
    """Dropout p > 0 in training would draw other random numbers in a kernel: the original runs, so the
    patched model reproduces the unpatched one for the same seed; in eval the kernel runs."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 16))
    model, ref, report = patched_copy(mlp.to(device))
    assert "training mode the original forward runs" in report.replaced[0].reason
    x = torch.randn(4, 16, device=device)
    assert_training_runs_the_original(model, ref, x)
    model.eval(), ref.eval()
    with launches("ffn_matmul", 2):
        assert_match(model(x), ref(x))


def test_hook_added_after_patching_is_honoured(device):
    """A hook on a Linear inside a fused MLP would be skipped by the kernel: the original runs instead."""
    model, ref, _ = patched_copy(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).to(device))
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 8, device=device)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert calls == [1]


def test_autocast_matches_dtypes(device):
    """Under autocast the kernels get the dtypes autocast gives the ops they replace."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16), nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))).to(device)
    model, ref, report = patched_copy(model)
    assert report.paths() == ["0", "1"]
    x = torch.randn(4, 16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        h, h_ref = model[0](x), ref[0](x)
        y, y_ref = model(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and h.dtype == h_ref.dtype
    assert rel_err(y, y_ref) < 2e-2 and rel_err(h, h_ref) < 2e-2


# --------------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# --------------------------------------------------------------------------------------------------
def _mha_case(case, batch_first, device):
    """(module kwargs, (query, key, value), forward kwargs) for one MHA configuration."""
    E, H, L, S, N = 16, 2, 5, 6, 2
    mod = dict(embed_dim=E, num_heads=H, batch_first=batch_first)
    shape = lambda n: (N, n, E) if batch_first else (n, N, E)  # noqa: E731
    x = torch.randn(*shape(L), device=device)
    kv = torch.randn(*shape(S), device=device)
    fwd = dict(need_weights=False)
    if case == "self":
        return mod, (x, x, x), fwd
    if case == "cross_key_padding":
        pad = torch.zeros(N, S, dtype=torch.bool, device=device)
        pad[1, 4:] = True  # True = ignore (nn.MultiheadAttention's convention)
        return mod, (x, kv, kv), dict(fwd, key_padding_mask=pad)
    if case == "float_mask_2d":
        return mod, (x, kv, kv), dict(fwd, attn_mask=torch.randn(L, S, device=device))
    if case == "bool_mask_3d_and_padding":
        mask = torch.rand(N * H, L, S, device=device) < 0.3
        mask[..., 0] = False
        pad = torch.zeros(N, S, dtype=torch.bool, device=device)
        pad[0, -1] = True
        return mod, (x, kv, kv), dict(fwd, attn_mask=mask, key_padding_mask=pad)
    if case == "causal_hint":
        mask = nn.Transformer.generate_square_subsequent_mask(L, device=device)
        return mod, (x, x, x), dict(fwd, attn_mask=mask, is_causal=True)
    if case == "kdim_vdim":
        k = torch.randn(*shape(S)[:-1], 12, device=device)
        v = torch.randn(*shape(S)[:-1], 10, device=device)
        return dict(mod, kdim=12, vdim=10), (x, k, v), fwd
    if case == "bias_kv_zero_attn":
        return dict(mod, add_bias_kv=True, add_zero_attn=True, bias=False), (x, kv, kv), fwd
    if case == "unbatched":
        return mod, (x[0] if batch_first else x[:, 0],) * 3, fwd
    raise ValueError(case)


MHA_CASES = ["self", "cross_key_padding", "float_mask_2d", "bool_mask_3d_and_padding", "causal_hint", "kdim_vdim",
             "bias_kv_zero_attn", "unbatched"]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention(device, launches, case, batch_first):
    torch.manual_seed(0)
    mod, qkv, fwd = _mha_case(case, batch_first, device)
    mha = nn.MultiheadAttention(**mod, device=device)
    if mha.bias_k is not None:
        nn.init.normal_(mha.bias_k), nn.init.normal_(mha.bias_v)
    model, ref, report = patched_copy(mha)
    assert report.paths() == [""]
    with launches("attention_fwd"), launches("attention_bwd_dq"):
        out, out_ref = run_both(model, ref, *qkv, **fwd)
    assert_match(out, out_ref)


def test_multihead_attention_need_weights_runs_the_original(device):
    """need_weights=True (nn.MultiheadAttention's default) returns the weights: torch computes them."""
    torch.manual_seed(0)
    model, ref, report = patched_copy(nn.MultiheadAttention(16, 2, batch_first=True, device=device))
    assert "need_weights=True" in report.replaced[0].reason
    x = torch.randn(2, 5, 16, device=device)
    before = tk.launch_count("attention_fwd")
    out, weights = model(x, x, x)
    out_ref, weights_ref = ref(x, x, x)
    assert tk.launch_count("attention_fwd") == before
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(weights, weights_ref, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# nn.TransformerEncoderLayer / DecoderLayer / Transformer
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer(device, launches, norm_first, batch_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation=activation, batch_first=batch_first,
                                       norm_first=norm_first, device=device)
    model, ref, report = patched_copy(layer)
    assert set(report.paths()) == {"", "self_attn", "norm1", "norm2"}, str(report)
    assert f"transformer_kernels.ffn('{activation}')" in report.replaced[0].reason
    src = torch.randn(2, 6, 16, device=device) if batch_first else torch.randn(6, 2, 16, device=device)
    pad = torch.zeros(2, 6, dtype=torch.bool, device=device)
    pad[1, 4:] = True
    with launches("attention_fwd"), launches("layer_norm_fwd", 2), launches("ffn_matmul", 2):
        out, out_ref = run_both(model, ref, src, src_key_padding_mask=pad)
    assert_match(out, out_ref)


def test_encoder_layer_inference_bypasses_the_fast_path(device, launches):
    """In eval without grad torch takes its native fast path; the patched layer runs our kernels instead."""
    torch.manual_seed(0)
    model, ref, _ = patched_copy(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, device=device).eval())
    src = torch.randn(2, 6, 16, device=device)
    with torch.no_grad(), launches("attention_fwd"), launches("ffn_matmul", 2):
        assert_match(model(src), ref(src))


def test_decoder_layer_with_masks(device, launches):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True, device=device)
    model, ref, report = patched_copy(layer)
    assert set(report.paths()) == {"", "self_attn", "multihead_attn", "norm1", "norm2", "norm3"}, str(report)
    tgt, memory = torch.randn(2, 5, 16, device=device), torch.randn(2, 7, 16, device=device)
    tgt_pad = torch.zeros(2, 5, dtype=torch.bool, device=device)
    tgt_pad[0, 4] = True
    mem_pad = torch.zeros(2, 7, dtype=torch.bool, device=device)
    mem_pad[1, 5:] = True
    causal = torch.ones(5, 5, dtype=torch.bool, device=device).triu(1)  # True = masked, as the paddings
    with launches("attention_fwd", 2), launches("layer_norm_fwd", 3), launches("ffn_matmul", 2):
        out, out_ref = run_both(model, ref, tgt, memory, tgt_mask=causal, tgt_is_causal=True,
                                tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=mem_pad)
    assert_match(out, out_ref)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_with_nested_tensor_fast_path(device):
    """nn.TransformerEncoder turns padded batches into nested tensors in inference; the patched layers
    hand those to torch (outputs equal), and run the kernels on the decoder side."""
    torch.manual_seed(0)
    net = nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, batch_first=True,
                         device=device).eval()
    model, ref, report = patched_copy(net)
    assert len(report.replaced) == 4 + 1 + 6 + 1  # encoder layer (+attn, 2 norms), its final norm, decoder
    reason = next(e.reason for e in report.left_alone if e.path == "encoder")
    assert "enable_nested_tensor=True" in reason and "none of our kernels" in reason  # the report says so

    src, tgt = torch.randn(2, 6, 16, device=device), torch.randn(2, 4, 16, device=device)
    pad = torch.zeros(2, 6, dtype=torch.bool, device=device)
    pad[1, 3:] = True
    with torch.no_grad():
        out = model(src, tgt, src_key_padding_mask=pad, memory_key_padding_mask=pad)
        out_ref = ref(src, tgt, src_key_padding_mask=pad, memory_key_padding_mask=pad)
    assert_match(out, out_ref)


def test_dropout_in_training_reproduces_the_unpatched_model(device):
    """With dropout > 0 in training the random parts run torch's code, LayerNorm runs ours: same seed,
    same outputs and gradients as the unpatched layer."""
    torch.manual_seed(0)
    model, ref, _ = patched_copy(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.25, batch_first=True, device=device))
    src = torch.randn(2, 6, 16, device=device)
    torch.manual_seed(3)
    y = model(src)
    torch.manual_seed(3)
    y_ref = ref(src)
    assert_match(y, y_ref)
    y.sum().backward(), y_ref.sum().backward()
    assert_grads_match(model, ref)
    assert tk.last_path("layer_norm") == "triton"


# --------------------------------------------------------------------------------------------------
# What patch leaves alone, and unpatch
# --------------------------------------------------------------------------------------------------
class ScaledLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


class MyAttention(nn.MultiheadAttention):
    def forward(self, q, k, v, **kwargs):
        return super().forward(q, k, v, need_weights=False)


class Mixed(nn.Module):
    """A model the patcher only partly understands."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.custom_norm = ScaledLayerNorm(16)
        self.attn = MyAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.tanh_mlp = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
        self.deep = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation=lambda t: t.sigmoid() * t,
                                                batch_first=True)

    def forward(self, x):
        x = self.norm(x) + self.custom_norm(x)
        x = x + self.attn(x, x, x)[0]
        x = self.mlp(x) + self.tanh_mlp(x) + self.deep(x)
        return self.layer(x)


def test_partly_understood_model(device):
    torch.manual_seed(0)
    model, ref, report = patched_copy(Mixed().to(device))
    assert isinstance(report, PatchReport) and report.model is model
    left = {e.path: e.reason for e in report.left_alone}
    assert "overrides nn.LayerNorm.forward" in left["custom_norm"]
    assert "overrides nn.MultiheadAttention.forward" in left["attn"]
    assert "Tanh" in left["tanh_mlp"]
    assert "not exactly Linear-activation" in left["deep"]
    assert set(report.paths()) == {"norm", "mlp", "layer", "layer.self_attn", "layer.norm1", "layer.norm2"}
    layer_entry = next(e for e in report.replaced if e.path == "layer")
    assert "feed-forward block unfused" in layer_entry.reason
    for path in ("custom_norm", "attn", "tanh_mlp", "deep", "deep.0"):
        assert type(model.get_submodule(path)) is type(ref.get_submodule(path))
    text = str(report)
    assert "replaced:" in text and "left alone:" in text and "custom_norm" in text and "nn.Linear x" in text
    out, out_ref = run_both(model, ref, torch.randn(2, 5, 16, device=device))
    assert_match(out, out_ref)


def test_unpatch_restores_classes_and_state_exactly(device):
    torch.manual_seed(0)
    model = nn.Sequential(Mixed(), nn.TransformerDecoderLayer(16, 2, 32, batch_first=True), nn.RMSNorm(16)).to(device)
    types_before = {n: type(m) for n, m in model.named_modules()}
    snap = snapshot(model)
    report = patch(model)
    assert len(report.replaced) >= 10
    assert_same_state(model, snap)
    assert patch(model).replaced == []  # idempotent: everything is "already patched"
    restored = unpatch(model)
    assert sorted(restored) == sorted(report.paths())
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    assert_same_state(model, snap)
    assert unpatch(model) == []


def test_public_names():
    import transformer_kernels.hf
    import transformer_kernels.patching

    for name in ("patch", "unpatch", "override_sdpa", "PatchReport", "PatchEntry"):
        assert getattr(tk, name, None) is getattr(tk.patching, name), f"kernels.{name} is not exported"
    assert tk.hf.apply_kernels and "patch" in tk.__all__


def test_options_and_inplace(device):
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, device=device)
    report = patch(layer, inplace=False, attention=False, ffn=False)
    assert report.model is not layer and type(layer) is nn.TransformerEncoderLayer
    left = {e.path: e.reason for e in report.left_alone}
    assert left["self_attn"] == "attention=False"
    assert set(report.paths()) == {"", "norm1", "norm2"}
    assert "ffn=False" in report.replaced[0].reason
    with pytest.raises(TypeError, match="nn.Module"):
        patch(object())


def test_patched_model_pickles(device, tmp_path):
    """torch.save(model) of a patched model loads back, here and in a fresh process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), nn.LayerNorm(16), nn.RMSNorm(16))
    patch(model.to(device).eval())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    x = torch.randn(2, 3, 16, device=device)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    path = tmp_path / "model.pt"
    torch.save(model.cpu(), path)
    code = f"import torch, kernels; m = torch.load({str(path)!r}, weights_only=False); print(type(m[0]).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "KernelsTransformerEncoderLayer", out.stderr


def test_torch_compile_traces_patched_modules(device, launches):
    """torch.compile (dynamo) traces the patched forwards; the kernels run inside the compiled graph."""
    torch.manual_seed(0)
    model, ref, _ = patched_copy(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, device=device))
    compiled = torch.compile(model, backend="eager")
    src = torch.randn(2, 5, 16, device=device)
    with launches("attention_fwd"), launches("layer_norm_fwd", 2), launches("ffn_matmul", 2):
        assert_match(compiled(src), ref(src))


def _padding(batch, seqlen, device):
    mask = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
    mask[1, seqlen - 2:] = True  # True = padding, as torch
    return mask


@pytest.mark.parametrize("kind", ["mha", "encoder", "transformer"])
def test_fullgraph_with_key_padding_masks(device, launches, kind):
    """torch.compile(fullgraph=True) takes patched nn.MultiheadAttention, nn.TransformerEncoder and
    nn.Transformer called with key-padding masks without a graph break (torch's key-padding check is
    restated without its message closures), and the compiled model runs our attention exactly."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 6, 16, device=device), torch.randn(2, 5, 16, device=device)
    pad_x, pad_y = _padding(2, 6, device), _padding(2, 5, device)
    if kind == "mha":
        module = nn.MultiheadAttention(16, 2, batch_first=True, device=device)
        call = lambda m: m(x, x, x, key_padding_mask=pad_x, need_weights=False)[0]  # noqa: E731
    elif kind == "encoder":
        module = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                       enable_nested_tensor=False).to(device)
        call = lambda m: m(x, src_key_padding_mask=pad_x)  # noqa: E731
    else:
        module = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True, device=device)
        call = lambda m: m(x, y, src_key_padding_mask=pad_x, tgt_key_padding_mask=pad_y,  # noqa: E731
                           memory_key_padding_mask=pad_x, tgt_mask=nn.Transformer.generate_square_subsequent_mask(
                               5, device=device), tgt_is_causal=True)
    model, ref, _ = patched_copy(module.eval())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(call)(model)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    compiled = torch.compile(call, fullgraph=True, backend="eager")
    with launches("attention_fwd"):
        assert_match(compiled(model), call(ref))


# --------------------------------------------------------------------------------------------------
# override_sdpa
# --------------------------------------------------------------------------------------------------
def test_override_sdpa(device, launches):
    torch_sdpa = F.scaled_dot_product_attention
    q, k, v = (torch.randn(2, 3, 5, 8, device=device) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5, device=device) > 0.3
    mask[..., 0] = True
    want = torch_sdpa(q, k, v, attn_mask=mask)
    with launches("attention_fwd", 2), override_sdpa():
        assert F.scaled_dot_product_attention is not torch_sdpa
        assert_match(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), want)
        with override_sdpa():  # nested
            assert_match(F.scaled_dot_product_attention(q, k, v, is_causal=True), torch_sdpa(q, k, v, is_causal=True))
        assert F.scaled_dot_product_attention is not torch_sdpa
    assert F.scaled_dot_product_attention is torch_sdpa
    with pytest.raises(RuntimeError, match="boom"), override_sdpa():
        raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is torch_sdpa


def test_override_sdpa_gqa_and_dropout(device, launches):
    torch_sdpa = F.scaled_dot_product_attention
    q = torch.randn(1, 4, 6, 8, device=device)
    k, v = torch.randn(1, 2, 6, 8, device=device), torch.randn(1, 2, 6, 8, device=device)
    with launches("attention_fwd"), override_sdpa():
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_match(got, torch_sdpa(q, k, v, is_causal=True, enable_gqa=True))
    before = tk.launch_count("attention_fwd")
    torch.manual_seed(5)
    with override_sdpa():  # dropout: torch's own, so the random draws are torch's
        dropped = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(5)
    torch.testing.assert_close(dropped, torch_sdpa(q, q, q, dropout_p=0.5), rtol=0, atol=0)
    assert tk.launch_count("attention_fwd") == before
