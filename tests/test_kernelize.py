"""Issue 19: our kernels through Hugging Face's ``kernels.kernelize`` (transformer_kernels.hf.mapping), and the
two ``kernels`` packages side by side (Hugging Face's ``kernels``, our ``transformer_kernels``).

Models are tiny (2 layers, d_model 32) so the Triton kernels run through the interpreter on CPU; the
launch counters prove they ran. References are the same models unkernelized (fp32: equal up to
summation order), as in tests/test_hf.py.
"""
import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import transformer_kernels as tk
from transformer_kernels.rotary import apply_rotary_pos_emb, rotary_pos_emb_reference
from test_patching import assert_grads_match, assert_match, assert_same_state, snapshot

transformers = pytest.importorskip("transformers")
kernels = pytest.importorskip("kernels")  # Hugging Face's (transformers >= 5.25 requires it)
if not hasattr(kernels, "kernelize"):  # not installed: the name found is this repo's kernels/ folder on sys.path
    pytest.skip("Hugging Face's kernels package is not installed", allow_module_level=True)
from kernels import Mode  # noqa: E402

from transformer_kernels import hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64

# transformers marks its layers for kernels only when its kernels integration is on (from 5.25, which
# requires a kernels release in its range); older releases (the hf extra's floor, 5.23) mark nothing.
marks_layers = pytest.mark.skipif(not transformers.utils.is_kernels_available(),
                                  reason=f"transformers {transformers.__version__} does not mark its layers for "
                                         "kernels (needs >= 5.25 with Hugging Face's kernels in its range)")
TRAIN_COMPILE = Mode.TRAINING | Mode.TORCH_COMPILE


@pytest.fixture(autouse=True)
def _quiet_kernels():
    """``kernels`` warns once per marked module it leaves alone (activations) when called directly."""
    log = logging.getLogger("kernels")
    level = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(level)


# --------------------------------------------------------------------------------------------------
# The models: Llama, Qwen3 (q/k norms), Gemma 3 (unmarked norms: rotary only), Phi (partial rotary)
# --------------------------------------------------------------------------------------------------
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=32)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_COMMON, num_key_value_heads=2))


def qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8))


def gemma3():
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=8,
                                                                         sliding_window=4))


def phi():
    """Phi rotates the first half of each head (partial_rotary_factor 0.5): it hands the rotary slice of
    q and k to apply_rotary_pos_emb."""
    return transformers.PhiForCausalLM(transformers.PhiConfig(**_COMMON, partial_rotary_factor=0.5, resid_pdrop=0.0,
                                                              embd_pdrop=0.0, attention_dropout=0.0))


# name -> (builder, marked RMSNorm modules per forward, rotary launches per forward: q and k of 2 layers)
MODELS = {"llama": (llama, 5, 4), "qwen3": (qwen3, 9, 4), "gemma3": (gemma3, 0, 4), "phi": (phi, 0, 4)}


def build(name, device):
    torch.manual_seed(0)
    model = MODELS[name][0]().to(device)
    with torch.no_grad():  # Gemma's norm weights start at 0 (scale 1 + w): give every parameter a value
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(device, batch=2, seqlen=7):
    ids = torch.randint(0, VOCAB, (batch, seqlen), device=device)
    mask = torch.ones(batch, seqlen, dtype=torch.long, device=device)
    mask[0, :2] = 0  # left padding, as generation pads
    return dict(input_ids=ids, attention_mask=mask)


def counting(before):
    return {k: v - before.get(k, 0) for k, v in tk.launch_counts().items() if v - before.get(k, 0)}


def expect_launches(ran, norms, rotary, backward=False):
    """Our kernels ran: a forward launches one norm per marked RMSNorm module, one rotary per q and k."""
    assert ran.get("layer_norm_fwd", 0) >= norms, ran
    assert ran.get("rotary", 0) >= rotary, ran
    if backward:
        assert ran.get("layer_norm_bwd", 0) >= norms, ran


def grads_of(model, inputs, cotangent=None):
    logits = model(**inputs).logits
    cotangent = torch.randn_like(logits) if cotangent is None else cotangent
    (logits * cotangent).sum().backward()
    return logits, cotangent


# --------------------------------------------------------------------------------------------------
# kernelize on real models, in each mode
# --------------------------------------------------------------------------------------------------
@marks_layers
@pytest.mark.parametrize("name", list(MODELS))
def test_inference_logits_and_greedy_generation(name, device):
    model = build(name, device).eval()
    ref = copy.deepcopy(model)
    snap = snapshot(model)
    assert hf.kernelize(model, mode=Mode.INFERENCE) is model
    assert_same_state(model, snap)
    inputs = tokens(device)
    before = dict(tk.launch_counts())
    with torch.no_grad():
        assert_match(model(**inputs).logits, ref(**inputs).logits, "logits")
    expect_launches(counting(before), *MODELS[name][1:])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    before = dict(tk.launch_counts())
    out, out_ref = model.generate(**inputs, **kwargs), ref.generate(**inputs, **kwargs)
    assert counting(before).get("rotary", 0) >= 4 * 2 * 2  # every decoding step rotated on our kernel
    assert torch.equal(out.sequences, out_ref.sequences)
    for step, (s, s_ref) in enumerate(zip(out.scores, out_ref.scores)):
        assert_match(s, s_ref, f"scores of step {step}")


@marks_layers
@pytest.mark.parametrize("name", list(MODELS))
def test_training_logits_and_gradients(name, device):
    model = build(name, device).train()
    ref = copy.deepcopy(model)
    hf.kernelize(model, mode=Mode.TRAINING)
    inputs = tokens(device)
    before = dict(tk.launch_counts())
    logits, cotangent = grads_of(model, inputs)
    expect_launches(counting(before), *MODELS[name][1:], backward=True)
    logits_ref, _ = grads_of(ref, inputs, cotangent)
    assert_match(logits, logits_ref, "logits")
    assert_grads_match(model, ref)


@marks_layers
@pytest.mark.parametrize("name", list(MODELS))
def test_training_under_torch_compile(name, device):
    """TRAINING | TORCH_COMPILE: dynamo sees the whole model in one graph (0 graph breaks), and the
    compiled model runs our kernels and gives the eager reference's logits and gradients."""
    model = build(name, device).train()
    ref = copy.deepcopy(model)
    hf.kernelize(model, mode=TRAIN_COMPILE)
    inputs = tokens(device)
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    before = dict(tk.launch_counts())
    logits, cotangent = grads_of(compiled, inputs)
    expect_launches(counting(before), *MODELS[name][1:], backward=True)
    logits_ref, _ = grads_of(ref, inputs, cotangent)
    assert_match(logits, logits_ref, "logits")
    assert_grads_match(model, ref)
    torch._dynamo.reset()


@marks_layers
def test_kernelize_then_our_patches_compose(device):
    """kernelize reaches the marked norms and rotary; apply_kernels adds MLPs and attention on top."""
    model = build("llama", device).eval()
    ref = copy.deepcopy(model)
    hf.kernelize(model, mode=Mode.INFERENCE)
    hf.apply_kernels(model)
    inputs = tokens(device)
    before = dict(tk.launch_counts())
    with torch.no_grad():
        assert_match(model(**inputs).logits, ref(**inputs).logits, "logits")
    ran = counting(before)
    assert ran.get("attention_fwd") and ran.get("ffn_matmul") and ran.get("rotary") and ran.get("layer_norm_fwd"), ran


# --------------------------------------------------------------------------------------------------
# Layers: Hugging Face's validation, Gemma's norm, fallbacks for code we do not reproduce
# --------------------------------------------------------------------------------------------------
def test_mapping_covers_cuda_and_cpu_with_validated_layers():
    assert set(hf.KERNEL_MAPPING) == {"RMSNorm", "RMSNormZeroCentered", "rotary_pos_emb"}
    for name, per_device in hf.KERNEL_MAPPING.items():
        assert set(per_device) == {"cuda", "cpu"}
        layer = per_device["cuda"].load()
        assert layer.has_backward is True and layer.can_torch_compile is True
        assert hash(per_device["cuda"]) == hash(per_device["cpu"])  # kernels caches loaded layers by repository


@marks_layers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centered_norm_is_gemma_math(device, dtype):
    """``RMSNormZeroCentered`` (Qwen3.5's norms: Gemma's ``x * (1 + w)`` in fp32) on our rms_norm."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    torch.manual_seed(0)
    norm = Qwen3_5RMSNorm(48, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_()
    ref = copy.deepcopy(norm)
    hf.kernelize(norm, mode=Mode.TRAINING, device="cpu" if device == "cpu" else "cuda")
    x = torch.randn(3, 5, 48, device=device, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    before = dict(tk.launch_counts())
    y, y_ref = norm(x), ref(x_ref)
    assert counting(before).get("layer_norm_fwd") == 1
    assert_match(y, y_ref, "y", rtol=1e-5 if dtype == torch.float32 else 1e-2)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_match(x.grad, x_ref.grad, "dx", rtol=1e-5 if dtype == torch.float32 else 2e-2)
    assert_match(norm.weight.grad, ref.weight.grad, "dweight", rtol=1e-5 if dtype == torch.float32 else 2e-2)


def test_marked_code_we_do_not_reproduce_runs_its_own_forward(device):
    """A name is not a proof: a module marked "RMSNorm" whose code is not Llama's, and a function
    marked "rotary_pos_emb" whose code is not Llama's, keep their own math (and launch nothing)."""

    @kernels.use_kernel_forward_from_hub("RMSNorm")
    class ScaleOnly(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states):
            return hidden_states * self.weight

    @kernels.use_kernel_forward_from_hub("rotary_pos_emb")
    def not_rope(q, k, cos, sin, unsqueeze_dim=1):
        return q * cos.unsqueeze(unsqueeze_dim), k * sin.unsqueeze(unsqueeze_dim)

    @kernels.use_kernelized_func(not_rope)
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = ScaleOnly(8)

        def forward(self, q, k, cos, sin):
            q, k = not_rope(self.norm(q), k, cos, sin)
            return q + k

    torch.manual_seed(0)
    block = Block().to(device)
    q, k = torch.randn(2, 3, 5, 8, device=device), torch.randn(2, 3, 5, 8, device=device)
    cos, sin = torch.randn(2, 5, 8, device=device), torch.randn(2, 5, 8, device=device)
    expected = block(q, k, cos, sin)
    hf.kernelize(block, mode=Mode.INFERENCE)
    assert block.norm.__dict__.get("forward") is not None  # kernelize did swap the forward ...
    before = dict(tk.launch_counts())
    assert torch.equal(block(q, k, cos, sin), expected)  # ... and ours handed the call back
    assert counting(before) == {}


@marks_layers
def test_calls_the_kernel_cannot_take_run_the_original(device):
    """LlamaRMSNorm with an fp32 weight and a bf16 input promotes to fp32 (the kernel does not): the
    kernelized module runs the original forward for that call."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(16).to(device)
    ref = copy.deepcopy(norm)
    hf.kernelize(norm, mode=Mode.INFERENCE, device="cpu" if device == "cpu" else "cuda")
    x = torch.randn(4, 16, device=device, dtype=torch.bfloat16)
    before = dict(tk.launch_counts())
    y = norm(x)
    assert counting(before) == {} and y.dtype == torch.float32 and torch.equal(y, ref(x))
    before = dict(tk.launch_counts())
    assert_match(norm(x.float()), ref(x.float()), "fp32 call")
    assert counting(before).get("layer_norm_fwd") == 1


def test_kernelize_errors_like_kernels():
    model = llama()
    with pytest.raises(ValueError, match="INFERENCE or Mode.TRAINING"):
        hf.kernelize(model, mode=Mode.TORCH_COMPILE)
    with pytest.raises(ValueError, match="Unsupported device type"):
        hf.kernelize(model, mode=Mode.INFERENCE, device="vulkan")


# --------------------------------------------------------------------------------------------------
# transformers' apply_rotary_pos_emb, the function
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bhsd_gqa", "bshd", "3d", "partial_slice"])
def test_apply_rotary_pos_emb_against_float64(device, launches, layout):
    """Random shapes, strides and per-half cos/sin (no assumption that the halves repeat), forward and
    backward against transformers' formula in float64."""
    torch.manual_seed(0)
    b, s, hq, hk, d = 2, 7, 4, 2, 12
    unsqueeze_dim = 1
    if layout == "bhsd_gqa":
        q = torch.randn(b, s, hq, d, device=device).transpose(1, 2)  # (b, h, s, d), not contiguous
        k = torch.randn(b, hk, s, d, device=device)
    elif layout == "bshd":
        q, k = torch.randn(b, s, hq, d, device=device), torch.randn(b, s, hk, d, device=device)
        unsqueeze_dim = 2
    elif layout == "3d":
        q, k = torch.randn(hq, s, d, device=device), torch.randn(hk, s, d, device=device)
    else:  # the rotary slice of a larger head (Phi)
        q = torch.randn(b, hq, s, 2 * d, device=device)[..., :d]
        k = torch.randn(b, hk, s, 2 * d, device=device)[..., :d]
    shape = (s, d) if layout == "3d" else (b, s, d)
    cos, sin = torch.randn(shape, device=device), torch.randn(shape, device=device)
    if layout == "3d":
        unsqueeze_dim = 0
    q, k = q.requires_grad_(), k.requires_grad_()
    with launches("rotary", 4):
        out = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
        grads = torch.autograd.grad(out, (q, k), [torch.ones_like(o) for o in out])
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    ref = rotary_pos_emb_reference(q64, k64, cos.double(), sin.double(), unsqueeze_dim)
    grads_ref = torch.autograd.grad(ref, (q64, k64), [torch.ones_like(o) for o in ref])
    for o, r in zip((*out, *grads), (*ref, *grads_ref)):
        assert o.shape == r.shape and o.dtype == torch.float32
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)


def test_rotate_half_launcher_writes_every_element(device, launches):
    """A NaN-poisoned, strided output is fully overwritten, forward and conjugate (the backward)."""
    from helpers import poisoned
    from transformer_kernels.rotary import rotate_half_embed

    torch.manual_seed(0)
    x = torch.randn(3, 9, 5, 10, device=device).transpose(1, 2)
    cos, sin = (torch.randn(3, 1, 9, 10, device=device).expand(x.shape) for _ in range(2))
    half = lambda t: (t[..., :5], t[..., 5:])  # noqa: E731
    (xa, xb), (ca, cb), (sa, sb) = half(x), half(cos), half(sin)
    for conjugate, expected in ((False, torch.cat((xa * ca - xb * sa, xb * cb + xa * sb), -1)),
                                (True, torch.cat((xa * ca + xb * sb, xb * cb - xa * sa), -1))):
        out = poisoned((3, 9, 5, 10), torch.float32, device).transpose(1, 2)
        with launches("rotary", 1):
            assert rotate_half_embed(x, cos, sin, conjugate, out=out) is out
        assert not out.isnan().any()
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_rotary_pos_emb_low_precision(device, dtype):
    """Half precision: fp32 inside, one rounding; within a rounding of transformers' own (bf16) result."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 16, device=device, dtype=dtype), torch.randn(2, 2, 9, 16, device=device, dtype=dtype)
    cos, sin = torch.randn(2, 9, 16, device=device, dtype=dtype), torch.randn(2, 9, 16, device=device, dtype=dtype)
    out = apply_rotary_pos_emb(q, k, cos, sin)
    ref = rotary_pos_emb_reference(*(t.double() for t in (q, k, cos, sin)))
    ours_err = max((o.double() - r).abs().max().item() for o, r in zip(out, ref))
    theirs_err = max((o.double() - r).abs().max().item()
                     for o, r in zip(rotary_pos_emb_reference(q, k, cos, sin), ref))
    assert all(o.dtype == dtype for o in out)
    assert ours_err <= theirs_err


def test_apply_rotary_pos_emb_errors():
    q = torch.randn(2, 4, 5, 8)
    cos = torch.randn(2, 5, 8)
    with pytest.raises(tk.InputValueError, match="head_dim"):
        apply_rotary_pos_emb(q[..., :7], q[..., :7], cos[..., :7], cos[..., :7])
    with pytest.raises(tk.InputValueError, match="does not broadcast"):
        apply_rotary_pos_emb(q, q, torch.randn(2, 6, 8), torch.randn(2, 6, 8))
    with pytest.raises(tk.InputTypeError, match="int32"):
        apply_rotary_pos_emb(q, q, cos.int(), cos.int())
    with pytest.raises(tk.InputValueError, match="promote"):
        apply_rotary_pos_emb(q.half(), q.half(), cos, cos)
    with pytest.raises(tk.InputValueError, match="requires grad"):
        apply_rotary_pos_emb(q, q, cos.clone().requires_grad_(), cos)
    out = apply_rotary_pos_emb(q.double(), q.double(), cos.double(), cos.double())  # the PyTorch path
    assert out[0].dtype == torch.float64 and tk.last_path("rotary") == "torch"


# --------------------------------------------------------------------------------------------------
# KernelConfig(use_local_kernel=True): a folder transformers and kernels load our layers from
# --------------------------------------------------------------------------------------------------
@marks_layers
def test_local_kernel_folder_loads_through_kernels(device, tmp_path):
    path = hf.write_local_kernel(tmp_path / "tk-local")
    meta = json.loads((path / "build" / "torch-universal" / "metadata.json").read_text())
    assert meta["id"] == "transformer_kernels_hub"
    repo = kernels.LocalLayerRepository(repo_path=path, layer_name="LlamaRMSNorm")
    assert repo.load() is hf.layers.LlamaRMSNorm
    model = build("llama", device).eval()
    ref = copy.deepcopy(model)
    with kernels.use_kernel_mapping({"RMSNorm": {device: repo}}, inherit_mapping=False):
        kernels.kernelize(model, mode=Mode.INFERENCE, device=device)
    inputs = tokens(device)
    before = dict(tk.launch_counts())
    with torch.no_grad():
        assert_match(model(**inputs).logits, ref(**inputs).logits, "logits")
    assert counting(before).get("layer_norm_fwd", 0) >= 5
    assert hf.write_local_kernel(path) == path  # rewriting our own folder is allowed
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        hf.write_local_kernel(other)
    assert (other / "keep.txt").read_text() == "mine"


@marks_layers
@pytest.mark.gpu
def test_from_pretrained_with_local_kernel_config(tmp_path, launches):
    """transformers' own route (CUDA only: its KernelConfig refuses a local kernel on "cpu")."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    build("llama", "cpu").save_pretrained(tmp_path / "model")
    path = hf.write_local_kernel(tmp_path / "tk-local")
    config = transformers.KernelConfig({"RMSNorm": f"{path}:LlamaRMSNorm", "rotary_pos_emb": f"{path}:RotaryPosEmb"},
                                       use_local_kernel=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", use_kernels=True,
                                                              kernel_config=config, device_map="cuda")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map="cuda")
    inputs = tokens("cuda")
    with launches("layer_norm_fwd"), launches("rotary"), torch.no_grad():
        assert_match(model(**inputs).logits, ref(**inputs).logits, "logits")


# --------------------------------------------------------------------------------------------------
# Both `kernels` packages side by side
# --------------------------------------------------------------------------------------------------
_SIDE_BY_SIDE = r"""
import json, sys, torch, kernels, transformers
import transformer_kernels as tk
from transformer_kernels import hf
cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 64, (1, 6))
ref = model(ids).logits
report = hf.apply_kernels(model)
hf.kernelize(model, mode=kernels.Mode.INFERENCE, device="cpu")
err = ((model(ids).logits - ref).norm() / ref.norm()).item()
print(json.dumps({"kernels": kernels.__file__, "tk": tk.__file__, "hf_api": hasattr(kernels, "kernelize"),
                  "ours_in_hf": hasattr(kernels, "scaled_dot_product_attention"), "err": err,
                  "replaced": len(report.replaced), "launches": tk.launch_counts()}))
"""


def _side_by_side(cwd, env):
    proc = subprocess.run([sys.executable, "-c", _SIDE_BY_SIDE], cwd=cwd, env={**os.environ, "TRITON_INTERPRET": "1",
                          **env}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@marks_layers
def test_inside_the_clone_kernels_is_hugging_faces():
    """Started in the repository root (its folder first on sys.path, as `make test` and `python -m
    benchmarks` run), `import kernels` is Hugging Face's and a transformers model builds, runs and
    patches with ours."""
    assert not (ROOT / "kernels" / "__init__.py").exists(), "an importable `kernels` package at the root shadows HF's"
    out = _side_by_side(ROOT, {})
    assert out["hf_api"] and not out["ours_in_hf"]
    assert Path(out["kernels"]).parent.parent.name == "site-packages", out["kernels"]
    assert Path(out["tk"]).parent == ROOT / "kernels" / "transformer_kernels"
    assert out["replaced"] > 0 and out["err"] < 1e-5
    assert out["launches"].get("attention_fwd") and out["launches"].get("rotary"), out["launches"]


def _copy_source(dest: Path) -> Path:
    """The files a build reads (what `git clone` gives), away from the clone's build outputs."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    for name in ("kernels", "benchmarks", "transformer"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "results"))
    return dest


@pytest.mark.slow
def test_installed_wheel_sits_beside_hugging_faces_kernels(tmp_path):
    """`pip install .` into an isolated target: only `transformer_kernels` and `transformer` land at the
    top level (no `kernels`, no `benchmarks`), the console script is declared, and a process outside
    the clone, with the installed copy first on its path, gets both packages working side by side."""
    src = _copy_source(tmp_path / "src")
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "--target", str(target), str(src)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")) and p.name != "bin"}
    assert top == {"transformer_kernels", "transformer"}, top
    assert (target / "transformer_kernels" / "benchmarks" / "__main__.py").exists()
    dist = next(target.glob("transformer_kernels-*.dist-info"))
    assert "0.2.0" in dist.name
    assert "transformer-kernels-bench = transformer_kernels.benchmarks.__main__:main" in \
        (dist / "entry_points.txt").read_text()
    out = _side_by_side(tmp_path, {"PYTHONPATH": str(target)})
    assert Path(out["tk"]).is_relative_to(target), out["tk"]
    assert out["hf_api"] and not out["ours_in_hf"] and out["err"] < 1e-5
    help_text = subprocess.run([sys.executable, "-c", "from transformer_kernels.benchmarks.__main__ import main; "
                                "raise SystemExit(main(['--help']))"], cwd=tmp_path, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(target)}, timeout=600)
    assert help_text.returncode == 0 and "usage" in help_text.stdout.lower(), help_text.stderr[-2000:]


def test_no_tracked_file_over_one_megabyte():
    """What .ci/run enforces, checked here too: build outputs, wheels and generated data stay out of git."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    big = [f.decode() for f in files if f and (ROOT / f.decode()).is_file()
           and (ROOT / f.decode()).stat().st_size > 1 << 20]
    assert big == []
    assert not any(f.endswith((b".whl", b".tar.gz")) for f in files)
